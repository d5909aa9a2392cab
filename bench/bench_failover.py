"""Failover benchmark (issue 7): RTO and RPO of kill -9 of the active node.

    .venv/bin/python bench/bench_failover.py [--rounds N] [--ttl 2s] [--no-etcd] [--no-replicated]

Three set-ups, each with clients writing through the DB-API driver with every node in
their DSN, each commit acknowledged only when durable:

  file        3 daemons on loopback sharing one data_dir, lease in the data_dir
  etcd        the same with the lease in a real etcd (if the etcd binary is there)
  replicated  2 daemons, each with its own copy, `mode = "replicated"`, lease in etcd,
              `durability = "replicated"` (acknowledged once the standby applied it)

Each round kills the active node with SIGKILL and measures:

  RTO = time from the kill to the first write acknowledged by another node
  RPO = acknowledged commits missing afterwards (goal 0); in replicated mode checked
        in every round against the new active's own copy, before the old one returns

then restarts the killed node: on shared storage it rejoins as passive; in replicated
mode the next round starts only once it is a seeded standby again (and the active no
longer degraded), so the rounds alternate which node is active. Prints one table and
writes bench/out/failover.json. Patroni's defaults take 30-45 s, LiteFS up to 10 s (issue 7).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import OUT, PY, ROOT, Daemon, free_port, log, run, wait_for, write_config
from support.cluster import HealthProbes
from support.etcd import Etcd

sys.path.insert(0, str(ROOT / "src"))

import apsw

import bastion.client as bc
from bastion.sql.users import hash_password

PASSWORD = "bench-failover-password"


class Node(HealthProbes, Daemon):
    """A cluster node; start() does not wait (a node answers once it has a role)."""

    def __init__(self, work: Path, name: str, port: int, data: Path, files: dict[str, Any],
                 sections: dict[str, dict[str, Any]]) -> None:
        super().__init__(write_config(work, port, files, name=f"{name}.toml", data_dir=data / "var",
                                      sections=sections), port, data / "var", log=work / f"{name}.log")
        self.name = name

    def start(self, timeout: float = 0) -> Node:
        return self.spawn()

    def stop(self, timeout: float = 20) -> None:
        super().stop(timeout)


class Writers:
    """Client threads inserting (client, n) through the driver; each acknowledgement is
    recorded with its time and the host that gave it. Not acknowledged: OutcomeUnknown
    (the reply was lost with the killed node) and NotReplicated (committed on the primary,
    not applied by the standby in time), counted apart."""

    def __init__(self, dsn: str, clients: int, **auth: str) -> None:
        self.dsn, self.auth = dsn, auth
        self.acked: dict[int, list[tuple[int, float, str]]] = {i: [] for i in range(clients)}
        self.unknown = 0
        self.not_replicated = 0
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        c = bc.connect(self.dsn, autocommit=True, failover_timeout=60, **self.auth)
        n = 0
        while not self.stop_ev.is_set():
            try:
                c.execute("INSERT INTO acked(client, n) VALUES (?, ?)", (i, n))
                self.acked[i].append((n, time.monotonic(), c.transport.host))
            except bc.OutcomeUnknown:
                self.unknown += 1
            except bc.NotReplicated:
                self.not_replicated += 1
            except bc.OperationalError as exc:
                if "active" not in str(exc):
                    log(f"client {i}: {exc}")
                time.sleep(0.01)
            except Exception as exc:  # say it, do not die silently
                log(f"client {i}: {type(exc).__name__}: {exc}")
                time.sleep(0.1)
            n += 1
        c.close()

    def start(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(60)

    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())

    def keys(self) -> set[tuple[int, int]]:
        return {(i, n) for i, v in list(self.acked.items()) for n, _, _ in list(v)}

    def first_ack_after(self, t: float, not_host: str) -> float | None:
        return min((ts for v in list(self.acked.values()) for _, ts, host in list(v) if ts > t and host != not_host),
                   default=None)


def rows_on(port: int, user: str = "", **auth: str) -> tuple[set[tuple[int, int]], str]:
    """(client, n) of every row on this node alone, and its integrity_check."""
    c = bc.connect(f"bastion://{user + '@' if user else ''}127.0.0.1:{port}/app", autocommit=True,
                   failover_timeout=10, **auth)
    try:
        got = {(a, b) for a, b in c.execute("SELECT client, n FROM acked").fetchall()}
        return got, c.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        c.close()


def make_db(path: Path) -> None:
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL").fetchall()
    con.execute("CREATE TABLE acked(id INTEGER PRIMARY KEY, client INT, n INT)")
    con.close()


# -- shared storage ---------------------------------------------------------------------------

def scenario_shared(work: Path, lease: str, etcd_url: str | None, rounds: int, ttl: str, clients: int) -> dict:
    work.mkdir(parents=True)
    make_db(work / "app.db")
    ports = [free_port() for _ in range(3)]
    cluster = {"name": "bench", "lease": lease, "ttl": ttl,
               "peers": {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}}
    if etcd_url:
        cluster["etcd"] = [etcd_url]
    nodes = [Node(work, f"n{i + 1}", p, work, {"app": [work / "app.db"]},
                  {"cluster": {**cluster, "node": f"n{i + 1}"}}) for i, p in enumerate(ports)]
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: sum(n.writable() for n in nodes) == 1, 60, "one active node")
        token = (work / "var" / "token").read_text().strip()
        w = Writers("bastion://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/app", clients, token=token).start()
        rtos = []
        try:
            for r in range(rounds):
                time.sleep(2.0)
                (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
                t_kill = time.monotonic()
                log(f"{lease}: round {r + 1}: {w.total()} acknowledged so far; kill -9 of {active.name}")
                active.kill9()
                # the first write acknowledged by another node (a reply of the dying node may still arrive)
                first = wait_for(lambda t=t_kill, a=active: w.first_ack_after(t, f"127.0.0.1:{a.port}"), 60,
                                 "a write acknowledged after the kill")
                rtos.append(first - t_kill)
                log(f"{lease}: round {r + 1}: killed {active.name}, RTO {rtos[-1]:.3f} s")
                active.start()          # rejoins as passive
            time.sleep(1.0)
        finally:
            w.stop()
        (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
        got, integrity = rows_on(active.port, token=token)
    finally:
        for n in nodes:
            n.stop()
    lost = len(w.keys() - got)
    return {"mode": lease, "lease": lease, "nodes": 3, "ttl": ttl, "rounds": rounds, "rto_seconds": rtos,
            "acknowledged": w.total(), "lost_acknowledged": lost, "outcome_unknown": w.unknown,
            "not_replicated": w.not_replicated, "integrity_check": integrity}


# -- replicated standby -----------------------------------------------------------------------

def conflicts(node: Node) -> list[dict]:
    """The entries `bastion conflicts list` shows on this node (settled or not)."""
    _, p = run([PY, "-m", "bastion", "--config", str(node.config), "conflicts", "list", "app", "--json"],
               timeout=60)
    return json.loads(p.stdout)["conflicts"]


def scenario_replicated(work: Path, etcd_url: str, rounds: int, ttl: str, clients: int) -> dict:
    """Two nodes, each its own copy; the lease in etcd; commits acknowledged once the standby
    applied them. Every round: kill -9 of the primary, RTO, RPO against the new primary's
    copy, then the killed node restarts and must become a seeded standby again."""
    work.mkdir(parents=True)
    (work / "peer.token").write_text(secrets.token_hex(32))
    ports = [free_port(), free_port()]
    peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    nodes = []
    for i, port in enumerate(ports):
        d = work / f"n{i + 1}"
        d.mkdir()
        db = {"app": {"files": [d / "app.db"], "durability": "replicated"}}
        nodes.append(Node(work, f"n{i + 1}", port, d, db, {
            "sql": {"busy_timeout": "3s"},
            "replication": {"peer_token_file": work / "peer.token"},
            "users.bench": {"password_hash": hash_password(PASSWORD), "access": {"app": "read-write"}},
            "cluster": {"name": "bench-rs", "node": f"n{i + 1}", "mode": "replicated", "lease": "etcd",
                        "etcd": [etcd_url], "ttl": ttl, "peers": peers}}))
    make_db(work / "n1" / "app.db")      # n1 starts as the primary; n2 is seeded from it
    auth = {"password": PASSWORD}
    rtos, rejoins, per_round = [], [], []
    lost = 0
    try:
        nodes[0].start()
        wait_for(lambda: nodes[0].writable(), 60, "n1 active")
        nodes[1].start()
        wait_for(nodes[1].seeded_standby, 120, "n2 a seeded standby")
        w = Writers("bastion://bench@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/app", clients, **auth).start()
        try:
            for r in range(rounds):
                time.sleep(2.0)
                (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
                other = next(n for n in nodes if n is not active)
                st = active.health()[1]
                if st.get("degraded"):
                    raise SystemExit(f"round {r + 1}: {active.name} is degraded before the kill: {st}")
                t_kill = time.monotonic()
                log(f"replicated: round {r + 1}: {w.total()} acknowledged so far; kill -9 of {active.name}")
                active.kill9()
                first = wait_for(lambda t=t_kill, a=active: w.first_ack_after(t, f"127.0.0.1:{a.port}"), 60,
                                 "a write acknowledged by the standby after the kill")
                rtos.append(first - t_kill)
                # RPO of this failover: everything acknowledged so far (by either node) must be in
                # the new primary's own copy, while the old primary is still down
                acked_now = w.keys()
                got, integrity = rows_on(other.port, "bench", **auth)
                missing = len(acked_now - got)
                lost += missing
                # restart the killed node: it rejoins (what it committed but never got applied by
                # the standby goes to the new primary's conflict log) and is seeded again
                before = {c["id"] for c in conflicts(other)}
                t_back = time.monotonic()
                active.start()
                wait_for(lambda a=active, o=other: a.seeded_standby() and o.health()[1].get("degraded") is False, 120,
                         f"{active.name} a seeded standby again")
                rejoins.append(time.monotonic() - t_back)
                # new entries whose "remote" version is the killed node's (its capture origin ends
                # with its data_dir); a rejoining node also hands over its own older log
                handed = sum(1 for c in conflicts(other) if c["id"] not in before and c["policy"] == "failover"
                             and str(c["remote"]["origin"]).endswith(f":{work / active.name / 'var'}"))
                per_round.append({"killed": active.name, "rto_seconds": rtos[-1], "acknowledged": len(acked_now),
                                  "missing_on_new_primary": missing, "integrity_check": integrity,
                                  "rejoin_seconds": rejoins[-1], "conflicts_logged": handed})
                log(f"replicated: round {r + 1}: killed {active.name}, RTO {rtos[-1]:.3f} s, {missing} of "
                    f"{len(acked_now)} acknowledged missing on {other.name}, integrity {integrity}; "
                    f"{active.name} a seeded standby again after {rejoins[-1]:.1f} s, "
                    f"{handed} of its change(s) in {other.name}'s conflict log")
            time.sleep(1.0)
        finally:
            w.stop()
        (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
        got, integrity = rows_on(active.port, "bench", **auth)
    finally:
        for n in nodes:
            n.stop()
    lost = max(lost, len(w.keys() - got))
    integrity = integrity if all(x["integrity_check"] == "ok" for x in per_round) else "FAILED"
    return {"mode": "replicated", "lease": "etcd", "nodes": 2, "ttl": ttl, "rounds": rounds, "rto_seconds": rtos,
            "acknowledged": w.total(), "lost_acknowledged": lost, "outcome_unknown": w.unknown,
            "not_replicated": w.not_replicated, "integrity_check": integrity,
            "rejoin_seconds": rejoins, "per_round": per_round}


def start_etcd(work: Path) -> Etcd | None:
    if not shutil.which("etcd"):
        return None
    (work / "etcd-server").mkdir()
    return Etcd(work / "etcd-server", name="b")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", default="2s")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-etcd", action="store_true", help="file lease only (no etcd, no replicated mode)")
    ap.add_argument("--no-shared", action="store_true", help="skip the shared-storage modes")
    ap.add_argument("--no-replicated", action="store_true", help="skip the replicated standby")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, databases)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-failover-"))
    results = []
    etcd = None
    try:
        if not a.no_shared:
            results.append(scenario_shared(work / "file", "file", None, a.rounds, a.ttl, a.clients))
        etcd = None if a.no_etcd else start_etcd(work)
        if etcd:
            if not a.no_shared:
                results.append(scenario_shared(work / "etcd", "etcd", etcd.url, a.rounds, a.ttl, a.clients))
            if not a.no_replicated:
                results.append(scenario_replicated(work / "replicated", etcd.url, a.rounds, a.ttl, a.clients))
    except BaseException:
        print(f"failed: configs, logs and databases kept in {work}", file=sys.stderr)
        raise
    finally:
        if etcd:
            etcd.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "failover.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"Failover: kill -9 of the active node, {a.clients} writing clients, lease ttl {a.ttl}; file/etcd: "
          f"3 nodes on shared storage; replicated: 2 nodes, own copies, durability replicated, lease etcd")
    print(f"{'mode':<10} {'rounds':>6} {'RTO median':>11} {'RTO max':>8} {'acked':>7} {'lost':>5} {'unknown':>8}  "
          f"{'integrity':<9}  verdict")
    for r in results:
        rto = r["rto_seconds"]
        ok = max(rto) <= 5.0 and r["lost_acknowledged"] == 0 and r["integrity_check"] == "ok"
        print(f"{r['mode']:<10} {r['rounds']:>6} {statistics.median(rto):>10.2f}s {max(rto):>7.2f}s "
              f"{r['acknowledged']:>7} {r['lost_acknowledged']:>5} {r['outcome_unknown']:>8}  "
              f"{r['integrity_check']:<9}  {'PASS' if ok else 'MISS'} (goal RTO <= 5 s, RPO 0)")
    for r in results:
        if r["mode"] == "replicated":
            handed = sum(x["conflicts_logged"] for x in r["per_round"])
            back = r["rejoin_seconds"]
            print(f"replicated: the killed node was a seeded standby again {statistics.median(back):.1f} s "
                  f"(median; max {max(back):.1f} s) after its restart; {handed} change(s) it had "
                  f"committed but never got applied by the standby went to the conflict log; "
                  f"{r['not_replicated']} commit(s) answered NotReplicated")
    if not etcd and not a.no_etcd:
        print("etcd: not installed here (Debian package etcd-server; `make setup` installs it): etcd lease and "
              "replicated mode not measured")
    if a.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r["mode"] for r in results if r["integrity_check"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
