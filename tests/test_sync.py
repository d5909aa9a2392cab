"""Multi-site sync between real daemons on loopback (issue 5).

Three sites (a, b, c) in a mesh, each a `bastion serve` with its own copy of shop.db.
Applications write their site's file from their own processes (stdlib sqlite3).
Site a starts with the data; b and c join by copying a neighbour's file. The schedule is
manual so the test decides when changes travel (`bastion sync run`), which is how
concurrent changes to the same row (conflicts) are made on purpose.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import PY, DaemonProc, free_port, user_rows, write_config
from support.sites import seed_file

pytestmark = pytest.mark.timeout(240)


def app_sql(db: Path, *statements: str) -> None:
    """An application in its own process writes the site's file."""
    code = ("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1], timeout=30)\n"
            "for s in sys.argv[2:]:\n    con.execute(s)\ncon.commit()\n")
    subprocess.run([PY, "-c", code, str(db), *statements], check=True, timeout=60)


class Sites:
    def __init__(self, tmp: Path, names: list[str], schedule: str = "manual", extra: str = "") -> None:
        token = tmp / "peer.token"
        token.write_text(secrets.token_hex(32))
        ports = {n: free_port() for n in names}
        sites = ", ".join(f'{n} = "http://127.0.0.1:{p}"' for n, p in ports.items())
        self.d: dict[str, DaemonProc] = {}
        self.db: dict[str, Path] = {}
        for n in names:
            base = tmp / n
            base.mkdir()
            self.db[n] = base / "shop.db"
            cfg = write_config(base, ports[n], {"shop": {"files": [self.db[n]], "sync_group": "g"}}, extra=(
                f'[replication]\npeer_token_file = "{token}"\n\n[sync]\nsite = "{n}"\n\n'
                f'[sync_groups.g]\nsites = {{ {sites} }}\nschedule = "{schedule}"\n{extra}\n'))
            self.d[n] = DaemonProc(cfg, ports[n], base / "var")

    def run(self, n: str, timeout: float = 120) -> dict:
        r = self.d[n].cli("sync", "run", "shop", "--json", timeout=timeout)
        assert r.code == 0, (r.out, r.err)
        return r.json

    def settle(self, names: list[str], rounds: int = 3) -> None:
        for _ in range(rounds):
            for n in names:
                self.run(n)

    def stop(self) -> None:
        for d in self.d.values():
            try:
                d.stop()
            except Exception:
                pass


