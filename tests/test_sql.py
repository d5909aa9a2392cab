"""The SQL server and the DB-API driver, against a real daemon in its own process.

Applications here are clients of the driver in this process (threads) and the bank
workload in another process writing the same files directly: the server is one more
SQLite user of files that stay shared.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time

import httpx
import pytest

import bastion.client as bc
from bastion.sql.users import hash_password
from support import PY, DaemonProc, check_bank, free_port, write_config

ALICE_PW, BOB_PW = "alice-secret-1", "bob-secret-22"


def users_config(durability: str = "durable", group_commit: bool = True, idle: str = "30s") -> str:
    return (f"[sql]\nidle_timeout = \"{idle}\"\nbusy_timeout = \"10s\"\n\n"
            f"[users.alice]\npassword_hash = \"{hash_password(ALICE_PW)}\"\naccess = {{ bank = \"read-write\" }}\n\n"
            f"[users.bob]\npassword_hash = \"{hash_password(BOB_PW)}\"\naccess = {{ \"*\" = \"read-only\" }}\n")


def start(tmp_path, bank, extra: str, db_extra: str = "") -> DaemonProc:
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]}, extra=extra, db_text=db_extra)
    return DaemonProc(cfg, port, tmp_path / "var").start()


@pytest.fixture
def server(tmp_path, bank):
    d = start(tmp_path, bank, users_config(idle="2s"))
    yield d
    d.stop()
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()
        bank.proc.wait()


def dsn(d: DaemonProc, user: str = "alice", db: str = "bank") -> str:
    return f"bastion://{user}@127.0.0.1:{d.port}/{db}"


def alice(d: DaemonProc, **kw) -> bc.Connection:
    return bc.connect(dsn(d), password=ALICE_PW, **kw)


def test_types_round_trip_exactly(server):
    con = alice(server)
    con.execute("CREATE TABLE v(id INTEGER PRIMARY KEY, x ANY) STRICT")
    values = [None, 0, 1, -1, 2**63 - 1, -(2**63), 0.1, 1.0, -0.0, 1e308, 5e-324, math.pi, float("inf"),
              float("-inf"), "", "héllo wörld ✓ 🐘", "nul\x00inside", "x" * 200_000, b"", b"\x00\xff\x00",
              bytes(range(256)) * 1000]
    con.executemany("INSERT INTO v(id, x) VALUES (?, ?)", list(enumerate(values)))
    con.commit()
    rows = con.execute("SELECT id, x, typeof(x) FROM v ORDER BY id").fetchall()
    assert len(rows) == len(values)
    for (i, got, kind), want in zip(rows, values):
        assert type(got) is type(want), (i, got, want)
        assert got == want or (isinstance(want, float) and math.copysign(1, got) == math.copysign(1, want)), i
        assert kind == {type(None): "null", int: "integer", float: "real", str: "text", bytes: "blob"}[type(want)]
    # and the file itself holds them, as any other SQLite reader sees it
    lite = sqlite3.connect(server.config.parent / "app" / "bank.db")
    assert lite.execute("SELECT x FROM v WHERE id = 4").fetchone()[0] == 2**63 - 1
    assert lite.execute("SELECT x FROM v WHERE id = 20").fetchone()[0] == bytes(range(256)) * 1000
    lite.close()
    # named parameters, description, rowcount, lastrowid
    cur = con.execute("SELECT id AS n, x FROM v WHERE id = :id", {"id": 6})
    assert [d[0] for d in cur.description] == ["n", "x"] and cur.fetchone() == (6, 0.1)
    cur = con.execute("UPDATE v SET x = 0 WHERE id < 3")
    assert cur.rowcount == 3
    cur = con.execute("INSERT INTO v(x) VALUES ('last')")
    assert cur.lastrowid == len(values)
    con.rollback()
    assert con.execute("SELECT count(*) FROM v WHERE x = 'last'").fetchone() == (0,)
    with pytest.raises(bc.ProgrammingError, match="not supported"):
        con.execute("SELECT ?", (object(),))
    con.close()


def test_transfers_from_many_clients_keep_the_invariant_beside_a_local_application(server, bank):
    bank.start()
    total = check_bank(bank.dir)["total"]
    errors: list[BaseException] = []
    done = [0]

    def client(seed: int) -> None:
        import random
        rnd = random.Random(seed)
        try:
            con = alice(server)
            for _ in range(40):
                a, b = rnd.sample(range(1, 201), 2)
                amt = rnd.randint(1, 50)
                with con:   # one transaction: two updates, committed together or not at all
                    con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amt, a))
                    con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amt, b))
                done[0] += 1
            con.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = bank.stop()
    assert not errors, errors[:3]
    assert done[0] == 16 * 40
    res = check_bank(bank.dir)
    assert res["ok"] and res["total"] == total, res
    assert stats["errors"] == {} and res["transfers"] == stats["commits"]
    st = server.cli("status", "--json").json["sql"]["databases"]["bank"]
    assert 0 < st["fsyncs"] <= 16 * 40, st     # group commit: commits shared fsyncs


def test_interactive_transaction_isolation_and_idle_timeout(server):
    a, b = alice(server), alice(server)
    a.execute("CREATE TABLE k(id INTEGER PRIMARY KEY, v TEXT)")
    a.execute("INSERT INTO k VALUES (1, 'one')")
    assert a.in_transaction
    # not visible to another connection before commit
    assert b.execute("SELECT count(*) FROM k").fetchone() == (0,)
    a.commit()
    assert b.execute("SELECT count(*) FROM k").fetchone() == (1,)
    # a writer that goes idle: its transaction is rolled back and the write lock freed
    a.execute("INSERT INTO k VALUES (2, 'two')")
    time.sleep(3.5)     # idle_timeout is 2 s, the sweeper runs every second
    b.execute("INSERT INTO k VALUES (3, 'three')")
    b.commit()
    with pytest.raises(bc.TransactionLost, match="idle"):
        a.execute("INSERT INTO k VALUES (4, 'four')")
    assert not a.in_transaction
    assert b.execute("SELECT id FROM k ORDER BY id").fetchall() == [(1,), (3,)]
    # a failed statement inside a transaction leaves it open, as in SQLite
    a.execute("INSERT INTO k VALUES (5, 'five')")
    with pytest.raises(bc.IntegrityError, match="UNIQUE"):
        a.execute("INSERT INTO k VALUES (1, 'dup')")
    a.commit()
    assert b.execute("SELECT id FROM k ORDER BY id").fetchall() == [(1,), (3,), (5,)]
    a.close()
    b.close()


def test_roles_and_credentials(server):
    bob = bc.connect(dsn(server, "bob"), password=BOB_PW)
    assert bob.execute("SELECT count(*) FROM accounts").fetchone() == (200,)
    with pytest.raises(bc.AccessDenied, match="read-only"):
        bob.execute("UPDATE accounts SET balance = 0")
    with pytest.raises(bc.AccessDenied, match=r"read-only|readonly"):
        bob.execute("CREATE TABLE x(a)")
    with pytest.raises(bc.AccessDenied):
        bob.execute("PRAGMA query_only = 0")
    assert bob.execute("SELECT sum(balance) > 0 FROM accounts").fetchone() == (1,)
    bob.close()
    for url, pw, err, msg in [(dsn(server), "wrong", bc.AccessDenied, "credentials"),
                              (dsn(server, "mallory"), "x", bc.AccessDenied, "credentials"),
                              (dsn(server, db="other"), ALICE_PW, bc.ProgrammingError, "no database 'other'")]:
        c = bc.connect(url, password=pw)
        with pytest.raises(err, match=msg):
            c.execute("SELECT 1")
        c.close()
    # users are not admins: the admin API stays closed to them
    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/contops/start", json={"targets": ["bank"]},
                   auth=("alice", ALICE_PW))
    assert r.status_code == 401
    # health is public (load balancers), and says nothing about data
    assert httpx.get(f"http://127.0.0.1:{server.port}/v1/health").json()["role"] == "active"


def test_dangerous_statements_and_bad_requests_get_clear_errors(server, tmp_path):
    con = alice(server)
    with pytest.raises(bc.OperationalError, match="VACUUM"):     # never a copy of the database on the server
        con.execute(f"VACUUM INTO '{tmp_path}/copy.db'")
    for sql, what in [("ATTACH '/tmp/evil.db' AS e", "ATTACH"),
                      ("PRAGMA journal_mode = DELETE", "journal_mode"), ("PRAGMA synchronous = OFF", "synchronous"),
                      ("BEGIN", "BEGIN"), ("COMMIT", "COMMIT")]:
        with pytest.raises(bc.AccessDenied, match=what):
            con.execute(sql)
    assert not (tmp_path / "copy.db").exists()
    mode = sqlite3.connect(server.config.parent / "app" / "bank.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)
    with pytest.raises(bc.OperationalError, match="syntax error"):
        con.execute("SELEC 1")
    with pytest.raises(bc.OperationalError, match="no such table: nope"):
        con.execute("SELECT * FROM nope")
    with pytest.raises(bc.ProgrammingError, match=r"bindings|parameter"):
        con.execute("SELECT ?, ?", (1,))
    base = f"http://127.0.0.1:{server.port}/v1/sql/bank"
    auth = ("alice", ALICE_PW)
    for body, status, msg in [({"statements": []}, 422, "statements"), ({}, 422, "statements"),
                              ({"statements": [{"sql": "SELECT ?", "params": [{"a": 1}]}]}, 400, "not a SQLite value"),
                              ({"statements": [{"sql": "SELECT ?", "params": [2**70]}]}, 400, "64-bit"),
                              ({"statements": [{"sql": 5}]}, 400, "non-empty 'sql'"),
                              ({"statements": [{"sql": "SELECT 1", "bogus": 1}]}, 400, "unknown field")]:
        r = httpx.post(base, json=body, auth=auth)
        assert r.status_code == status, (body, r.text)
        assert msg in r.json()["error"]["message"], r.text
    r = httpx.post(base, content=b"{not json", headers={"content-type": "application/json"}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["type"] == "UsageError"
    r = httpx.post(base + "/transactions/nope/commit", auth=auth)
    assert r.status_code == 410 and "no open transaction" in r.json()["error"]["message"]
    con.close()


def test_kill9_with_commits_in_flight_loses_no_acknowledged_commit(tmp_path, bank):
    d = start(tmp_path, bank, users_config())
    try:
        con = alice(d)
        con.execute("CREATE TABLE acked(id INTEGER PRIMARY KEY, client INT, n INT, pad BLOB)")
        con.commit()
        con.close()
        acked: dict[int, list[int]] = {i: [] for i in range(8)}
        stop = threading.Event()

        def client(i: int) -> None:
            c = alice(d, failover_timeout=1)
            n = 0
            while not stop.is_set():
                try:
                    c.execute("INSERT INTO acked(client, n, pad) VALUES (?, ?, randomblob(500))", (i, n))
                    c.commit()
                except bc.Error:
                    return      # the daemon is gone: whatever was not acknowledged may be lost
                acked[i].append(n)
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        d.kill9()
        stop.set()
        for t in threads:
            t.join(30)
        total = sum(len(v) for v in acked.values())
        assert total > 50, acked
        d.start()
        con = alice(d)
        rows = con.execute("SELECT client, n FROM acked").fetchall()
        got: dict[int, set[int]] = {i: set() for i in range(8)}
        for c, n in rows:
            got[c].add(n)
        for i in range(8):
            assert set(acked[i]) <= got[i], f"client {i}: acknowledged commits missing"
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
        assert check_bank(bank.dir)["ok"]
    finally:
        d.stop()


def test_driver_follows_the_active_node_and_never_replays_a_transaction(tmp_path, bank):
    d = start(tmp_path, bank, users_config())
    try:
        dead = f"127.0.0.1:{free_port()}"       # nothing listens there
        con = bc.connect(f"bastion://alice@{dead},127.0.0.1:{d.port}/bank", password=ALICE_PW, failover_timeout=20)
        assert con.transport.host.endswith(str(d.port))
        assert con.execute("SELECT count(*) FROM accounts").fetchone() == (200,)
        con.execute("CREATE TABLE f(id INTEGER PRIMARY KEY)")
        con.execute("INSERT INTO f VALUES (1)")
        con.commit()
        # a transaction in flight when the node dies: a clear error, not a silent replay
        con.execute("INSERT INTO f VALUES (2)")
        d.kill9()
        restarter = threading.Timer(1.0, d.start)
        restarter.start()
        with pytest.raises(bc.TransactionLost):
            con.execute("INSERT INTO f VALUES (3)")
        restarter.join()
        # outside a transaction the driver reconnects on its own
        assert con.execute("SELECT id FROM f ORDER BY id").fetchall() == [(1,)]
        con.close()
    finally:
        d.stop()


def test_durability_settings_and_config_errors(tmp_path, bank):
    d = start(tmp_path, bank, users_config(), db_extra='durability = "fast"')
    try:
        con = alice(d)
        con.execute("CREATE TABLE q(a)")
        con.executemany("INSERT INTO q VALUES (?)", [(i,) for i in range(100)])
        con.commit()
        st = d.cli("status", "--json").json["sql"]["databases"]["bank"]
        assert st["durability"] == "fast" and st["fsyncs"] == 0   # acknowledged without waiting for an fsync
        con.close()
    finally:
        d.stop()
    cfg = d.config.read_text().replace('durability = "fast"', 'durability = "replicated"')
    d.config.write_text(cfg)
    r = d.cli("status")
    assert r.code == 3 and "replicated" in r.err and "real-time backup" in r.err
    d.config.write_text(cfg.replace('durability = "replicated"', 'durability = "sometimes"'))
    r = d.cli("status")
    assert r.code == 3 and "durable, fast or replicated" in r.err
    d.config.write_text(cfg.replace('durability = "replicated"', "") + '\n[users.eve]\npassword_hash = "plain"\n')
    r = d.cli("status")
    assert r.code == 3 and "bastion passwd" in r.err


def test_temp_tables_do_not_leak_and_foreign_keys_setting(tmp_path, bank):
    d = start(tmp_path, bank, users_config(), db_extra="foreign_keys = true")
    try:
        a = alice(d)
        a.begin()       # TEMP objects live as long as the transaction's connection: one transaction
        a.execute("CREATE TEMP TABLE mine(secret TEXT)")
        a.execute("INSERT INTO mine VALUES ('of alice')")
        assert a.execute("SELECT * FROM mine").fetchall() == [("of alice",)]
        a.commit()
        b = bc.connect(dsn(d, "bob"), password=BOB_PW)
        for _ in range(10):       # whichever pooled connection b gets, alice's TEMP table is not there
            with pytest.raises(bc.OperationalError, match="no such table"):
                b.execute("SELECT * FROM mine")
        a.execute("CREATE TABLE parent(id INTEGER PRIMARY KEY)")
        a.execute("CREATE TABLE child(id INTEGER PRIMARY KEY, p INT REFERENCES parent(id))")
        a.commit()
        with pytest.raises(bc.IntegrityError, match="FOREIGN KEY"):
            a.execute("INSERT INTO child VALUES (1, 42)")
        a.rollback()
        with pytest.raises(bc.AccessDenied, match="foreign_keys"):
            a.execute("PRAGMA foreign_keys = OFF")
        a.close()
        b.close()
    finally:
        d.stop()


def test_sql_command_line(server):
    r = server.cli("sql", "bank", "-c", "SELECT count(*) AS n FROM accounts", "--json")
    assert r.code == 0, r.err
    assert r.json["results"][0]["rows"] == [[200]]
    r = server.cli("sql", "bank", "-c", "SELECT * FROM nope")
    assert r.code == 2 and "no such table: nope" in r.err
    import subprocess
    p = subprocess.run([PY, "-m", "bastion", "--config", str(server.config), "sql", "bank"],
                       input="BEGIN;\nCREATE TABLE s(a);\nINSERT INTO s VALUES (1);\nROLLBACK;\n.tables\n",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "rolled back" in p.stdout and " s " not in p.stdout
    p = subprocess.run([PY, "-m", "bastion", "passwd", "--password-stdin", "--json"], input="short\n",
                       capture_output=True, text=True)
    assert p.returncode == 3 and "too short" in p.stderr


def test_restore_replace_closes_and_reopens_the_servers_connections(server, tmp_path):
    con = alice(server)
    con.execute("CREATE TABLE r(a)")
    con.execute("INSERT INTO r VALUES (1)")
    con.commit()
    r = server.cli("backup", "bank", "--json")
    assert r.code == 0, r.err
    bid = r.json["backup"]
    con.execute("INSERT INTO r VALUES (2)")       # an open transaction blocks the swap
    # The module's server rolls back a transaction idle for 2 s, and a CLI run on a loaded machine
    # can take longer than that: keep the transaction in use while the refused restore runs.
    done = threading.Event()

    def keep_busy() -> None:
        while not done.wait(0.5):
            con.execute("SELECT count(*) FROM r")
    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        r = server.cli("restore", bid, "--replace", "--json")
    finally:
        done.set()
        busy.join()
    try:
        assert r.code == 2 and "open SQL transaction" in r.err, r.err
        con.commit()
        r = server.cli("restore", bid, "--replace", "--json")
        assert r.code == 0, r.err
        assert con.execute("SELECT a FROM r").fetchall() == [(1,)]
    finally:
        con.close()


def test_openapi_fuzzing_finds_no_server_error(server):
    """schemathesis generates requests from the daemon's own OpenAPI description (valid and
    invalid ones) for the SQL and read-only endpoints: the daemon must never answer 5xx."""
    import shutil
    import subprocess
    st = shutil.which("schemathesis", path=str(__import__("pathlib").Path(PY).parent))
    assert st, "schemathesis is not installed: run `make setup`"
    p = subprocess.run([st, "run", f"http://127.0.0.1:{server.port}/openapi.json", "--checks", "not_a_server_error",
                        "-H", f"Authorization: Bearer {server.token}", "--max-examples", "15", "--seed", "1",
                        "--include-path-regex", "/v1/(sql|health|status)",
                        "--exclude-path-regex", "/v1/health/(active|standby)"],   # 503 is their answer
                       capture_output=True, text=True, timeout=300, cwd=server.config.parent)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout.split("Test cases:")[-1], p.stdout[-1500:]
