"""DB-API 2.0 semantics of the driver, compared with Python's sqlite3 on the same statements.

A real daemon serves a database file; the same schema is also opened locally with the
stdlib sqlite3, and each test runs the same statements through both and compares what
a program sees: exception classes, type codes, values. Where the driver departs from
sqlite3 on purpose (PEP 249 asks for it), the test says so.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import textwrap

import pytest

import bastion.client as bc
from bastion.sql.users import hash_password
from support import PY, DaemonProc, free_port, write_config

PW = "erin-secret-5"
SCHEMA = """
CREATE TABLE k(id INTEGER PRIMARY KEY, name TEXT UNIQUE, qty INTEGER NOT NULL CHECK (qty >= 0));
CREATE TABLE st(a INTEGER, b TEXT, c BLOB, d REAL, e ANY) STRICT;
CREATE TABLE parent(id INTEGER PRIMARY KEY);
CREATE TABLE child(id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id));
CREATE TABLE guarded(x);
CREATE TRIGGER guard BEFORE INSERT ON guarded WHEN NEW.x < 0 BEGIN SELECT RAISE(ABORT, 'negative'); END;
CREATE TABLE words(id INTEGER PRIMARY KEY, w TEXT);
INSERT INTO k VALUES (1, 'one', 1);
"""


def _make(path) -> None:
    con = sqlite3.connect(path)
    con.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
    con.close()


def _start(root, sql_section: str = "") -> DaemonProc:
    app = root / "app"
    app.mkdir()
    _make(app / "d.db")
    port = free_port()
    extra = (sql_section + f"\n[users.erin]\npassword_hash = \"{hash_password(PW)}\"\n"
             "access = { d = \"read-write\" }\n")
    cfg = write_config(root, port, {"d": [str(app / "d.db")]}, extra=extra)
    return DaemonProc(cfg, port, root / "var").start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = _start(tmp_path_factory.mktemp("dbapi"))
    yield d
    d.stop()


def _dsn(d: DaemonProc) -> str:
    return f"bastion://erin@127.0.0.1:{d.port}/d"


@pytest.fixture
def con(server):
    c = bc.connect(_dsn(server), password=PW)
    yield c
    c.close()


@pytest.fixture
def local(tmp_path):
    """The same schema in a file of this process, through the stdlib sqlite3."""
    _make(tmp_path / "local.db")
    c = sqlite3.connect(tmp_path / "local.db")
    yield c
    c.close()


def test_connections_carry_the_exception_classes(con, local):
    names = ["Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
             "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError"]
    for name in names:
        assert hasattr(local, name)                             # sqlite3 has the extension too
        assert getattr(con, name) is getattr(bc, name), name
    # code holding only the connection catches the driver's own exceptions with them
    with pytest.raises(con.IntegrityError):
        con.execute("INSERT INTO k VALUES (1, 'dup', 1)")
    con.rollback()


# declared types, including SQLite's classic surprises: FLOATING POINT has INT in it
# (INTEGER affinity), STRING is none of the names (NUMERIC), CHARINT is INTEGER (rule 1 first)
DECLTYPES = ["varchar(20)", "NVARCHAR(100)", "character(5)", "CLOB", "text", "INTEGER", "int", "BIGINT", "INT8",
             "tinyint", "UNSIGNED BIG INT", "BLOB", "blob", "REAL", "DOUBLE", "DOUBLE PRECISION", "float", "NUMERIC",
             "DECIMAL(10,5)", "BOOLEAN", "DATE", "DATETIME", "TIMESTAMP", "TIME", "FLOATING POINT", "STRING",
             "CHARINT", "JSON", "MONEY"]


def _affinity_by_sqlite(local: sqlite3.Connection, decltype: str) -> str:
    """Ask SQLite itself: CAST uses the affinity of the type name (datatype3.html section 3.1)."""
    a, b = local.execute(f"SELECT typeof(CAST('1.5' AS {decltype})), typeof(CAST(1 AS {decltype}))").fetchone()
    return {("integer", "integer"): "INTEGER", ("text", "text"): "TEXT", ("blob", "blob"): "BLOB",
            ("real", "real"): "REAL", ("real", "integer"): "NUMERIC"}[(a, b)]


def test_type_codes_compare_by_sqlite_type_affinity(con, local):
    cols = ", ".join(f'"c{i}" {t}' for i, t in enumerate(DECLTYPES))
    con.execute(f"CREATE TABLE typed({cols})")
    local.execute(f"CREATE TABLE typed({cols})")
    desc = con.execute("SELECT * FROM typed").description
    assert [d[0] for d in desc] == [d[0] for d in local.execute("SELECT * FROM typed").description]
    objects = {"TEXT": bc.STRING, "BLOB": bc.BINARY, "INTEGER": bc.NUMBER, "REAL": bc.NUMBER, "NUMERIC": bc.NUMBER}
    for (_name, code, *_), decltype in zip(desc, DECLTYPES):
        assert code.upper() == decltype.upper()        # the type code is the declared type
        aff = _affinity_by_sqlite(local, decltype)
        assert bc.affinity(code) == aff, (decltype, aff)
        for obj in (bc.STRING, bc.BINARY, bc.NUMBER):
            assert (code == obj) == (obj is objects[aff]), (decltype, obj)
            assert (obj == code) == (code == obj) and (obj != code) == (not code == obj)  # noqa: SIM201 - the test: != is the negation of ==
        up = decltype.upper()
        assert (code == bc.DATETIME) == ("DATE" in up or "TIME" in up), decltype
        assert (code == bc.ROWID) == (up == "INTEGER"), decltype
    # an expression has no declared type: it equals no type object
    (_, code, *_), = con.execute("SELECT 1 + 1").description
    assert code is None and all(code != o for o in (bc.STRING, bc.BINARY, bc.NUMBER, bc.DATETIME, bc.ROWID))
    con.execute("DROP TABLE typed")


# statements that fail, each with the parameters to send: the driver must raise the class sqlite3 raises
FAILING = [
    ("INSERT INTO k(id, qty) VALUES (?, 1)", ("abc",)),             # datatype mismatch (rowid)
    ("INSERT INTO k(id, qty) VALUES (?, 1)", (1.5,)),
    ("UPDATE k SET id = 'x' WHERE id = 1", ()),
    ("INSERT INTO st(a) VALUES (?)", ("x",)),                       # STRICT: cannot store TEXT in INTEGER
    ("INSERT INTO st(b) VALUES (?)", (b"\x00",)),
    ("INSERT INTO st(d) VALUES (?)", ("x",)),
    ("INSERT INTO st(c) VALUES (?)", (1,)),
    ("INSERT INTO k VALUES (1, 'again', 1)", ()),                   # primary key
    ("INSERT INTO k VALUES (2, 'one', 1)", ()),                     # unique
    ("INSERT INTO k(id, name) VALUES (3, 'n')", ()),                # not null
    ("INSERT INTO k VALUES (4, 'neg', -1)", ()),                    # check
    ("INSERT INTO guarded VALUES (-1)", ()),                        # RAISE(ABORT) in a trigger
    ("SELECT * FROM nosuch", ()),                                   # no such table
    ("SELEKT 1", ()),                                               # syntax
    ("CREATE TABLE k(x)", ()),                                      # already exists
    ("SELECT abs(-9223372036854775808)", ()),                       # integer overflow
    ("SELECT json('{')", ()),                                       # malformed JSON
    ("SELECT substr()", ()),                                        # wrong number of arguments
    ("SELECT zeroblob(2000000000)", ()),                            # string or blob too big
    ("SELECT * FROM k WHERE id = ?", (1, 2)),                       # wrong number of bindings
    ("SELECT * FROM k WHERE id = ?", ()),
]


@pytest.mark.parametrize("sql,params", FAILING, ids=[f"{i}:{s[:30]}" for i, (s, _) in enumerate(FAILING)])
def test_errors_raise_the_class_sqlite3_raises(con, local, sql, params):
    with pytest.raises(sqlite3.Error) as want:
        local.execute(sql, params)
    for autocommit in (False, True):
        con.autocommit = autocommit
        with pytest.raises(bc.Error) as got:
            con.execute(sql, params)
        assert type(got.value).__name__ == type(want.value).__name__, (sql, str(want.value), got.value)
        con.rollback()


def test_error_code_table_follows_sqlite3_for_every_primary_code():
    # CPython's Modules/_sqlite/util.c, by primary result code (NOMEM: sqlite3 raises MemoryError)
    sqlite3_table = {1: "OperationalError", 2: "InternalError", 3: "OperationalError", 4: "OperationalError",
                     5: "OperationalError", 6: "OperationalError", 8: "OperationalError", 9: "OperationalError",
                     10: "OperationalError", 11: "DatabaseError", 12: "InternalError", 13: "OperationalError",
                     14: "OperationalError", 15: "OperationalError", 16: "OperationalError",
                     17: "OperationalError", 18: "DataError", 19: "IntegrityError", 20: "IntegrityError",
                     21: "InterfaceError", 22: "DatabaseError", 23: "DatabaseError", 24: "DatabaseError",
                     25: "InterfaceError", 26: "DatabaseError"}
    from bastion.client import codes
    for code, name in sqlite3_table.items():
        for ext in (code, code | (3 << 8)):            # extended codes map as their primary code
            err = bc.errors.from_server(400, {"error": {"type": "SQLFailure", "message": "m",
                                                        "details": {"extended_code": ext}}})
            assert type(err).__name__ == name, (ext, err)
        assert codes.class_name({"sqlite_error": next(k for k, v in codes.APSW_CODES.items() if v == code)}) == name


def test_fetch_without_a_result_set_raises_as_pep_249_asks(con, local):
    # sqlite3 answers None / [] here; PEP 249: "An Error (or subclass) exception is raised if
    # the previous call to .execute*() did not produce any result set or no call was issued yet"
    lcur = local.cursor()
    assert lcur.fetchone() is None and lcur.fetchall() == []
    cur = con.cursor()
    for fetch in (cur.fetchone, cur.fetchall, cur.fetchmany):
        with pytest.raises(bc.ProgrammingError, match="nothing was executed"):
            fetch()
    for stmt in ("INSERT INTO words(w) VALUES ('a')", "UPDATE words SET w = 'b'", "CREATE TABLE tmp1(x)",
                 "DROP TABLE tmp1", "DELETE FROM words"):
        cur.execute(stmt)
        assert cur.description is None and local.execute(stmt).description is None
        for fetch in (cur.fetchone, cur.fetchall, cur.fetchmany):
            with pytest.raises(bc.ProgrammingError, match="produced none"):
                fetch()
        with pytest.raises(bc.ProgrammingError):
            list(cur)
    cur.executemany("INSERT INTO words(w) VALUES (?)", [("x",), ("y",)])
    with pytest.raises(bc.ProgrammingError):
        cur.fetchall()
    con.rollback()
    # a query with no rows is a result set: empty, no error (as sqlite3)
    cur.execute("SELECT * FROM words WHERE 0")
    assert cur.fetchone() is None and cur.fetchall() == [] and cur.fetchmany(5) == []
    assert local.execute("SELECT * FROM words WHERE 0").fetchall() == []
    # a failed statement leaves no result set behind from the one before
    cur.execute("SELECT 1")
    with pytest.raises(bc.OperationalError):
        cur.execute("SELECT * FROM nosuch")
    with pytest.raises(bc.ProgrammingError):
        cur.fetchall()
    # RETURNING is a result set
    assert con.execute("INSERT INTO words(w) VALUES ('r') RETURNING w").fetchall() == [("r",)]
    con.rollback()


def test_text_that_is_not_utf8_can_be_read_back(con, server, tmp_path):
    # another program (here sqlite3, the way a C program would) stores bytes as TEXT
    bad = [b"a\xffb", b"\xc3(", b"\xed\xa0\x80", b"caf\xe9"]          # invalid, truncated, surrogate, latin-1
    path = tmp_path / "writer.py"
    path.write_text(textwrap.dedent(f"""
        import sqlite3, sys
        con = sqlite3.connect(sys.argv[1])
        for i, b in enumerate({bad!r}):
            con.execute("INSERT INTO words(id, w) VALUES (?, CAST(? AS TEXT))", (100 + i, b))
        con.execute("INSERT INTO words(id, w) VALUES (200, 'fine ü')")
        con.commit()
        """))
    db = server.config.parent / "app" / "d.db"
    subprocess.run([PY, str(path), str(db)], check=True)
    # sqlite3 with its default text_factory cannot read them at all
    lc = sqlite3.connect(db)
    with pytest.raises(sqlite3.OperationalError, match="decode"):
        lc.execute("SELECT w FROM words WHERE id >= 100 ORDER BY id").fetchall()
    lc.text_factory = bytes
    want = [(i, w, t.decode()) for i, w, t in
            lc.execute("SELECT id, w, typeof(w) FROM words WHERE id >= 100 ORDER BY id")]
    lc.close()
    assert [r[2] for r in want] == ["text"] * 5
    # the driver returns str (the column's type) that keeps the bytes: errors="surrogateescape"
    for autocommit in (True, False):
        con.autocommit = autocommit
        for sql in ("SELECT id, w, typeof(w) FROM words WHERE id >= ? ORDER BY id",
                    "SELECT id, w, typeof(w) FROM words WHERE id >= :lo ORDER BY id DESC; -- newest first"):
            got = con.execute(sql, (100,) if "?" in sql else {"lo": 100}).fetchall()
            if "DESC" in sql:
                got.reverse()
            assert [(i, w.encode("utf-8", "surrogateescape"), t) for i, w, t in got] == want
            assert all(isinstance(w, str) for _, w, _ in got)
            assert got[-1][1] == "fine ü"
        if not autocommit:
            con.execute("UPDATE k SET qty = qty + 1 WHERE id = 1")     # inside an interactive transaction
            got = con.execute("SELECT w FROM words WHERE id = 100").fetchall()
            assert got == [(b"a\xffb".decode("utf-8", "surrogateescape"),)]
            con.rollback()
    # a write whose RETURNING holds such text is refused whole (never run twice), not a server error
    con.autocommit = True
    with pytest.raises(bc.OperationalError, match="not valid UTF-8"):
        con.execute("UPDATE words SET id = id + 1000 WHERE id = 100 RETURNING w")
    assert con.execute("SELECT count(*) FROM words WHERE id = 100").fetchone() == (1,)
    # such a str cannot be sent back as text (as sqlite3, which raises UnicodeEncodeError): a clear error
    with pytest.raises(bc.ProgrammingError, match="surrogates"):
        con.execute("SELECT ?", (got[0][0],))
    con.execute("DELETE FROM words WHERE id >= 100")


ABANDON = """
import os, sys, time
import bastion.client as bc
con = bc.connect(sys.argv[1], password=sys.argv[2])
con.execute("INSERT INTO words(w) VALUES ('abandoned')")     # begins a transaction: the write lock
print("holding", flush=True)
time.sleep(600)
"""


def _abandon(d: DaemonProc) -> None:
    """A client takes the write lock and vanishes (kill -9): no rollback, no word."""
    p = subprocess.Popen([PY, "-c", ABANDON, _dsn(d), PW], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()


@pytest.mark.parametrize("sql_section", [
    "",                                                     # the defaults: idle 30 s, busy 15 s
    '[sql]\nbusy_timeout = "600ms"\n',                      # a busy timeout shorter than the sweeper's round
], ids=["defaults", "short-busy-timeout"])
def test_a_vanished_writer_never_makes_the_next_writer_fail(tmp_path, sql_section):
    d = _start(tmp_path, sql_section)
    try:
        con = bc.connect(_dsn(d), password=PW, autocommit=True)
        for n in range(1 if not sql_section else 6):
            _abandon(d)
            # the next writer waits at most its busy timeout: the abandoned one is rolled back first
            con.execute("INSERT INTO words(w) VALUES (?)", (f"next {n}",))
        assert [r[0] for r in con.execute("SELECT w FROM words ORDER BY id")] == \
            [f"next {n}" for n in range(1 if not sql_section else 6)]
        con.close()
    finally:
        d.stop()


@pytest.mark.parametrize("sql", ["SELECT 1; /* x */ DELETE FROM words", "SELECT 2; /**/DELETE FROM words",
                                 "/* a */ SELECT 3; /* b */ DELETE FROM words"])
def test_a_second_statement_behind_a_comment_is_refused_as_in_sqlite3(con, local, sql):
    con.autocommit = True
    con.execute("DELETE FROM words")
    con.execute("INSERT INTO words(w) VALUES ('keep')")
    local.execute("INSERT INTO words(w) VALUES ('keep')")
    with pytest.raises(sqlite3.ProgrammingError, match="one statement"):
        local.execute(sql)
    with pytest.raises(bc.ProgrammingError, match="one statement"):
        con.execute(sql)
    assert con.execute("SELECT count(*) FROM words").fetchone() == (1,)
    # a comment after the statement is no statement: its result set stays
    for ok in ("SELECT 4 /* x */;", "/* x */ SELECT 4 ;", "SELECT 4; -- x\n", "SELECT 4; /* x */", "SELECT 4; /* x"):
        assert con.execute(ok).fetchall() == local.execute(ok).fetchall() == [(4,)]
        assert con.execute(ok).description[0][0] == local.execute(ok).description[0][0]
    con.execute("DELETE FROM words")
