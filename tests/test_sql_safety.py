"""The SQL server's safety: what a user may do to the daemon, to other users and to itself.

Every test runs against a real daemon (its own process) through the HTTP API or the
DB-API driver, as a read-only user (bob), a read-write user (alice) and the admin.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import pytest

import bastion.client as bc
from bastion.sql.users import hash_password
from support import DaemonProc, free_port, write_config

ALICE_PW, BOB_PW = "alice-secret-1", "bob-secret-22"

# pragmas that change the process or the connection for whoever uses it next: refused to everyone
STICKY = {
    "hard_heap_limit": "300000", "soft_heap_limit": "300000", "cache_size": "5", "busy_timeout": "1",
    "ignore_check_constraints": "ON", "schema_version": "1", "writable_schema": "ON", "journal_mode": "DELETE",
    "synchronous": "OFF", "locking_mode": "EXCLUSIVE", "query_only": "OFF", "temp_store": "MEMORY",
    "recursive_triggers": "ON", "reverse_unordered_selects": "ON", "case_sensitive_like": "ON",
    "automatic_index": "OFF", "legacy_alter_table": "ON", "count_changes": "ON", "threads": "4",
    "mmap_size": "1000000", "cache_spill": "OFF", "secure_delete": "ON", "trusted_schema": "ON",
    "foreign_keys": "ON", "read_uncommitted": "ON", "max_page_count": "10", "analysis_limit": "5",
    "cell_size_check": "ON", "full_column_names": "ON", "short_column_names": "OFF",
    "empty_result_callbacks": "ON", "wal_autocheckpoint": "1", "journal_size_limit": "1", "fullfsync": "ON",
    "checkpoint_fullfsync": "ON", "auto_vacuum": "FULL", "page_size": "512", "shrink_memory": None,
    "wal_checkpoint": None, "optimize": None, "incremental_vacuum": None,
}


def _config(tmp_path, extra_sql: str = "", idle: str = "5s", busy: str = "10s") -> DaemonProc:
    import sqlite3
    app = tmp_path / "app"
    app.mkdir()
    db = app / "shop.db"
    con = sqlite3.connect(db)
    con.executescript("PRAGMA journal_mode=WAL;"
                      "CREATE TABLE item(id INTEGER PRIMARY KEY, qty INTEGER NOT NULL CHECK (qty >= 0));"
                      "CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT);"
                      "CREATE TRIGGER item_audit AFTER INSERT ON item BEGIN "
                      "INSERT INTO audit(what) VALUES ('a'); INSERT INTO audit(what) VALUES ('b'); END;"
                      "INSERT INTO item(qty) VALUES (1), (2), (3);")
    con.close()
    port = free_port()
    extra = (f"[sql]\nidle_timeout = \"{idle}\"\nbusy_timeout = \"{busy}\"\n{extra_sql}\n"
             f"[users.alice]\npassword_hash = \"{hash_password(ALICE_PW)}\"\naccess = {{ shop = \"read-write\" }}\n\n"
             f"[users.bob]\npassword_hash = \"{hash_password(BOB_PW)}\"\naccess = {{ \"*\" = \"read-only\" }}\n")
    cfg = write_config(tmp_path, port, {"shop": [str(db)]}, extra=extra)
    return DaemonProc(cfg, port, tmp_path / "var").start()


@pytest.fixture(autouse=True)
def _close_http():
    global _HTTP
    _HTTP = httpx.Client(timeout=60)
    yield
    _HTTP.close()               # its connections to this test's daemon, before the daemon stops


@pytest.fixture
def server(tmp_path):
    d = _config(tmp_path)
    yield d
    d.stop()


def basic(user: str, pw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


USERS = {"alice": basic("alice", ALICE_PW), "bob": basic("bob", BOB_PW)}


_HTTP = httpx.Client(timeout=60)      # one client: a new one per request costs more than the request


def sql(d: DaemonProc, who: str, *statements, path: str = "", **body) -> httpx.Response:
    headers = USERS.get(who, {"Authorization": f"Bearer {d.token}"})
    return _HTTP.post(f"http://127.0.0.1:{d.port}/v1/sql/shop{path}", headers=headers,
                      json={"statements": list(statements), **body})


def connect(d: DaemonProc, user: str = "alice", pw: str = ALICE_PW, **kw) -> bc.Connection:
    return bc.connect(f"bastion://{user}@127.0.0.1:{d.port}/shop", password=pw, **kw)


# -- 1. pragmas, attach, file system ---------------------------------------------------------

def test_no_user_can_change_process_or_connection_settings(server):
    for name, value in STICKY.items():
        stmt = f"PRAGMA {name}" + ("" if value is None else f" = {value}")
        for who in ("bob", "alice", "admin"):
            r = sql(server, who, stmt)
            assert r.status_code == 403, (who, stmt, r.status_code, r.text)
            assert name in r.json()["error"]["message"], r.text
        # the table-valued form is the same pragma to the authorizer
        if value is not None and name not in ("shrink_memory",):
            r = sql(server, "bob", f"SELECT * FROM pragma_{name}({value})")
            assert r.status_code in (400, 403), (name, r.text)
    # the daemon still answers everyone, and still enforces CHECK constraints
    assert sql(server, "bob", "SELECT count(*) FROM item").json()["results"][0]["rows"] == [[3]]
    r = sql(server, "alice", "INSERT INTO item(qty) VALUES (-1)")
    assert r.status_code == 400 and "CHECK" in r.text
    assert server.api("GET", "/v1/status").status_code == 200


def test_queries_of_state_are_allowed_and_transaction_pragmas_only_for_writers(server):
    for stmt in ("PRAGMA user_version", "PRAGMA table_info(item)", "PRAGMA main.index_list(item)",
                 "SELECT name FROM pragma_table_info('item')", "PRAGMA foreign_key_check", "PRAGMA quick_check",
                 "PRAGMA cache_size", "PRAGMA journal_mode", "PRAGMA compile_options", "PRAGMA table_list"):
        r = sql(server, "bob", stmt)
        assert r.status_code == 200, (stmt, r.text)
    assert sql(server, "bob", "PRAGMA user_version = 7").status_code == 403
    assert sql(server, "bob", "PRAGMA defer_foreign_keys = ON").status_code == 403
    assert sql(server, "alice", "PRAGMA defer_foreign_keys = ON", "PRAGMA user_version = 7").status_code == 200
    assert sql(server, "bob", "PRAGMA user_version").json()["results"][0]["rows"] == [[7]]


def test_files_of_the_server_are_out_of_reach(server, tmp_path):
    target = tmp_path / "stolen.db"
    for who in ("bob", "alice", "admin"):
        for stmt in (f"ATTACH '{target}' AS x", "DETACH main", f"VACUUM INTO '{target}'",
                     f"SELECT load_extension('{tmp_path}/evil')", "SELECT fts3_tokenizer('simple')",
                     f"SELECT readfile('{server.config}')", f"SELECT writefile('{target}', 'x')"):
            r = sql(server, who, stmt)
            assert r.status_code in (400, 403), (who, stmt, r.text)
    assert not target.exists()
    # refused by the authorizer itself, not by chance (an unknown function, a missing file)
    r = sql(server, "alice", "SELECT fts3_tokenizer('simple')")
    assert r.status_code == 403 and "fts3_tokenizer" in r.json()["error"]["message"], r.text


# -- 2. pooled connections are handed out in a known state ----------------------------------

_VARYING = {"data_version", "page_count", "freelist_count", "schema_version", "integrity_check", "quick_check",
            "foreign_key_check", "function_list", "module_list", "compile_options", "collation_list",
            "pragma_list", "table_list", "database_list"}


def _settings(d: DaemonProc, who: str, names: list[str]) -> dict[str, object]:
    out = {}
    for n in names:
        r = sql(d, who, f"PRAGMA {n}")
        out[n] = r.json()["results"][0]["rows"] if r.status_code == 200 else r.status_code
    return out


def _trial_values(name: str) -> list[str | None]:
    return [None, "ON", "1", "-5", "MEMORY", "item"]


def test_pooled_connections_never_carry_one_users_settings_to_another(server):
    names = [r[0] for r in sql(server, "admin", "PRAGMA pragma_list").json()["results"][0]["rows"]]
    assert "ignore_check_constraints" in names and len(names) > 50
    watched = [n for n in names if n not in _VARYING]
    before = {who: _settings(server, who, watched) for who in ("admin", "bob")}
    # every pragma SQLite knows, with every kind of value, in a batch and in an open transaction
    for who in ("alice", "bob"):
        for n in names:
            for v in _trial_values(n):
                stmt = f"PRAGMA {n}" + ("" if v is None else f" = {v}")
                sql(server, who, stmt)
                t = sql(server, who, stmt, path="/transactions")
                if t.status_code == 200:
                    tid = t.json()["transaction"]
                    assert sql(server, who, path=f"/transactions/{tid}/commit").status_code == 200
    # temp objects that would shadow or watch the real tables
    for stmts in (["CREATE TEMP TABLE item(id, qty)", "INSERT INTO temp.item VALUES (99, -1)"],
                  ["CREATE TEMP VIEW audit AS SELECT 'fake' AS what"],
                  ["CREATE TEMP TRIGGER spy AFTER INSERT ON main.item BEGIN SELECT 1; END"]):
        for who in ("alice", "bob", "admin"):
            sql(server, who, *stmts)
            t = sql(server, who, *stmts, path="/transactions")
            if t.status_code == 200:
                tid = t.json()["transaction"]
                sql(server, who, path=f"/transactions/{tid}/commit")
    after = {who: _settings(server, who, watched) for who in ("admin", "bob")}
    for who in after:
        changed = {n: (before[who][n], after[who][n]) for n in watched if before[who][n] != after[who][n]}
        assert not changed, (who, changed)
    # what the settings protect still holds for the next user of each pooled connection
    for who in ("admin", "alice"):
        r = sql(server, who, "INSERT INTO item(qty) VALUES (-1)")
        assert r.status_code == 400 and "CHECK" in r.text, (who, r.text)
    for who in ("admin", "bob"):
        res = sql(server, who, "SELECT count(*) FROM temp.sqlite_schema", "SELECT min(qty) FROM item",
                  "SELECT count(*) FROM audit WHERE what = 'fake'").json()["results"]
        assert [x["rows"][0][0] for x in res] == [0, 1, 0], (who, res)


# -- 3. a bad statement is the statement's error, never the connection's ---------------------

def test_bad_parameters_and_statements_keep_the_transaction_usable(server):
    con = connect(server)
    con.execute("INSERT INTO item(qty) VALUES (10)")          # a transaction that holds the write lock
    assert con.in_transaction
    bad = [("INSERT INTO item(qty) VALUES (:q)", {}),            # a missing :name
           ("INSERT INTO item(qty) VALUES (:q)", {"x": 1}),
           ("INSERT INTO item(qty) VALUES (?)", ()),             # too few
           ("INSERT INTO item(qty) VALUES (?)", (1, 2)),         # too many
           ("INSERT INTO item(qty) VALUES (?)", {"q": 1}),       # names for ?
           ("SELECT 1; DELETE FROM item", None),                 # two statements
           ("UPDATE item SET qty = 0; DELETE FROM item", None),
           ("DELETE FROM audit; SELECT 1", None)]
    for stmt, params in bad:
        with pytest.raises(bc.ProgrammingError):
            con.execute(stmt, params)
        assert con.in_transaction, stmt
    with pytest.raises(bc.ProgrammingError, match="one statement"):
        con.executemany("INSERT INTO item(qty) VALUES (?); DELETE FROM item", [(1,), (2,)])
    con.execute("INSERT INTO item(qty) VALUES (11)")          # the same transaction goes on
    con.commit()
    check = connect(server, "bob", BOB_PW, autocommit=True)
    assert check.execute("SELECT qty FROM item ORDER BY id").fetchall() == [(1,), (2,), (3,), (10,), (11,)]
    assert check.execute("SELECT count(*) FROM audit").fetchone() == (10,)     # 2 per item
    # a trailing semicolon or comment is still one statement
    assert check.execute("SELECT 1; -- done\n").fetchone() == (1,)
    assert check.execute("/* x */ SELECT 2 ;;").fetchone() == (2,)
    # the write lock went with the commit: another writer is not kept waiting
    other = connect(server, autocommit=True)
    t0 = time.monotonic()
    other.execute("INSERT INTO item(qty) VALUES (12)")
    assert time.monotonic() - t0 < 5
    for c in (con, check, other):
        c.close()


def test_every_error_of_the_api_is_a_client_error_and_leaves_no_transaction(server):
    bodies = ({"sql": "SELECT :a", "params": {}}, {"sql": "SELECT :a", "params": {"b": 1}},
              {"sql": "SELECT ?", "many": [[1], []]}, {"sql": "SELECT 1; SELECT 2"},
              {"sql": "INSERT INTO item(qty) VALUES (:q)", "many": [{"q": 1}, {}]})
    for body in bodies:
        r = sql(server, "alice", body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    t = sql(server, "alice", path="/transactions", write=True)
    tid = t.json()["transaction"]
    for body in bodies:
        r = sql(server, "alice", body, path=f"/transactions/{tid}")
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    # the transaction is still there and still ours; nothing of the failed statements stayed
    r = sql(server, "alice", "SELECT count(*) FROM item", path=f"/transactions/{tid}")
    assert r.status_code == 200 and r.json()["results"][0]["rows"] == [[3]]
    assert sql(server, "alice", path=f"/transactions/{tid}/rollback").status_code == 200
    assert server.api("GET", "/v1/status").json()["sql"]["open_transactions"] == []


# -- 4. resource limits ----------------------------------------------------------------------

FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def test_a_statement_is_interrupted_at_the_time_limit_and_the_transaction_goes_on(tmp_path):
    d = _config(tmp_path, 'statement_timeout = "1s"\n')
    try:
        for who in ("bob", "admin"):
            r = sql(d, who, FOREVER)
            assert r.status_code == 400 and "statement_timeout" in r.text, r.text
        con = connect(d)
        con.execute("INSERT INTO item(qty) VALUES (7)")
        with pytest.raises(bc.OperationalError, match="interrupted"):
            con.execute(FOREVER)
        con.execute("INSERT INTO item(qty) VALUES (8)")
        con.commit()
        assert con.execute("SELECT count(*) FROM item").fetchone() == (5,)
        con.close()
    finally:
        d.stop()


def test_a_statement_stops_when_its_client_goes_away(tmp_path):
    d = _config(tmp_path, 'statement_timeout = "120s"\n', idle="60s", busy="30s")
    try:
        tid = sql(d, "alice", "INSERT INTO item(qty) VALUES (9)", path="/transactions").json()["transaction"]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"http://127.0.0.1:{d.port}/v1/sql/shop/transactions/{tid}", headers=USERS["alice"],
                       json={"statements": [FOREVER]}, timeout=1.0)
        # the statement was interrupted and its orphaned transaction rolled back: the write
        # lock is free long before the statement limit or the idle timeout
        r = sql(d, "admin", "INSERT INTO item(qty) VALUES (10)")
        assert r.status_code == 200, r.text
        assert sql(d, "bob", "SELECT qty FROM item ORDER BY id").json()["results"][0]["rows"] == \
            [[1], [2], [3], [10]]
        assert sql(d, "alice", "SELECT 1", path=f"/transactions/{tid}").status_code == 410
    finally:
        d.stop()


def _hang_up_after_sending(d: DaemonProc, path: str, body: dict, who: str = "admin") -> socket.socket:
    """A raw HTTP request whose answer nobody will read: the caller closes the socket."""
    data = json.dumps(body).encode()
    auth = USERS[who]["Authorization"] if who in USERS else f"Bearer {d.token}"
    s = socket.create_connection(("127.0.0.1", d.port))
    s.sendall(f"POST /v1/sql/shop{path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_writes_waiting_for_the_lock_never_run_once_their_clients_are_gone(tmp_path):
    """Requests queued behind a write transaction (on the write lock, or for one of the SQL
    threads) whose clients hang up are dropped: they free their threads at once, and none of
    them runs when the lock comes free - a batch, a BEGIN IMMEDIATE, a write inside an open
    transaction (which is rolled back)."""
    d = _config(tmp_path, "threads = 2\n", idle="60s", busy="40s")
    try:
        holder = sql(d, "admin", path="/transactions", write=True).json()["transaction"]
        reader = sql(d, "alice", "SELECT count(*) FROM item", path="/transactions").json()["transaction"]
        socks = [_hang_up_after_sending(d, "", {"statements": [f"INSERT INTO item(qty) VALUES ({100 + i})"]})
                 for i in range(4)]     # 2 wait for the lock on both SQL threads, 2 for a thread
        socks.append(_hang_up_after_sending(d, "/transactions", {"statements": [
            "INSERT INTO item(qty) VALUES (200)"], "write": True}))
        socks.append(_hang_up_after_sending(d, f"/transactions/{reader}", {"statements": [
            "INSERT INTO item(qty) VALUES (300)"]}, who="alice"))
        time.sleep(1.0)                 # all of them are waiting now
        for s in socks:
            s.close()
        # the threads are free again while the holder still has the lock: a read answers
        r = _HTTP.post(f"http://127.0.0.1:{d.port}/v1/sql/shop", headers=USERS["bob"],
                       json={"statements": ["SELECT count(*) FROM item"]}, timeout=5)
        assert r.status_code == 200 and r.json()["results"][0]["rows"] == [[3]], r.text
        assert sql(d, "admin", "INSERT INTO item(qty) VALUES (7)", path=f"/transactions/{holder}").status_code == 200
        assert sql(d, "admin", path=f"/transactions/{holder}/commit").status_code == 200
        time.sleep(1.0)                 # whatever was still pending would have run by now
        assert sql(d, "bob", "SELECT qty FROM item ORDER BY id").json()["results"][0]["rows"] == \
            [[1], [2], [3], [7]]
        # the transaction whose client left mid-request is over; no transaction, lock or slot is left
        assert sql(d, "alice", "SELECT 1", path=f"/transactions/{reader}").status_code == 410
        assert d.api("GET", "/v1/status").json()["sql"]["open_transactions"] == []
        r = sql(d, "alice", "INSERT INTO item(qty) VALUES (8)")
        assert r.status_code == 200, r.text
    finally:
        d.stop()


def test_results_requests_and_transactions_per_user_are_bounded(tmp_path):
    d = _config(tmp_path, "max_result_rows = 1000\nmax_result_bytes = 200000\nmax_request_bytes = 100000\n"
                          "max_transactions_per_user = 2\n")
    try:
        rows = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {n}) SELECT {col} FROM c"
        assert len(sql(d, "bob", rows.format(n=1000, col="x")).json()["results"][0]["rows"]) == 1000
        for query in (rows.format(n=1001, col="x"), rows.format(n=100, col="printf('%.5000c', 'x')"),
                      rows.format(n=10**9, col="x")):
            r = sql(d, "bob", query)
            assert r.status_code == 413 and "max_result" in r.text, r.text
        # a write whose RETURNING rows are over the limit takes its changes back with it
        tid = sql(d, "alice", path="/transactions").json()["transaction"]
        r = sql(d, "alice", rows.format(n=1500, col="x").replace("SELECT x FROM c",
                "INSERT INTO item(qty) SELECT x FROM c RETURNING id"), path=f"/transactions/{tid}")
        assert r.status_code == 413, r.text
        r = sql(d, "alice", "SELECT count(*) FROM item", path=f"/transactions/{tid}")
        assert r.json()["results"][0]["rows"] == [[3]], r.text
        assert sql(d, "alice", path=f"/transactions/{tid}/rollback").status_code == 200
        big = "x" * 150_000
        r = sql(d, "alice", {"sql": "SELECT length(?)", "params": [big]})
        assert r.status_code == 413 and "max_request_bytes" in r.text, r.text
        # one user cannot take every transaction slot
        tids = [sql(d, "bob", path="/transactions").json()["transaction"] for _ in range(2)]
        r = sql(d, "bob", path="/transactions")
        assert r.status_code == 503 and "max_transactions_per_user" in r.text, r.text
        assert sql(d, "alice", path="/transactions").status_code == 200
        for t in tids:
            assert sql(d, "bob", path=f"/transactions/{t}/rollback").status_code == 200
        assert sql(d, "bob", path="/transactions").status_code == 200
        assert sql(d, "bob", "SELECT count(*) FROM item").status_code == 200
    finally:
        d.stop()


def test_an_abandoned_writer_never_outlasts_the_busy_timeout_of_the_next(tmp_path):
    d = _config(tmp_path, idle="60s", busy="6s")
    try:
        # a client takes the write lock and vanishes without a word
        assert sql(d, "alice", path="/transactions", write=True).status_code == 200
        r = sql(d, "admin", "INSERT INTO item(qty) VALUES (4)")
        assert r.status_code == 200, r.text
    finally:
        d.stop()


# -- 5. password guessing ----------------------------------------------------------------------

def _login(d: DaemonProc, user: str, pw: str) -> httpx.Response:
    return _HTTP.post(f"http://127.0.0.1:{d.port}/v1/sql/shop", headers=basic(user, pw),
                      json={"statements": ["SELECT 1"]})


def test_unknown_user_names_cost_as_much_as_wrong_passwords(server):
    def timed(user: str) -> float:
        t0 = time.perf_counter()
        assert _login(server, user, "wrong-password").status_code == 401
        return time.perf_counter() - t0
    known = sorted(timed(u) for u in ("alice", "bob", "alice", "bob"))
    unknown = sorted(timed(f"nobody{i}") for i in range(4))
    # the same scrypt either way: a generous margin, only the relation is checked (scrypt ~ 50 ms)
    assert unknown[1] > known[1] * 0.4, (known, unknown)


def test_failed_logins_are_limited_per_client_and_user(server):
    for _ in range(5):
        assert _login(server, "alice", "guess").status_code == 401
    r = _login(server, "alice", ALICE_PW)      # even the right password waits: no more guesses
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0, r.text
    assert _login(server, "bob", BOB_PW).status_code == 200    # another user is not locked out
    # many names from one client: refused as a whole past the per-client limit
    codes = [_login(server, f"name{i}", "guess").status_code for i in range(20)]
    assert codes[-1] == 429 and 401 in codes, codes
    assert server.api("GET", "/v1/status").status_code == 200   # the admin token is not affected


# -- 6. SQL load never starves the admin API ---------------------------------------------------

def test_status_answers_while_sql_writers_queue_on_the_write_lock(tmp_path):
    d = _config(tmp_path, idle="60s", busy="40s")
    try:
        holder = sql(d, "admin", path="/transactions", write=True).json()["transaction"]
        done: list[int] = []

        def writer() -> None:       # waits for the write lock the holder keeps (a bounded load)
            with httpx.Client(timeout=60) as c:
                r = c.post(f"http://127.0.0.1:{d.port}/v1/sql/shop", headers={"Authorization": f"Bearer {d.token}"},
                           json={"statements": ["INSERT INTO item(qty) VALUES (1)"]})
                done.append(r.status_code)
        threads = [threading.Thread(target=writer) for _ in range(60)]
        for t in threads:
            t.start()
        time.sleep(1.5)             # every writer is queued by now
        took = []
        for _ in range(5):
            t0 = time.monotonic()
            assert _HTTP.get(f"http://127.0.0.1:{d.port}/v1/status",
                             headers={"Authorization": f"Bearer {d.token}"}).status_code == 200
            took.append(time.monotonic() - t0)
        assert max(took) < 1.0, took
        assert len(done) == 0       # the load was really there while status answered
        r = sql(d, "admin", path=f"/transactions/{holder}/rollback")
        assert r.status_code in (200, 410), r.text       # 410: the idle timeout was first
        for t in threads:
            t.join(90)
        assert done.count(200) == 60, done
    finally:
        d.stop()


# -- 7. plain HTTP beyond loopback ---------------------------------------------------------------

def test_a_network_address_without_tls_starts_with_a_loud_warning(tmp_path):
    d = _config(tmp_path)
    d.stop()
    assert "WITHOUT TLS" not in d.log.read_text()      # loopback: no warning
    text = d.config.read_text().replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:')
    d.config.write_text(text)
    d.start()
    try:
        log = d.log.read_text()
        assert "WITHOUT TLS" in log and "0.0.0.0" in log and "tls_cert" in log, log
    finally:
        d.stop()


# -- 8. rowcount, lastrowid, executemany ---------------------------------------------------------

def test_rowcount_and_lastrowid_follow_sqlite3(server):
    con = connect(server)
    cur = con.cursor()
    assert cur.lastrowid is None
    cur.execute("INSERT INTO item(qty) VALUES (5)")     # the trigger adds two audit rows: not counted
    assert cur.rowcount == 1 and cur.lastrowid == 4
    cur.execute("UPDATE item SET qty = qty + 1 WHERE id <= 2")
    assert cur.rowcount == 2 and cur.lastrowid == 4     # unchanged by a non-INSERT
    cur.execute("SELECT * FROM item")
    assert cur.rowcount == -1 and cur.lastrowid == 4
    cur.execute("DELETE FROM item WHERE id = 99")
    assert cur.rowcount == 0
    cur.executemany("INSERT INTO item(qty) VALUES (?)", [(1,), (2,), (3,)])
    assert cur.rowcount == 3 and cur.lastrowid == 7
    con.commit()
    # another user's cursor on the same pooled connection never sees that rowid
    bob = connect(server, "bob", BOB_PW, autocommit=True)
    other = bob.cursor()
    other.execute("SELECT count(*) FROM item")
    assert other.lastrowid is None and other.rowcount == -1
    r = sql(server, "bob", "SELECT 1").json()["results"][0]
    assert r["lastrowid"] is None and r["rowcount"] == -1
    con.close()
    bob.close()


def test_executemany_with_returning_runs_every_row_or_none(server):
    con = connect(server)
    cur = con.cursor()
    cur.executemany("INSERT INTO item(qty) VALUES (?) RETURNING id", [(10,), (11,), (12,)])
    assert cur.rowcount == 3
    assert con.execute("SELECT qty FROM item WHERE id > 3 ORDER BY id").fetchall() == [(10,), (11,), (12,)]
    with pytest.raises(bc.IntegrityError):              # the third row breaks the CHECK
        cur.executemany("INSERT INTO item(qty) VALUES (?) RETURNING id", [(20,), (21,), (-1,)])
    assert con.in_transaction
    assert con.execute("SELECT count(*) FROM item WHERE qty >= 20").fetchone() == (0,)
    con.commit()
    r = sql(server, "admin", {"sql": "UPDATE item SET qty = ? WHERE id = ? RETURNING qty",
                              "many": [[30, 1], [31, 2], [-5, 3]]})
    assert r.status_code == 400
    assert sql(server, "bob", "SELECT qty FROM item WHERE id <= 3").json()["results"][0]["rows"] == [[1], [2], [3]]
    con.close()
