"""Change capture (issue 4): triggers in the application's database, applied to a copy.

The application side is always a separate process using Python's stdlib sqlite3
(started with ``python -I``, it cannot import Bastion and checks it did not load
apsw): the triggers must work with no Bastion code in the writer. Bastion's side
(install, read, apply, refresh, remove) runs here through apsw, the daemon's library.
Copies are seeded with SQLite's backup API (a page copy), as a real seed would be.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bastion import capture as cap
from bastion.errors import StateConflict
from support.data import content, integrity

APP = r'''
import pickle, sqlite3, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
con = None
while True:
    try:
        cmd, arg = pickle.load(inp)
    except EOFError:
        break
    try:
        res = None
        if cmd == "open":
            if con is not None:
                con.close()
            con = sqlite3.connect(arg, isolation_level=None, timeout=30)
            con.execute("PRAGMA trusted_schema = OFF")   # the strictest setting an application may use
        elif cmd == "script":
            con.executescript(arg)
        elif cmd == "txn":
            stmts, commit = arg
            con.execute("BEGIN IMMEDIATE")
            try:
                res = [con.execute(s, p).rowcount for s, p in stmts]
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT" if commit else "ROLLBACK")
        elif cmd == "many":
            con.executemany(*arg)
        elif cmd == "query":
            res = con.execute(*arg).fetchall()
        elif cmd == "modules":
            res = sorted(m for m in sys.modules if m.split(".")[0] in ("apsw", "bastion"))
        pickle.dump(("ok", res), out)
    except Exception as e:
        pickle.dump(("err", f"{type(e).__name__}: {e}"), out)
    out.flush()
'''


class AppError(Exception):
    pass


class App:
    """An unmodified application: stdlib sqlite3 in its own process, driven over a pipe."""

    def __init__(self, path: Path | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", APP], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        if path is not None:
            self.open(path)

    def call(self, cmd: str, arg: Any = None) -> Any:
        assert self.proc.stdin and self.proc.stdout
        pickle.dump((cmd, arg), self.proc.stdin)
        self.proc.stdin.flush()
        status, res = pickle.load(self.proc.stdout)
        if status != "ok":
            raise AppError(res)
        return res

    def open(self, path: Path) -> None:
        self.call("open", str(path))

    def sql(self, script: str) -> None:
        self.call("script", script)

    def txn(self, *stmts: tuple[str, tuple], commit: bool = True) -> list[int]:
        return self.call("txn", ([(s, tuple(p)) for s, p in stmts], commit))

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.call("query", (sql, params))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.call("modules") == [], "the application process loaded Bastion's modules"
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc.wait(10)


@pytest.fixture
def app():
    a = App()
    yield a
    a.close()


# -- helpers ----------------------------------------------------------------------------

def new_db(path: Path, schema: str = "") -> Path:
    con = apsw.Connection(str(path))
    if schema:
        con.execute(schema).fetchall()     # apsw runs later statements only as rows are consumed
    con.close()
    return path


def seed(src: Path, dst: Path, origin: str = "A", copy_origin: str = "B") -> int:
    """Make ``dst`` a copy of ``src`` (backup API), with its own capture, positioned at the copy."""
    s = apsw.Connection(str(src))
    d = apsw.Connection(str(dst))
    try:
        s.execute("BEGIN")
        pos = cap.position(s).seq
        with d.backup("main", s, "main") as b:
            b.step(-1)
        s.execute("COMMIT")
    finally:
        s.close()
        d.close()
    cap.remove(dst)
    cap.install(dst, copy_origin)
    cap.set_applied(dst, origin, pos)
    return pos


def ship(src: Path, dst: Path, origin: str = "A", chunk: int = 1000) -> int:
    """Read everything new on ``src`` and apply it to ``dst``; returns how many entries moved."""
    after = cap.applied_position(dst, origin) or 0
    moved = 0
    while True:
        batch = cap.read_changes(src, after, chunk)
        if not batch:
            return moved
        cap.apply(dst, batch, origin)
        after = batch[-1].seq
        moved += len(batch)


def schema_sql(path: Path) -> list[tuple]:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return sorted(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema "
                                  "WHERE substr(name, 1, 9) != '_bastion_' AND name NOT LIKE 'sqlite%'").fetchall())
    finally:
        con.close()


def bastion_objects(path: Path) -> list[str]:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE name LIKE '%bastion%'")]
    finally:
        con.close()


def shape_count(path: Path) -> int:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return con.execute("SELECT count(*) FROM _bastion_tables").fetchone()[0]
    finally:
        con.close()


SHAPES = """
CREATE TABLE plain(a, b, c);
CREATE TABLE alias(id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB, n NUMERIC);
CREATE TABLE auto(id INTEGER PRIMARY KEY AUTOINCREMENT, v);
CREATE TABLE comp(a TEXT, b INTEGER, v, PRIMARY KEY(a, b));
CREATE TABLE textkey(k TEXT PRIMARY KEY, v);
CREATE TABLE wr(k1, k2 TEXT COLLATE NOCASE, v, PRIMARY KEY(k1, k2)) WITHOUT ROWID;
CREATE TABLE wr1(k INTEGER PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE "odd ""name"".x; DROP"("weird col", "rowid" TEXT, "Select", "_rowid_", v);
CREATE TABLE gen(a INTEGER, b AS (a * 2), c, d AS (c || 'x') STORED);
CREATE TABLE st(id INTEGER PRIMARY KEY, t TEXT, r REAL, i INTEGER, b BLOB, x ANY) STRICT;
CREATE TABLE "Ünïcødé ☃"("çol ☃" PRIMARY KEY, v) WITHOUT ROWID;
"""

INT64 = [0, 1, -1, 2**63 - 1, -2**63, 2**53 + 1, -(2**31)]
FLOATS = [0.1, 1.0, -0.0, 0.0, 1e308, -1e308, 5e-324, 2.2250738585072014e-308, math.pi, 1 / 3, 123456789.12345678,
          math.inf, -math.inf, math.nan, 2.0**63, 9007199254740993.0]
TEXTS = ["", "a\x00b", "\x00", "日本語", "emoji \U0001F600", "\ufeffbom", "'quote\" \\", "x" * 1_000_000, "1e3", "12"]
BLOBS = [b"", b"\x00", bytes(range(256)), os.urandom(2_000_000), b"text"]
EDGE = [None, *INT64, *FLOATS, *TEXTS, *BLOBS]


# -- every table shape -------------------------------------------------------------------

def test_every_table_shape_round_trips(tmp_path: Path, app: App) -> None:
    a, b = new_db(tmp_path / "a.db", SHAPES), tmp_path / "b.db"
    res = cap.install(a, "A")
    assert res.uncaptured == {}
    assert len(res.tables) == 11
    seed(a, b)
    app.open(a)
    odd = '"odd ""name"".x; DROP"'
    stmts = []
    for i, v in enumerate(EDGE):
        stmts += [("INSERT INTO plain VALUES (?, ?, ?)", (v, i, v)),
                  ("INSERT INTO alias(name, score, data, n) VALUES (?, ?, ?, ?)", (v, v, v, v)),
                  ("INSERT INTO auto(v) VALUES (?)", (v,)),
                  ("INSERT INTO comp VALUES (?, ?, ?)", (v if not isinstance(v, bytes) else None, i, v)),
                  ("INSERT INTO textkey VALUES (?, ?)", (f"k{i}", v)),
                  ("INSERT INTO wr VALUES (?, ?, ?)", (i, f"K{i}", v)),
                  ("INSERT INTO wr1 VALUES (?, ?)", (i, v)),
                  (f"INSERT INTO {odd} VALUES (?, ?, ?, ?, ?)", (v, f"r{i}", v, i, v)),
                  ("INSERT INTO gen(a, c) VALUES (?, ?)", (i, v)),
                  ('INSERT INTO "Ünïcødé ☃" VALUES (?, ?)', (f"ü{i}", v))]
        if isinstance(v, float):
            stmts.append(("INSERT INTO st(r, x) VALUES (?, ?)", (v, v)))
        elif isinstance(v, int):
            stmts.append(("INSERT INTO st(i, r, x) VALUES (?, ?, ?)", (v, v, v)))
        elif isinstance(v, str):
            stmts.append(("INSERT INTO st(t, x) VALUES (?, ?)", (v, v)))
        elif isinstance(v, bytes):
            stmts.append(("INSERT INTO st(b, x) VALUES (?, ?)", (v, v)))
    app.txn(*stmts)
    # Text that is not valid UTF-8 (SQLite stores whatever bytes it is given).
    app.sql(f"""INSERT INTO plain VALUES (CAST(x'ff00fe80' AS TEXT), 1, CAST(x'c3' AS TEXT));
               INSERT INTO wr VALUES (CAST(x'fffe' AS TEXT), CAST(x'80' AS TEXT), CAST(x'e282' AS TEXT));
               INSERT INTO {odd}("weird col") VALUES (CAST(x'ed' AS TEXT));""")
    # Updates that move keys, updates that do not, deletes; in every shape.
    app.sql(f"""
        UPDATE alias SET id = id + 1000 WHERE id % 3 = 0;
        UPDATE alias SET name = 'renamed' WHERE id % 3 = 1;
        UPDATE comp SET a = 'moved', b = b + 100 WHERE b % 4 = 0;
        UPDATE textkey SET k = k || '!' WHERE rowid % 2 = 0;
        UPDATE wr SET k2 = lower(k2) WHERE k1 % 2 = 0;
        UPDATE wr SET k1 = k1 + 1000, k2 = 'moved' WHERE k1 % 5 = 1;
        UPDATE wr1 SET k = -k WHERE k % 2 = 1;
        UPDATE {odd} SET "rowid" = 'R', "_rowid_" = -1 WHERE "Select" IS NULL;
        UPDATE {odd} SET oid = oid + 500 WHERE oid % 7 = 0;        -- the real rowid: "rowid" is a column here
        UPDATE gen SET a = a + 1, c = 'c';
        UPDATE plain SET rowid = rowid + 100 WHERE rowid % 6 = 0;
        DELETE FROM plain WHERE rowid % 5 = 0;
        DELETE FROM auto WHERE id > 10;
        DELETE FROM comp WHERE b = 7;
        DELETE FROM wr WHERE k1 = 3;
        DELETE FROM "Ünïcødé ☃" WHERE v IS NULL;
        DELETE FROM st WHERE x IS NULL;
        INSERT OR REPLACE INTO textkey VALUES ('k1', 'replaced'); -- REPLACE deletes the old row: no trigger fires
    """)
    moved = ship(a, b)
    assert moved > 400
    assert content(a) == content(b)
    assert integrity(b) == "ok"
    # The copy's own capture saw none of it.
    assert cap.read_changes(b, 0, 10) == []
    # Types were kept, not just values: spot-check a few.
    con = apsw.Connection(str(b))
    kinds = dict(con.execute("SELECT quote(x), typeof(x) FROM st WHERE x IN (1, 1.0) OR x = '1e3'").fetchall())
    assert con.execute("SELECT count(*) FROM plain WHERE typeof(a) = 'real' AND a = 0.1").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM plain WHERE typeof(c) = 'text' AND c = 'a' || char(0) || 'b'"
                       ).fetchone()[0] == 1
    assert con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'auto'").fetchone()[0] == len(EDGE)
    con.close()
    assert set(kinds.values()) >= {"integer", "real", "text"}


def test_positions_are_gap_free_ordered_and_clocked(tmp_path: Path) -> None:
    a = new_db(tmp_path / "a.db", "PRAGMA journal_mode=WAL; "
                                  "CREATE TABLE t(id INTEGER PRIMARY KEY, w INTEGER, n INTEGER)")
    start = cap.install(a, "A").position
    before_ms = int(time.time() * 1000)
    # Two applications writing at the same time, one row per transaction, each numbering its rows.
    writers = [App(a), App(a)]
    for w, app in enumerate(writers):
        app.sql("PRAGMA synchronous = NORMAL")
        pickle.dump(("many", ("INSERT INTO t(w, n) VALUES (?, ?)", [(w, n) for n in range(400)])), app.proc.stdin)
        app.proc.stdin.flush()
    try:
        for app in writers:
            assert pickle.load(app.proc.stdout) == ("ok", None)
    finally:
        for app in writers:
            app.close()
    changes = cap.read_changes(a, start.seq, 10_000)
    assert [c.seq for c in changes] == list(range(start.seq + 1, start.seq + 801))
    hlcs = [c.hlc for c in changes]
    assert all(x < y for x, y in itertools.pairwise(hlcs)), "hybrid clock must increase with position"
    assert all(before_ms - 5_000 <= c.time * 1000 <= time.time() * 1000 + 5_000 for c in changes)
    assert {c.origin for c in changes} == {"A"}
    for w in (0, 1):   # each writer's commits appear in its own order
        ns = [c.values[2] for c in changes if c.values[1] == w]
        assert ns == list(range(400))
    assert cap.position(a).seq == start.seq + 800


def test_positions_are_the_shared_value_type_and_keep_their_json(tmp_path: Path) -> None:
    """capture's positions are position.Position (ordered, printable), and the JSON that status and
    install results carry keeps its shape: {"seq": ..., "hlc": ...}."""
    import json

    from bastion.position import Position
    a = new_db(tmp_path / "a.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    start = cap.install(a, "A").position
    con = apsw.Connection(str(a))
    con.execute("INSERT INTO t(v) VALUES (1)")
    con.close()
    now = cap.position(a)
    assert isinstance(start, Position) and isinstance(now, Position)
    assert start < now and now == Position(start.seq + 1) and str(now) == f"position {start.seq + 1}"
    st = cap.status(a)["position"]
    assert json.dumps(st) == json.dumps({"seq": now.seq, "hlc": now.hlc}) and Position.from_json(st) == now
    assert cap.install(a, "A").to_dict()["position"] == now.to_json()


def test_capture_is_in_the_application_transaction(tmp_path: Path, app: App) -> None:
    a = new_db(tmp_path / "a.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, u UNIQUE, v)")
    start = cap.install(a, "A").position.seq
    app.open(a)
    app.txn(("INSERT INTO t VALUES (1, 1, 'x')", ()), ("UPDATE t SET v = 'y'", ()), commit=False)
    assert cap.read_changes(a, start) == [] and cap.position(a).seq == start
    # A failed statement rolls back its own trigger rows; a savepoint rollback too.
    app.sql("INSERT INTO t VALUES (1, 1, 'a')")
    with pytest.raises(AppError, match="UNIQUE"):
        app.sql("INSERT INTO t VALUES (2, 2, 'b'), (3, 1, 'dup')")
    app.sql("BEGIN; INSERT INTO t VALUES (4, 4, 'kept'); SAVEPOINT s; INSERT INTO t VALUES (5, 5, 'gone'); "
            "ROLLBACK TO s; COMMIT")
    got = cap.read_changes(a, start)
    assert [(c.seq, c.op, c.values[0]) for c in got] == [(start + 1, "insert", 1), (start + 2, "insert", 4)]
    # An application killed in the middle of its transaction leaves no change behind.
    pickle.dump(("script", "BEGIN; INSERT INTO t VALUES (9, 9, 'never'); SELECT 1"), app.proc.stdin)
    app.proc.stdin.flush()
    assert pickle.load(app.proc.stdout)[0] == "ok"
    app.proc.send_signal(signal.SIGKILL)
    app.proc.wait(10)
    assert [c.seq for c in cap.read_changes(a, start)] == [start + 1, start + 2]
    assert cap.position(a).seq == start + 2


def test_attached_databases_each_log_their_own(tmp_path: Path, app: App) -> None:
    # Like the bank workload: one connection, a second file ATTACHed, one transaction over both.
    bank = new_db(tmp_path / "bank.db", "CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER)")
    audit = new_db(tmp_path / "audit.db", "CREATE TABLE audit(seq INTEGER PRIMARY KEY, amount INTEGER)")
    cap.install(bank, "site")
    cap.install(audit, "site")
    app.open(bank)
    app.sql(f"ATTACH '{audit}' AS audit; BEGIN; INSERT INTO accounts VALUES (1, 100); "
            "INSERT INTO audit.audit(amount) VALUES (100); INSERT INTO audit(amount) VALUES (5); COMMIT")
    assert [(c.table, c.values) for c in cap.read_changes(bank)] == [("accounts", (1, 100))]
    assert [(c.table, c.values) for c in cap.read_changes(audit)] == [("audit", (1, 100)), ("audit", (2, 5))]


# -- apply ---------------------------------------------------------------------------------

def test_apply_is_idempotent_atomic_and_refuses_gaps(tmp_path: Path, app: App) -> None:
    a, b = new_db(tmp_path / "a.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)"), tmp_path / "b.db"
    cap.install(a, "A")
    start = seed(a, b)
    app.open(a)
    app.call("many", ("INSERT INTO t(v) VALUES (?)", [(i,) for i in range(30)]))
    app.sql("UPDATE t SET v = v * 10 WHERE id % 2 = 0; DELETE FROM t WHERE id % 3 = 0")
    ch = cap.read_changes(a, start, 1000)
    first, third = ch[:20], ch[40:]
    r = cap.apply(b, first, "A")
    assert (r.applied, r.skipped, r.position) == (20, 0, start + 20)
    snap = content(b)
    again = cap.apply(b, first, "A")
    assert (again.applied, again.skipped) == (0, 20) and content(b) == snap
    # A batch that skips positions is refused whole: nothing of it lands.
    with pytest.raises(StateConflict, match="missing"):
        cap.apply(b, third, "A")
    assert content(b) == snap and cap.applied_position(b, "A") == start + 20
    # A batch overlapping what was applied applies only the new part.
    r = cap.apply(b, ch[10:40], "A")
    assert (r.applied, r.skipped) == (20, 10)
    cap.apply(b, ch, "A")
    assert content(a) == content(b)
    # A failure inside the batch rolls all of it back (the row change before it too).
    app.sql("INSERT INTO t(v) VALUES ('new')")
    bad = cap.read_changes(a, ch[-1].seq)
    broken = [bad[0]._replace(table="no such table")]
    with pytest.raises(apsw.SQLError):
        cap.apply(b, broken, "A")
    assert cap.applied_position(b, "A") == ch[-1].seq
    cap.apply(b, bad, "A")
    assert content(a) == content(b)


def test_applying_several_files_is_one_unit(tmp_path: Path, app: App) -> None:
    """capture.applying: every file's batch goes in, or none does (an error in the second
    file rolls the first back), and the triggers stay off only while it applies."""
    src = [new_db(tmp_path / f"s{i}.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)") for i in range(2)]
    dst = [tmp_path / f"d{i}.db" for i in range(2)]
    for s_ in src:
        cap.install(s_, "A")
    starts = [seed(s_, d) for s_, d in zip(src, dst)]
    for s_ in src:
        app.open(s_)
        app.call("many", ("INSERT INTO t(v) VALUES (?)", [(i,) for i in range(10)]))
    ch = [cap.read_changes(s_, st) for s_, st in zip(src, starts)]
    cons = [apsw.Connection(str(d)) for d in dst]
    try:
        before = [content(d) for d in dst]
        with pytest.raises(StateConflict, match="missing"), cap.applying(cons, "A") as apply:
            apply(0, ch[0])
            apply(1, ch[1][5:])           # a gap in the second file
        assert [content(d) for d in dst] == before          # the first file's batch rolled back too
        assert [c.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1) for c in cons] == [1, 1]
        with cap.applying(cons, "A") as apply:
            assert apply(0, ch[0]).applied == 10
            assert apply(1, ch[1][:5]).applied == 5
            assert apply(1, ch[1][5:]).applied == 5      # chunks of one file chain inside the unit
    finally:
        for c in cons:
            c.close()
    assert [content(d) for d in dst] == [content(s_) for s_ in src]


def test_applied_changes_are_not_captured_again(tmp_path: Path, app: App) -> None:
    schema = """CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, parent INTEGER REFERENCES orders(id)
                                    ON DELETE CASCADE);
                CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT);
                CREATE TRIGGER audit_orders AFTER INSERT ON orders BEGIN
                    INSERT INTO audit(what) VALUES ('order ' || NEW.id); END;"""
    a, b = new_db(tmp_path / "a.db", schema), tmp_path / "b.db"
    cap.install(a, "A")
    seed(a, b)
    app.open(a)
    app.sql("PRAGMA foreign_keys = ON; INSERT INTO orders VALUES (1, 'x', NULL), (2, 'y', 1), (3, 'z', 2); "
            "DELETE FROM orders WHERE id = 1")
    b_start = cap.position(b).seq
    ship(a, b)
    # The copy's application trigger and cascade did not run again: their effects came as rows.
    assert content(a) == content(b)
    assert len(content(b)["audit"]) == 3 and content(b)["orders"] == []
    assert cap.read_changes(b, b_start) == [] and cap.position(b).seq == b_start
    # A local write on the copy is captured there, as the copy's own origin.
    app.open(b)
    app.sql("INSERT INTO audit(what) VALUES ('local')")
    local = cap.read_changes(b, b_start)
    assert [(c.origin, c.table, c.values[1]) for c in local] == [("B", "audit", "local")]


# -- schema changes --------------------------------------------------------------------------

def test_schema_changes_are_replicated(tmp_path: Path, app: App) -> None:
    a = new_db(tmp_path / "a.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v); "
                                  "CREATE TABLE w(k, j, v, PRIMARY KEY(k, j)) WITHOUT ROWID;")
    b = tmp_path / "b.db"
    cap.install(a, "A")
    seed(a, b)
    app.open(a)
    app.sql("INSERT INTO t(v) VALUES (1), (2), (3); INSERT INTO w VALUES (1, 1, 'a'), (2, 2, 'b');")
    # Rows written after the ALTER and before Bastion looks: the old triggers cannot see the new column.
    app.sql("""ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'd' CHECK (extra <> 'bad');
               ALTER TABLE t ADD COLUMN "odd, col" INTEGER;
               UPDATE t SET extra = 'set later', "odd, col" = 7 WHERE id = 2;
               INSERT INTO t(v, extra) VALUES (4, 'new row');
               ALTER TABLE w ADD COLUMN x;
               UPDATE w SET x = x'00ff' WHERE k = 1;
               CREATE TABLE fresh(a TEXT PRIMARY KEY, b) WITHOUT ROWID;
               INSERT INTO fresh VALUES ('before refresh', 1);
               CREATE INDEX t_v ON t(v);
               CREATE UNIQUE INDEX fresh_b ON fresh(b);
               CREATE VIEW tv AS SELECT id, extra FROM t;""")
    res = cap.refresh(a)
    assert res.reseed == []
    assert any(d.startswith('ALTER TABLE "t" ADD COLUMN extra TEXT') for d in res.ddl)
    assert any(d.startswith("CREATE TABLE fresh") for d in res.ddl)
    assert 'CREATE INDEX t_v ON t(v)' in res.ddl
    assert res.rows_logged >= 4
    app.sql("""INSERT INTO fresh VALUES ('after refresh', 2);
               UPDATE t SET "odd, col" = 8 WHERE id = 1;""")
    # Renames and a drop; read_changes notices them by itself.
    app.sql("""ALTER TABLE t RENAME TO t2;
               ALTER TABLE t2 RENAME COLUMN v TO value;
               INSERT INTO t2(value) VALUES ('renamed');
               CREATE TABLE gone(x); INSERT INTO gone VALUES (1);""")
    ship(a, b)
    app.sql("DROP TABLE gone; DROP VIEW tv; DROP INDEX t_v;")
    ship(a, b)
    assert content(a) == content(b)
    assert schema_sql(a) == schema_sql(b)
    assert integrity(b) == "ok"
    assert "gone" not in content(b) and "t2" in content(b)
    # The copy's capture followed the replicated DDL without logging anything as its own.
    assert cap.read_changes(b, 0) == []
    app.open(b)
    app.sql("INSERT INTO fresh VALUES ('local on copy', 3)")
    assert [c.table for c in cap.read_changes(b, 0)] == ["fresh"]


def test_changes_ddl_cannot_replay_need_a_reseed(tmp_path: Path, app: App) -> None:
    schema = ("CREATE TABLE t(id INTEGER PRIMARY KEY, v); CREATE TABLE u(a, b UNIQUE); "
              "CREATE UNIQUE INDEX u_a ON u(a);")
    a, b = new_db(tmp_path / "a.db", schema), tmp_path / "b.db"
    cap.install(a, "A")
    seed(a, b)
    app.open(a)
    app.sql("INSERT INTO t VALUES (1, 'x')")
    # SQLite itself refuses to drop a column our trigger reads: the application gets an error.
    with pytest.raises(AppError, match="drop column"):
        app.sql("ALTER TABLE t DROP COLUMN v")
    # The 12-step way to change a key: new table, copy, drop, rename.
    app.sql("""BEGIN; CREATE TABLE t_new(id TEXT PRIMARY KEY, v) WITHOUT ROWID;
               INSERT INTO t_new SELECT id, v FROM t; DROP TABLE t; ALTER TABLE t_new RENAME TO t; COMMIT;""")
    res = cap.refresh(a)
    assert any("rebuilt" in r for r in res.reseed)
    batch = cap.read_changes(a, cap.applied_position(b, "A"))
    assert batch[-1].op == "reseed"
    before = content(b)
    with pytest.raises(cap.ReseedNeeded) as exc:
        cap.apply(b, batch, "A")
    assert exc.value.details["position"] == batch[-1].seq
    assert content(b) == before
    # After a re-seed, capture goes on with the new shape.
    seed(a, b)
    app.sql("INSERT INTO t VALUES ('k', 'text key')")
    ship(a, b)
    assert content(a) == content(b)
    # Dropping a UNIQUE index: rows that break it may follow before we look.
    app.sql("DROP INDEX u_a; INSERT INTO u VALUES (1, 1), (1, 2)")
    assert any("u_a" in r for r in cap.refresh(a).reseed)
    seed(a, b)
    # VACUUM may renumber the rowids of a table without INTEGER PRIMARY KEY (u): re-seed.
    app.sql("DELETE FROM u WHERE b = 1; VACUUM")
    assert any("VACUUM" in r for r in cap.refresh(a).reseed)
    # ... but not when every rowid table has one.
    c = new_db(tmp_path / "c.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v); CREATE TABLE w(k PRIMARY KEY) "
                                  "WITHOUT ROWID")
    cap.install(c, "C")
    app.open(c)
    app.sql("INSERT INTO t VALUES (1, 2); DELETE FROM t; VACUUM")
    assert cap.refresh(c).reseed == []


def test_added_column_definitions_are_cut_exactly() -> None:
    f = cap.schema.added_column_defs
    assert f("CREATE TABLE t(a, b)", "CREATE TABLE t(a, b, b2 TEXT)", ["b2"]) == ["b2 TEXT"]
    assert f("CREATE TABLE t(a, b, PRIMARY KEY(a))", "CREATE TABLE t(a, b, primary_x INT, PRIMARY KEY(a))",
             ["primary_x"]) == ["primary_x INT"]
    assert f("CREATE TABLE t(a)", "CREATE TABLE t(a, c DEFAULT (1, 2), d CHECK (d IN (1, 2)), \"e,f\" TEXT)",
             ["c", "d", "e,f"]) == ["c DEFAULT (1, 2)", "d CHECK (d IN (1, 2))", '"e,f" TEXT']
    assert f("CREATE TABLE t(a)", "CREATE TABLE t(a, c DEFAULT 'x, y')", ["c"]) == ["c DEFAULT 'x, y'"]
    assert f("CREATE TABLE t(a, b)", "CREATE TABLE t(b, a, c)", ["c"]) is None


# -- reading, pruning, wire, removal -----------------------------------------------------------

def test_read_in_chunks_and_prune(tmp_path: Path, app: App) -> None:
    a = new_db(tmp_path / "a.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v); CREATE TABLE u(x)")
    start = cap.install(a, "A").position.seq
    app.open(a)
    app.call("many", ("INSERT INTO t(v) VALUES (?)", [(i,) for i in range(100)]))
    app.sql("INSERT INTO u VALUES (1); ALTER TABLE u ADD COLUMN y; INSERT INTO u VALUES (2, 3)")
    seqs, after = [], start
    while batch := cap.read_changes(a, after, 7):
        assert len(batch) <= 7
        seqs += [c.seq for c in batch]
        after = batch[-1].seq
    assert seqs == list(range(start + 1, cap.position(a).seq + 1))
    assert cap.pending(a, start) == len(seqs)
    shapes_before = shape_count(a)
    assert cap.prune(a, start + 50) == 50
    assert cap.pending(a, start) == len(seqs) - 50
    assert [c.seq for c in cap.read_changes(a, start, 5)] == list(range(start + 51, start + 56))
    # The last entry stays (the next position follows from it); nothing is pending after it.
    assert cap.prune(a, seqs[-1]) == len(seqs) - 51
    assert cap.pending(a, seqs[-1]) == 0 and cap.position(a).seq == seqs[-1]
    # The shape u had before ADD COLUMN is forgotten once no entry uses it; no re-seed was needed.
    assert shape_count(a) == shapes_before - 1
    assert cap.refresh(a).reseed == [] and cap.status(a)["schema_current"]
    app.sql("INSERT INTO u VALUES (4, 5)")
    assert [c.seq for c in cap.read_changes(a, seqs[-1])] == [seqs[-1] + 1]


def test_wire_form_round_trips(tmp_path: Path, app: App) -> None:
    a = new_db(tmp_path / "a.db", "CREATE TABLE t(k, v, PRIMARY KEY(k)) WITHOUT ROWID")
    cap.install(a, "A")
    app.open(a)
    app.sql("INSERT INTO t VALUES (1, CAST(x'ff' AS TEXT)); INSERT INTO t VALUES (x'00', 0.1); "
            "UPDATE t SET k = 2 WHERE k = 1; DELETE FROM t WHERE k = x'00'; CREATE TABLE n(x)")
    changes = cap.read_changes(a, 0)
    wire = pickle.loads(pickle.dumps(cap.to_wire(changes)))
    back = cap.from_wire(wire)
    assert back == changes
    assert [type(c.values[1]) for c in back if c.op == "insert" and c.table == "t"] == [cap.RawText, float]
    assert [c.op for c in back] == ["insert", "insert", "update", "delete", "ddl"]


def test_remove_leaves_no_trace(tmp_path: Path, app: App) -> None:
    a = new_db(tmp_path / "a.db", SHAPES)
    app.open(a)
    app.sql("INSERT INTO plain VALUES (1, 2.5, x'00'); INSERT INTO wr VALUES (1, 'a', 'b'); "
            "INSERT INTO alias(name) VALUES ('x')")
    schema0 = schema_sql(a)
    cap.install(a, "A")
    app.sql("INSERT INTO plain VALUES (2, 'two', NULL); UPDATE wr SET v = 'c'; ALTER TABLE plain ADD COLUMN d;"
            "INSERT INTO plain VALUES (3, 3, 3, 3)")
    cap.refresh(a)
    cap.set_applied(a, "elsewhere", 5)
    expect = content(a)
    assert bastion_objects(a)
    removed = cap.remove(a)["removed"]
    assert "_bastion_log" in removed and "_bastion_applied" in removed
    assert bastion_objects(a) == []
    assert content(a) == expect
    assert [s for s in schema_sql(a) if s[1] != "plain"] == [s for s in schema0 if s[1] != "plain"]
    assert integrity(a) == "ok"
    assert not cap.is_installed(a)
    app.sql("INSERT INTO plain VALUES (4, 4, 4, 4)")      # the application is unaffected
    assert cap.remove(a)["removed"] == []
    # A copy of another site's database must be cleaned before it can capture for itself.
    b = tmp_path / "b.db"
    cap.install(a, "A")
    shutil.copyfile(a, b)
    with pytest.raises(StateConflict, match="origin 'A'"):
        cap.install(b, "B")
    assert cap.install(a, "A").already


# -- random operations -------------------------------------------------------------------------

RANDOM_SCHEMA = """
CREATE TABLE p(a, b);
CREATE TABLE i(id INTEGER PRIMARY KEY, a, r REAL);
CREATE TABLE c(k1 TEXT, k2 INTEGER, a, PRIMARY KEY(k1, k2));
CREATE TABLE w(k1, k2, a, PRIMARY KEY(k1, k2)) WITHOUT ROWID;
CREATE TABLE u(id INTEGER PRIMARY KEY, u UNIQUE, a);
"""
KEYS = {"p": ("rowid",), "i": ("rowid",), "c": ("rowid",), "w": ("k1", "k2"), "u": ("rowid",)}
COLS = {"p": ("a", "b"), "i": ("id", "a", "r"), "c": ("k1", "k2", "a"), "w": ("k1", "k2", "a"), "u": ("id", "u", "a")}

values = st.one_of(
    st.none(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=20),
    st.sampled_from([0.1, -0.0, 1e308, 5e-324, math.nan, math.inf, 2**63 - 1, -2**63, 1.0, "x" * 30_000,
                     b"\x00" * 20_000, "a\x00b", "\U0001F600"]))
extra_values = st.one_of(st.integers(1, 10**6), st.text(min_size=1, max_size=5), st.binary(min_size=1, max_size=5),
                         st.floats(min_value=2, max_value=1e300))     # never the column's default
small_keys = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "A", "", "\x00"]), st.sampled_from([0.5, 2.0]))


@st.composite
def operation(draw: Any) -> tuple[str, tuple]:
    t = draw(st.sampled_from(sorted(COLS)))
    kind = draw(st.sampled_from(["insert", "insert", "update", "update", "delete", "update_all"]))
    cols = COLS[t]

    def val(col: str) -> Any:
        if (t == "w" and col in ("k1", "k2")) or (t in ("i", "u") and col == "id") or (t == "u" and col == "u"):
            return draw(small_keys if t == "w" else st.integers(-5, 5))
        if t == "c" and col in ("k1", "k2"):
            return draw(st.one_of(st.none(), small_keys))
        return draw(values)
    pick = (f"({', '.join(KEYS[t])}) IN (SELECT {', '.join(KEYS[t])} FROM {t} ORDER BY {', '.join(KEYS[t])} "
            f"LIMIT 1 OFFSET (? % max((SELECT count(*) FROM {t}), 1)))")
    if kind == "insert":
        row = tuple(val(c) for c in cols)
        return f"INSERT OR REPLACE INTO {t}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", row
    if kind == "delete":
        return f"DELETE FROM {t} WHERE {pick}", (draw(st.integers(0, 50)),)
    if kind == "update_all":
        col = draw(st.sampled_from([c for c in cols if c not in ("id", "k1", "k2", "u")]))
        return f"UPDATE {t} SET {col} = ?", (val(col),)
    chosen = draw(st.lists(st.sampled_from(cols), min_size=1, max_size=len(cols), unique=True))
    sets = ", ".join(f"{c} = ?" for c in chosen)
    return f"UPDATE OR REPLACE {t} SET {sets} WHERE {pick}", (*(val(c) for c in chosen), draw(st.integers(0, 50)))


transactions = st.lists(st.tuples(st.lists(operation(), min_size=1, max_size=8), st.booleans()),
                        min_size=1, max_size=8)


@pytest.fixture(scope="module")
def shared_app():
    a = App()
    yield a
    a.close()


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory: pytest.TempPathFactory):
    # Many small databases, each with fsyncs: on tmpfs when there is one (durability is not under test here).
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="bastion-capture-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("rand")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(txns=transactions, chunk=st.integers(1, 40), replay=st.integers(0, 5),
       alter=st.one_of(st.none(), st.tuples(st.integers(0, 7), st.sampled_from(sorted(COLS)),
                                            st.sampled_from(["NULL", "0", "'d'", "x'00ff'", "1.5"]))),
       ship_after=st.sets(st.integers(0, 7), max_size=3), data=st.data())
def test_random_operations_replicate_exactly(shared_app: App, fast_dir: Path, txns: list, chunk: int,
                                             replay: int, alter: tuple | None, ship_after: set[int],
                                             data: st.DataObject) -> None:
    d = Path(tempfile.mkdtemp(dir=fast_dir))
    a, b = new_db(d / "a.db", RANDOM_SCHEMA), d / "b.db"
    cap.install(a, "A")
    seed(a, b)
    app = shared_app
    app.open(a)
    altered = None
    for n, (stmts, commit) in enumerate(txns):
        if alter is not None and n == alter[0]:
            # A column added in the middle; the rows that follow fill it before capture looks.
            altered = alter[1]
            app.sql(f"ALTER TABLE {altered} ADD COLUMN extra DEFAULT {alter[2]}")
        if altered:
            k = KEYS[altered]
            stmts = [*stmts, (f"UPDATE {altered} SET extra = ? WHERE ({', '.join(k)}) IN (SELECT {', '.join(k)} "
                              f"FROM {altered} ORDER BY random() LIMIT 2)", (data.draw(extra_values),))]
        try:
            app.txn(*stmts, commit=commit or len(txns) == 1)
        except AppError as e:      # e.g. a NULL key in w: the whole transaction rolls back
            assert "constraint" in str(e).lower() or "mismatch" in str(e).lower(), e
        if n in ship_after:        # part of it reaches the copy while the rest is being written
            ship(a, b, chunk=chunk)
    assert cap.refresh(a).reseed == []
    batches, after = [], cap.applied_position(b, "A")
    while batch := cap.read_changes(a, after, chunk):
        batches.append(batch)
        after = batch[-1].seq
    for n, batch in enumerate(batches):
        cap.apply(b, batch, "A")
        if n == replay:        # a batch sent twice changes nothing
            assert cap.apply(b, batch, "A").applied == 0
    assert content(a) == content(b)
    assert cap.pending(b) == 0          # the copy's own capture logged none of it
    shutil.rmtree(d)