@pytest.fixture
def sites(tmp_path):
    made: list[Sites] = []

    def make(*a, **kw) -> Sites:
        s = Sites(tmp_path, *a, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def test_three_sites_join_exchange_resolve_and_converge(sites):
    s = sites(["a", "b", "c"])
    seed_file(s.db["a"])
    for n in ("a", "b", "c"):
        s.d[n].start()
    s.settle(["b", "c"], rounds=1)           # b and c join with a copy of a's file
    assert user_rows(s.db["b"]) == user_rows(s.db["a"]) == user_rows(s.db["c"])
    st = s.d["b"].cli("sync", "status", "shop", "--json").json["databases"][0]
    assert st["joined_from"] == "a" and st["group"] == "g" and st["neighbours"] == ["a", "c"], st

    # different rows on each site, and the same row on a and b (a conflict), the later write wins
    app_sql(s.db["a"], "INSERT INTO items VALUES (100, 'from a', 1, x'00ff')", "UPDATE items SET qty = 10 WHERE id = 1")
    time.sleep(0.05)
    app_sql(s.db["b"], "INSERT INTO items VALUES (200, 'from b', 2, NULL)", "UPDATE items SET qty = 20 WHERE id = 1")
    app_sql(s.db["c"], "DELETE FROM items WHERE id = 7")
    s.settle(["a", "b", "c"])
    rows = [user_rows(s.db[n]) for n in ("a", "b", "c")]
    assert rows[0] == rows[1] == rows[2]
    items = dict((r[0], r) for r in rows[0][0][1])
    assert items[1][2] == 20 and 100 in items and 200 in items and 7 not in items
    found = []
    for n in ("a", "b", "c"):
        r = s.d[n].cli("conflicts", "list", "shop", "--json")
        assert r.code == 0, r.err
        found += [(n, c) for c in r.json["conflicts"]]
    assert found, "the concurrent updates of item 1 were recorded"
    site, c = next((n, c) for n, c in found if c["key"] == {"id": 1})
    qtys = {c["local"]["values"]["qty"], c["remote"]["values"]["qty"]}
    assert qtys == {10, 20} and c["policy"] == "lww"
    # the loser (qty 10) is re-applied on purpose: it becomes the value everywhere
    r = s.d[site].cli("conflicts", "resolve", "shop", str(c["id"]), "--reapply", "--json")
    assert r.code == 0, r.err
    s.settle(["a", "b", "c"])
    rows = [user_rows(s.db[n]) for n in ("a", "b", "c")]
    assert rows[0] == rows[1] == rows[2]
    assert dict((r[0], r) for r in rows[0][0][1])[1][2] == 10
    for n in ("a", "b", "c"):
        con = sqlite3.connect(s.db[n])
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()


def test_kill9_during_apply_on_either_side_loses_and_duplicates_nothing(sites):
    s = sites(["a", "b"])
    seed_file(s.db["a"])
    for n in ("a", "b"):
        s.d[n].start()
    s.run("b")                                  # b joins
    # 20,000 changes on a; b is killed while a pushes them (receiving side dies mid-apply)
    app_sql(s.db["a"], "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
                       "INSERT INTO items(id, name, qty) SELECT 1000 + i, 'bulk ' || i, i FROM n")
    t = threading.Thread(target=lambda: s.d["a"].cli("sync", "run", "shop", "--json", timeout=120))
    t.start()
    time.sleep(0.6)
    s.d["b"].kill9()
    t.join(120)
    s.d["b"].start()
    # and the sending side dies mid-push
    app_sql(s.db["a"], "UPDATE items SET qty = qty + 1 WHERE id > 1000")
    t = threading.Thread(target=lambda: s.d["a"].cli("sync", "run", "shop", "--json", timeout=120))
    t.start()
    time.sleep(0.6)
    s.d["a"].kill9()
    t.join(120)
    s.d["a"].start()
    s.settle(["a", "b"], rounds=2)
    assert user_rows(s.db["a"]) == user_rows(s.db["b"])
    con = sqlite3.connect(s.db["b"])
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*), sum(qty) FROM items WHERE id > 1000").fetchone() == (
        20000, sum(range(1, 20001)) + 20000)
    con.close()
    st = json.loads(s.d["a"].cli("sync", "status", "shop", "--json").out)["databases"][0]
    assert st["files"][0]["peers"]["b"]["lag_changes"] == 0, st


def test_hub_forwards_and_a_failing_neighbour_runs_the_hook(sites, tmp_path):
    """Hub and spokes: spoke c reaches spoke b only through hub a. With the hub down,
    a spoke's pass fails and the group's on_failure command runs (once per streak)."""
    hook = tmp_path / "hook.out"
    cmd = json.dumps([PY, "-c", "import os, sys; open(sys.argv[1], 'a').write(os.environ['BASTION_GROUP'] + ' ' "
                                "+ os.environ['BASTION_ERROR'] + '\\n')", str(hook)])
    s = sites(["a", "b", "c"], extra=f'topology = "hub"\nhub = "a"\non_failure = {cmd}\n')
    seed_file(s.db["a"])
    for n in ("a", "b", "c"):
        s.d[n].start()
    s.settle(["b", "c"], rounds=1)
    st = s.d["c"].cli("sync", "status", "shop", "--json").json["databases"][0]
    assert st["topology"] == "hub" and st["neighbours"] == ["a"], st
    app_sql(s.db["c"], "INSERT INTO items VALUES (300, 'from c', 3, NULL)")
    s.settle(["c", "a", "b"], rounds=2)          # c -> a (hub) -> b
    assert user_rows(s.db["b"]) == user_rows(s.db["c"]) == user_rows(s.db["a"])
    s.d["a"].stop()
    app_sql(s.db["c"], "INSERT INTO items VALUES (301, 'while the hub is down', 4, NULL)")
    for _ in range(2):
        r = s.d["c"].cli("sync", "run", "shop", "--json")
        assert r.code == 2 and "no neighbour reachable" in r.json["error"], (r.code, r.out)
    deadline = time.monotonic() + 10
    while not hook.exists():
        assert time.monotonic() < deadline, "on_failure did not run"
        time.sleep(0.1)
    time.sleep(0.5)
    lines = hook.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g ") and "unreachable" in lines[0], lines
    st = s.d["c"].cli("sync", "status", "shop", "--json")
    assert st.code == 1 and st.json["databases"][0]["failures"] >= 2, st.out
    s.d["a"].start()
    s.settle(["c", "a", "b"], rounds=2)
    assert user_rows(s.db["b"]) == user_rows(s.db["c"]) == user_rows(s.db["a"])
