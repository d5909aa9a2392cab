"""Replicated standby (issue 7): two nodes, each with its own copy, a lease in a real etcd.

n1 starts first and becomes the active primary; n2 becomes its standby (seeded, then
fed by real-time backup). Clients write through the driver with `durability =
"replicated"`: a commit is acknowledged once the standby applied it. The active is
killed with kill -9; the standby takes over when the etcd lease expires; every
acknowledged commit is there. The old primary, restarted, rejoins as the standby: the
change a local application made on its files that never reached n2 is handed to n2's
conflict log, not lost and not applied behind anyone's back.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import bastion.client as bc
from bastion.sql.users import hash_password
from support import PY, free_port, user_rows, wait_for
from support.cluster import Node, Writers, acked_db, active_of
from support.etcd import Etcd

pytestmark = pytest.mark.timeout(240)
PW = "standby-test-password"


def make_pair(tmp_path: Path, etcd: Etcd) -> list[Node]:
    token = tmp_path / "peer.token"
    token.write_text(secrets.token_hex(32))
    ports = [free_port(), free_port()]
    peers = ", ".join(f'n{i + 1} = "127.0.0.1:{p}"' for i, p in enumerate(ports))
    nodes = []
    for i, port in enumerate(ports):
        base = tmp_path / f"n{i + 1}"
        base.mkdir()
        db = base / "app.db"
        cluster = (f'[replication]\npeer_token_file = "{token}"\n\n'
                   f'[users.alice]\npassword_hash = "{hash_password(PW)}"\naccess = {{ app = "read-write" }}\n\n'
                   f'[cluster]\nname = "rs"\nmode = "replicated"\nlease = "etcd"\netcd = ["{etcd.url}"]\n'
                   f'ttl = "2s"\npeers = {{ {peers} }}\n')
        n = Node(base, f"n{i + 1}", port, [db], cluster, db="app", db_keys={"durability": "replicated"},
                 busy_timeout="3s")
        n.db = db
        nodes.append(n)
    acked_db(nodes[0].db)
    return nodes


def health(n: Node, path: str = "/v1/health") -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{n.port}{path}", timeout=2)
    except httpx.HTTPError:
        return None


def is_standby(n: Node) -> bool:
    r = health(n, "/v1/health/standby")
    return r is not None and r.status_code == 200 and bool(r.json().get("seeded"))


def cli(n: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bastion", "--config", str(n.config), *args], capture_output=True, text=True,
                          timeout=60)


def test_standby_takes_over_and_the_old_primary_rejoins_through_the_conflict_log(tmp_path):
    etcd = Etcd(tmp_path)
    n1, n2 = nodes = make_pair(tmp_path, etcd)
    try:
        n1.start()
        wait_for(lambda: active_of(nodes) == [n1], what="n1 active")
        n2.start()
        wait_for(lambda: is_standby(n2), 60, "n2 a seeded standby")
        user = f"alice:{PW}"
        with Writers(nodes, None, count=3, user=user, database="app") as w1:
            wait_for(lambda: sum(len(v) for v in w1.acked.values()) > 60, 60, "replicated commits")
        acked_before = sum(len(v) for v in w1.acked.values())
        # standby lag is visible on the active's health endpoint
        h = health(n1).json()
        assert h["role"] == "active" and h["lag_seconds"] is not None, h

        # The standby stalls; an application on n1 writes its file directly: captured, not shipped.
        os.kill(n2.proc.pid, signal.SIGSTOP)
        con = sqlite3.connect(n1.db, timeout=10)
        con.execute("INSERT INTO acked(client, n, at) VALUES (99, 1, 0)")
        con.execute("UPDATE acked SET n = -1 WHERE id = 1")
        con.commit()
        con.close()
        n1.kill9()
        t0 = time.monotonic()
        os.kill(n2.proc.pid, signal.SIGCONT)
        wait_for(lambda: active_of(nodes) == [n2], 30, "n2 takes over")
        took = time.monotonic() - t0
        with Writers(nodes, None, count=3, user=user, database="app") as w2:
            wait_for(lambda: sum(len(v) for v in w2.acked.values()) > 30, 60, "commits on n2")
        print(f"replicated standby: n2 active {took:.2f} s after kill -9 of n1 (ttl 2 s)")
        assert took < 10

        # every acknowledged commit is on n2; the unshipped local change is not (yet)
        check = bc.connect(f"bastion://{user}@127.0.0.1:{n2.port}/app", autocommit=True)
        assert w1.check(check) == acked_before and w2.check(check) > 30
        assert check.execute("SELECT count(*) FROM acked WHERE client = 99").fetchone() == (0,)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)

        # n1 returns: it rejoins as the standby; its unshipped changes land in n2's conflict log
        n1.start()
        wait_for(lambda: is_standby(n1), 60, "n1 back as a seeded standby")
        r = cli(n2, "conflicts", "list", "app", "--json")
        assert r.returncode == 0, r.stderr
        found = json.loads(r.stdout)["conflicts"]
        assert len(found) == 2, found
        assert {c["policy"] for c in found} == {"failover"}
        ins = next(c for c in found if (c["remote"]["values"] or {}).get("client") == 99)
        assert ins["outcome"] == "local" and ins["resolved_at"] is None
        # the operator re-applies it: it becomes a change of n2 and reaches n1 too
        r = cli(n2, "conflicts", "resolve", "app", str(ins["id"]), "--reapply", "--json")
        assert r.returncode == 0, r.stderr
        assert check.execute("SELECT count(*) FROM acked WHERE client = 99").fetchone() == (1,)
        check.close()
        kept = list((tmp_path / "n1" / "var" / "cluster").glob("rejoined-*/app.db"))
        assert kept, "the old files were kept aside"
        wait_for(lambda: user_rows(n1.db) == user_rows(n2.db), 30, "n1's copy equals n2")

        # planned switchover back to n1: n2 stops acknowledging, ships everything, hands over
        r = cli(n2, "cluster", "switchover", "--to", "n1", "--json")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: active_of(nodes) == [n1], 30, "n1 active again")
        wait_for(lambda: is_standby(n2), 60, "n2 back as a seeded standby")
        back = bc.connect(f"bastion://{user}@127.0.0.1:{n1.port}/app", autocommit=True)
        assert w1.check(back) == acked_before and w2.check(back) > 30
        assert back.execute("SELECT count(*) FROM acked WHERE client = 99").fetchone() == (1,)
        back.close()
        # the conflict log came along, with the resolution made on n2 after n1's copy was seeded
        r = cli(n1, "conflicts", "list", "app", "--all", "--json")
        assert r.returncode == 0 and len(json.loads(r.stdout)["conflicts"]) == 2, r.stdout
        left = json.loads(cli(n1, "conflicts", "list", "app", "--json").stdout)["conflicts"]
        assert [c["remote"]["values"]["n"] for c in left] == [-1], left     # only the update is still open
        wait_for(lambda: user_rows(n1.db) == user_rows(n2.db), 30, "n2's copy equals n1")
        for n in nodes:
            c = sqlite3.connect(f"file:{n.db}?mode=ro", uri=True)
            assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            c.close()
    finally:
        for n in nodes:
            if n.proc and n.proc.poll() is None:
                try:
                    os.kill(n.proc.pid, signal.SIGCONT)
                except OSError:
                    pass
            n.stop()
        etcd.stop()
