"""Change capture: control tables and triggers inside the application's own database.

Applications keep writing with any SQLite library and never load Bastion, so what
runs in their process is plain SQL over SQLite's built-ins (checked with SQLite
3.40, the system library here, under ``PRAGMA trusted_schema=OFF``). Everything
Bastion adds is named ``_bastion_*``; :func:`remove` takes all of it away.

Control tables
--------------
``_bastion_log``      every captured entry, in position order: ``seq`` (its rowid), ``hlc``,
                      ``op`` (1 insert, 2 update, 3 delete, 4 DDL, 5 re-seed marker, 0 the
                      install mark), ``tbl`` (which table shape) and ``c0, c1, ...``: the new
                      row's values (insert, update), then the old key (update, delete);
                      for DDL and markers, ``c0`` holds the SQL or the reason.
``_bastion_tables``   table shapes: name, value columns, key columns, column list, CREATE text.
                      A schema change gives a table a new shape id; rows logged under the old
                      id keep the name and columns they were logged with.
``_bastion_meta``     origin id, format, the schema last seen (objects + ``schema_version``).
``_bastion_applied``  on a copy: the last position applied, per origin.

Triggers
--------
Three ``AFTER`` row triggers per table, each one ``INSERT`` into ``_bastion_log`` in the
application's own transaction: a rollback (whole, to a savepoint, or of a failed
statement) takes the log row with it. The position is the rowid SQLite gives the new
row, last + 1: writers take turns (one write transaction per file at a time), so
positions are gap-free and follow commit order. The clock is read from the last log
row in the same statement, so one page (the log's last) is all capture adds to a
transaction; :func:`prune` always keeps that last row. (A first design, one log per
table plus a one-row clock table, dirtied three more pages per transaction; the bank
workload of bench/bench_capture.py then kept only 0.4-0.5 of its write rate.)

Encoding: none. The ``c`` columns have no declared type (no affinity), so ``NEW.x`` is
stored as the very value SQLite holds: same storage class, same bytes. Measured
before choosing, on SQLite 3.40 and 20,000 random doubles: ``quote()`` lost 7 (and
writes -0.0 as 0.0), ``json_array()`` lost 18,833 (15 digits), ``printf('%!.17g')``
lost 36; ``quote()`` and ``length()`` also stop text at its first NUL. Native values
are exact for every type (1 stays integer, 1.0 real, text with NULs or invalid UTF-8
stays text, a blob stays a blob) and cost the application nothing to encode. SQLite
turns NaN into NULL before any trigger sees it. Text that is not valid UTF-8 is read
back as :class:`RawText` (its bytes) and written with ``CAST(? AS TEXT)``.

Keys: a rowid table is keyed by its rowid (its INTEGER PRIMARY KEY column if it has
one, else whichever of ``rowid``/``_rowid_``/``oid`` no column shadows), and the rowid
travels with the row, so a copy has the same rowids and the same rowid-ordered
digests. A WITHOUT ROWID table is keyed by its PRIMARY KEY. Generated columns are
not captured (the copy computes them). Virtual tables cannot carry triggers: install
and refresh list them under ``uncaptured``.

Positions and clock
-------------------
``seq`` counts every entry of this database. ``hlc`` is a hybrid logical clock packed
in one integer, ``unix_ms << 16 | counter``; each entry takes ``max(last + 1, now << 16)``,
so it never goes back when the wall clock does, and two sites order by (hlc, origin).
``now`` is ``julianday('now')`` in ms (SQLite keeps the time as integer ms).

Applying
--------
:func:`apply` replays a batch on a copy in one ``BEGIN IMMEDIATE`` transaction, in
order: insert and update write the whole row with ``INSERT OR REPLACE`` (an update
that moved the key first deletes the old key), delete deletes by key. ``OR REPLACE``
also removes the rows the source removed silently by its own REPLACE conflict
resolution (no trigger fires for those). The applying connection runs with triggers
disabled (``SQLITE_DBCONFIG_ENABLE_TRIGGER``) and foreign keys off: nothing it writes
is captured as a local change, and the copy's application triggers and cascades do
not run a second time (their effects were captured at the source as rows).
``_bastion_applied`` moves in the same transaction: a batch sent twice changes
nothing, and a batch that does not follow the recorded position is refused.

Schema changes
--------------
DDL bumps ``PRAGMA schema_version``. :func:`read_changes` compares it, in the read
transaction it reads the log in, with the one recorded, and runs :func:`refresh`
first if it moved. Refresh compares the schema with the one recorded and logs, at the
next positions, the DDL a copy must run: new table (``CREATE TABLE``, then its rows as
inserts: no trigger saw them), new column (``ALTER TABLE ... ADD COLUMN`` cut out of
the new ``CREATE TABLE`` text, then every row logged before as a whole-row update: the
old triggers could not see the column), table or column renamed, table dropped, index,
view or trigger created, dropped or changed. What DDL cannot replay logs a re-seed
marker instead, and :func:`apply` stops there (:class:`ReseedNeeded`): a table rebuilt
(dropped and created again, e.g. to change its key), columns dropped or changed, a
UNIQUE index dropped (the copy would delete rows that break it), a ``VACUUM`` while
tables without INTEGER PRIMARY KEY are captured (it may renumber their rowids).
SQLite refuses ``ALTER TABLE DROP COLUMN`` on a column a trigger reads: an application
cannot drop a captured column while capture is installed. Seed copies with a page
copy (backup API, file copy under continuous operations), never ``VACUUM INTO``.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import apsw

from .errors import BusyError, StateConflict, UsageError
from .errors import ChangesMissing, ReseedNeeded  # noqa: F401 - defined in errors.py

PREFIX = "_bastion_"
FORMAT = 1
LOG = "_bastion_log"
META = "_bastion_meta"
TABLES = "_bastion_tables"
APPLIED = "_bastion_applied"

# Bastion tables that are not capture's and may outlive it (a copy keeps its conflict log).
NOT_CAPTURES = ("_bastion_conflicts",)

HLC_SHIFT = 16
# Unix ms from julianday('now'): SQLite keeps the time as integer ms since the julian
# epoch; 210866760000000 ms is 1970-01-01 on that scale.
NOW_MS_SQL = "(CAST(round(julianday('now') * 86400000.0) AS INTEGER) - 210866760000000)"
NEXT_HLC_SQL = (f"max(coalesce((SELECT hlc FROM {LOG} ORDER BY seq DESC LIMIT 1), 0) + 1, "
                f"{NOW_MS_SQL} << {HLC_SHIFT})")

OP_MARK, OP_INSERT, OP_UPDATE, OP_DELETE, OP_DDL, OP_RESEED = 0, 1, 2, 3, 4, 5
_OP_NAME = {OP_INSERT: "insert", OP_UPDATE: "update", OP_DELETE: "delete", OP_DDL: "ddl", OP_RESEED: "reseed"}
_ROWID_NAMES = ("rowid", "_rowid_", "oid")
_CODECS = {"UTF-8": "utf-8", "UTF-16le": "utf-16-le", "UTF-16be": "utf-16-be"}
_MAX_WIDTH = 1900          # log columns; SQLite allows 2000 columns per table by default


class RawText(bytes):
    """A TEXT value whose bytes are not valid in the database's encoding (SQLite stores them as given)."""

    def __repr__(self) -> str:
        return f"RawText({bytes(self)!r})"


class Change(NamedTuple):
    """One captured entry. ``op`` is insert, update, delete, ddl or reseed.

    Row changes: ``columns``/``values`` the new row (insert, update), ``key_columns``/``key``
    the old key (update, delete). ``ddl``: ``sql`` to run. ``reseed``: ``sql`` says why."""
    seq: int
    hlc: int
    op: str
    table: str | None
    columns: tuple[str, ...]
    values: tuple[Any, ...] | None
    key_columns: tuple[str, ...]
    key: tuple[Any, ...] | None
    sql: str | None
    origin: str

    @property
    def time(self) -> float:
        """Unix time (s) of the change, from its clock value."""
        return (self.hlc >> HLC_SHIFT) / 1000.0


class Position(NamedTuple):
    seq: int
    hlc: int


@dataclass
class RefreshResult:
    changed: bool = False
    ddl: list[str] = field(default_factory=list)
    reseed: list[str] = field(default_factory=list)
    rows_logged: int = 0                              # rows logged for new tables / added columns
    uncaptured: dict[str, str] = field(default_factory=dict)
    position: Position | None = None

    @property
    def reseed_needed(self) -> bool:
        return bool(self.reseed)

    def to_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "ddl": self.ddl, "reseed": self.reseed, "rows_logged": self.rows_logged,
                "uncaptured": self.uncaptured, "position": self.position._asdict() if self.position else None}


@dataclass
class InstallResult:
    origin: str
    position: Position
    tables: list[str]
    uncaptured: dict[str, str]
    already: bool = False
    refresh: RefreshResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "position": self.position._asdict(), "tables": self.tables,
                "uncaptured": self.uncaptured, "already_installed": self.already,
                "refresh": self.refresh.to_dict() if self.refresh else None}


@dataclass
class ApplyResult:
    origin: str
    applied: int        # entries applied now
    skipped: int        # entries at or before the recorded position (already applied)
    position: int       # last position applied for this origin
    rows: int           # row changes among the applied
    ddl: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- SQL helpers ----------------------------------------------------------------

def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _trigger_names(tid: int) -> tuple[str, str, str]:
    return f"{PREFIX}ins_{tid}", f"{PREFIX}upd_{tid}", f"{PREFIX}del_{tid}"


def _is_ours(name: str) -> bool:
    return name.startswith(PREFIX)   # case-sensitive on purpose: never touch a user's _BASTION_x


@contextmanager
def _connection(target: apsw.Connection | str | os.PathLike) -> Iterator[apsw.Connection]:
    if isinstance(target, apsw.Connection):
        yield target
        return
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such database file", path=path,
                         hint="name an existing SQLite database; capture never creates one")
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    # Like every daemon connection: closing it must never checkpoint the application's WAL.
    con.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    con.setbusytimeout(10_000)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def _transaction(con: apsw.Connection, write: bool) -> Iterator[None]:
    if con.in_transaction:
        raise UsageError("the connection is already in a transaction",
                         hint="capture functions run their own transaction; commit or roll back first")
    try:
        con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    except apsw.BusyError:
        raise BusyError("the database stayed locked by another writer",
                        hint="retry; set a busy timeout on the connection") from None
    try:
        yield
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    try:
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _one(con: apsw.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    rows = con.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


def _exists(con: apsw.Connection, name: str, kind: str = "table") -> bool:
    return _one(con, "SELECT count(*) FROM sqlite_schema WHERE type = ? AND name = ?", (kind, name)) > 0


def _installed(con: apsw.Connection) -> bool:
    return _exists(con, META) and _one(con, f"SELECT value FROM {META} WHERE key = 'origin'") is not None


def _meta(con: apsw.Connection, key: str) -> Any:
    v = _one(con, f"SELECT value FROM {META} WHERE key = ?", (key,))
    return json.loads(v) if key == "schema" and isinstance(v, str) else v


def _set_meta(con: apsw.Connection, key: str, value: Any) -> None:
    if key == "schema":
        value = json.dumps(value)
    con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES (?, ?)", (key, value))


def _need_installed(con: apsw.Connection) -> None:
    if not _installed(con):
        raise StateConflict("change capture is not installed in this database",
                            hint="install it first (capture.install)")


def _own_ddl(con: apsw.Connection, sql: str) -> None:
    """DDL on our own tables. It bumps the schema cookie as the application's DDL would; when
    nothing else was pending, move the recorded cookie along so refresh does not take it for
    a VACUUM. (If something was pending, refresh looks at the whole schema anyway.)"""
    before = _one(con, "PRAGMA schema_version")
    con.execute(sql)
    if _exists(con, META) and _meta(con, "schema_version") == before:
        _set_meta(con, "schema_version", _one(con, "PRAGMA schema_version"))


# -- table shapes -----------------------------------------------------------------

@dataclass
class Shape:
    """What the triggers of one table capture, and what apply needs to write it."""
    name: str
    without_rowid: bool
    columns: tuple[str, ...]        # value columns in log order (rowid first when it is not a column)
    key_columns: tuple[str, ...]
    key_pos: tuple[int, ...]        # where the key sits in ``columns``
    xinfo: list[list[Any]]          # pragma table_xinfo: name, type, notnull, dflt_value, pk, hidden
    sql: str

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "without_rowid": self.without_rowid, "columns": self.columns,
                           "key_columns": self.key_columns, "key_pos": self.key_pos, "xinfo": self.xinfo,
                           "sql": self.sql})

    @classmethod
    def from_json(cls, text: str) -> "Shape":
        d = json.loads(text)
        return cls(d["name"], d["without_rowid"], tuple(d["columns"]), tuple(d["key_columns"]),
                   tuple(d["key_pos"]), d["xinfo"], d["sql"])

    def same_structure(self, other: "Shape") -> bool:
        return (self.without_rowid, self.columns, self.key_columns, self.xinfo) == \
               (other.without_rowid, other.columns, other.key_columns, other.xinfo)


def _shape(con: apsw.Connection, name: str, without_rowid: bool) -> Shape | str:
    """The shape of a table, or why it cannot be captured."""
    xinfo = [list(r) for r in con.execute(
        'SELECT name, type, "notnull", dflt_value, pk, hidden FROM pragma_table_xinfo(?, \'main\') ORDER BY cid',
        (name,))]
    sql = _one(con, "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,))
    plain = [x[0] for x in xinfo if x[5] == 0]           # hidden 2/3: generated columns
    pks = sorted((x for x in xinfo if x[4] > 0), key=lambda x: x[4])
    if without_rowid:
        columns = tuple(plain)
        key = tuple(x[0] for x in pks)
    else:
        alias = None
        if len(pks) == 1 and _one(con, "SELECT count(*) FROM pragma_index_list(?, 'main') WHERE origin = 'pk'",
                                  (name,)) == 0:
            alias = pks[0][0]           # INTEGER PRIMARY KEY: the column is the rowid
        if alias is not None:
            columns, key = tuple(plain), (alias,)
        else:
            taken = {x[0].lower() for x in xinfo}
            free = [n for n in _ROWID_NAMES if n not in taken]
            if not free:
                return "columns named rowid, _rowid_ and oid hide its rowid"
            columns, key = (free[0], *plain), (free[0],)
    if len(columns) + len(key) > _MAX_WIDTH:
        return f"{len(xinfo)} columns: more than the change log can hold"
    return Shape(name, without_rowid, columns, key, tuple(columns.index(k) for k in key), xinfo, sql or "")


def _user_tables(con: apsw.Connection) -> tuple[dict[str, Shape], dict[str, str]]:
    """Capturable tables of the main schema, and the others with the reason."""
    shapes: dict[str, Shape] = {}
    other: dict[str, str] = {}
    for name, kind, wr in con.execute("SELECT name, type, wr FROM pragma_table_list WHERE schema = 'main'").fetchall():
        if name.startswith("sqlite_") or _is_ours(name) or kind in ("view", "shadow"):
            continue
        if kind != "table":
            other[name] = f"{kind} table: not captured (triggers cannot be put on it)"
            continue
        s = _shape(con, name, bool(wr))
        if isinstance(s, str):
            other[name] = s
        else:
            shapes[name] = s
    return shapes, other


def _objects(con: apsw.Connection) -> list[list[Any]]:
    """Every schema object but ours, in creation order: the fingerprint refresh compares."""
    return [list(r) for r in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
            if not _is_ours(r[1])]


# -- install and capture objects ----------------------------------------------------

def _width(con: apsw.Connection) -> int:
    return _one(con, f"SELECT count(*) FROM pragma_table_info('{LOG}', 'main')") - 4


def _capture_table(con: apsw.Connection, shape: Shape) -> int:
    """Record ``shape`` and put the triggers on its table; returns the shape id."""
    con.execute(f"INSERT INTO {TABLES}(name, active, shape) VALUES (?, 1, ?)", (shape.name, shape.to_json()))
    tid = con.last_insert_rowid()
    nv, nk = len(shape.columns), len(shape.key_columns)
    for i in range(_width(con), nv + nk):
        con.execute(f"ALTER TABLE {LOG} ADD COLUMN c{i}")     # no type: no affinity, values kept as given
    vcols = ", ".join(f"c{i}" for i in range(nv))
    kcols = ", ".join(f"c{nv + i}" for i in range(nk))
    new_v = ", ".join(f"NEW.{_q(c)}" for c in shape.columns)
    old_k = ", ".join(f"OLD.{_q(c)}" for c in shape.key_columns)
    ins, upd, dele = _trigger_names(tid)
    tbl = _q(shape.name)
    head = f"INSERT INTO {LOG}(hlc, op, tbl, "
    con.execute(f"CREATE TRIGGER main.{_q(ins)} AFTER INSERT ON {tbl} BEGIN {head}{vcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_INSERT}, {tid}, {new_v}); END")
    con.execute(f"CREATE TRIGGER main.{_q(upd)} AFTER UPDATE ON {tbl} BEGIN {head}{vcols}, {kcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_UPDATE}, {tid}, {new_v}, {old_k}); END")
    con.execute(f"CREATE TRIGGER main.{_q(dele)} AFTER DELETE ON {tbl} BEGIN {head}{kcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_DELETE}, {tid}, {old_k}); END")
    return tid


def _retire(con: apsw.Connection, tid: int) -> None:
    """Stop capturing under this shape (rows logged under it keep it until pruned)."""
    for t in _trigger_names(tid):
        con.execute(f"DROP TRIGGER IF EXISTS main.{_q(t)}")
    con.execute(f"UPDATE {TABLES} SET active = 0 WHERE id = ?", (tid,))


def install(target: apsw.Connection | str | os.PathLike, origin: str) -> InstallResult:
    """Create the control tables and triggers in the database (idempotent for the same origin).

    Every change committed after this transaction is logged. The position returned is
    where a copy taken right after this call starts."""
    if not isinstance(origin, str) or not origin.strip():
        raise UsageError("the origin id must be a non-empty string", hint="use the site or daemon name")
    with _connection(target) as con, _transaction(con, write=True):
        if _installed(con):
            have = _meta(con, "origin")
            if have != origin:
                raise StateConflict(f"change capture is already installed here for origin {have!r}, not {origin!r}",
                                    hint="if this file is a copy of another site's database, remove capture "
                                         "from it first (capture.remove), then install")
            res = _sync(con, emit=True)
            names = [r[0] for r in con.execute(f"SELECT name FROM {TABLES} WHERE active = 1 ORDER BY name")]
            return InstallResult(origin, _position(con), names, res.uncaptured, already=True, refresh=res)
        left = [r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE substr(name, 1, 9) = ?", (PREFIX,))
                if r[0] not in NOT_CAPTURES]
        if left:
            raise StateConflict(f"the database holds Bastion objects but no capture record ({', '.join(left[:5])})",
                                hint="remove them with capture.remove, then install again")
        con.execute(f"CREATE TABLE {LOG}(seq INTEGER PRIMARY KEY, hlc INTEGER NOT NULL, op INTEGER NOT NULL, "
                    "tbl INTEGER)")
        con.execute(f"INSERT INTO {LOG}(seq, hlc, op) VALUES (0, {NOW_MS_SQL} << {HLC_SHIFT}, {OP_MARK})")
        con.execute(f"CREATE TABLE {META}(key TEXT PRIMARY KEY, value)")
        con.execute(f"CREATE TABLE {TABLES}(id INTEGER PRIMARY KEY, name TEXT NOT NULL, active INTEGER NOT NULL, "
                    "shape TEXT NOT NULL)")
        _applied_table(con)
        shapes, other = _user_tables(con)
        for s in shapes.values():
            _capture_table(con, s)
        _set_meta(con, "origin", origin)
        _set_meta(con, "format", FORMAT)
        _set_meta(con, "installed_at", time.time())
        _remember_schema(con)
        return InstallResult(origin, _position(con), sorted(shapes), other)


def _remember_schema(con: apsw.Connection) -> None:
    _set_meta(con, "schema", _objects(con))
    _set_meta(con, "schema_version", _one(con, "PRAGMA schema_version"))


def _position(con: apsw.Connection) -> Position:
    seq, hlc = con.execute(f"SELECT seq, hlc FROM {LOG} ORDER BY seq DESC LIMIT 1").fetchall()[0]
    return Position(seq, hlc)


def position(target: apsw.Connection | str | os.PathLike) -> Position:
    """The last position given in this database (seq, hlc)."""
    with _connection(target) as con:
        _need_installed(con)
        return _position(con)


def origin_of(target: apsw.Connection | str | os.PathLike) -> str | None:
    with _connection(target) as con:
        return _meta(con, "origin") if _installed(con) else None


def is_installed(target: apsw.Connection | str | os.PathLike) -> bool:
    with _connection(target) as con:
        return _installed(con)


# -- schema changes -------------------------------------------------------------------

def refresh(target: apsw.Connection | str | os.PathLike) -> RefreshResult:
    """Bring control tables and triggers in line with the schema.

    Logs (at the next positions) the DDL a copy must run and the rows no trigger
    could see, and returns the DDL. ``reseed`` lists what DDL cannot replay: then a
    re-seed marker is logged instead, where :func:`apply` will stop."""
    with _connection(target) as con, _transaction(con, write=True):
        _need_installed(con)
        return _sync(con, emit=True)


def _next(con: apsw.Connection) -> tuple[int, int]:
    """The next position and clock value (nothing taken yet: the caller inserts them)."""
    seq, hlc = con.execute(f"SELECT seq + 1, max(hlc + 1, {NOW_MS_SQL} << {HLC_SHIFT}) FROM {LOG} "
                           "ORDER BY seq DESC LIMIT 1").fetchall()[0]
    return seq, hlc


def _log_entry(con: apsw.Connection, op: int, text: str) -> None:
    seq, hlc = _next(con)
    con.execute(f"INSERT INTO {LOG}(seq, hlc, op, c0) VALUES (?, ?, ?, ?)", (seq, hlc, op, text))


def _log_rows(con: apsw.Connection, tid: int, shape: Shape, op: int, where: str = "") -> int:
    """Log rows of the table as they are now (inserts of a new table, whole updates after ADD COLUMN)."""
    seq, hlc = _next(con)
    nv = len(shape.columns)
    order = ", ".join(_q(c) for c in shape.key_columns)
    xs = ", ".join(f"{_q(c)} AS x{i}" for i, c in enumerate(shape.columns))
    cols = [f"c{i}" for i in range(nv)] + ([f"c{nv + i}" for i in range(len(shape.key_pos))] if op == OP_UPDATE else [])
    vals = [f"x{i}" for i in range(nv)] + ([f"x{p}" for p in shape.key_pos] if op == OP_UPDATE else [])
    con.execute(f"INSERT INTO {LOG}(seq, hlc, op, tbl, {', '.join(cols)}) "
                f"SELECT ?1 + rn, ?2 + rn, {op}, {tid}, {', '.join(vals)} "
                f"FROM (SELECT row_number() OVER (ORDER BY {order}) - 1 AS rn, {xs} FROM {_q(shape.name)} {where}) "
                f"ORDER BY rn", (seq, hlc))
    return con.changes()


_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|--[^\n]*|/\*.*?(?:\*/|$)|.""", re.S)


def _split_top(text: str) -> list[str]:
    """Split SQL text on commas outside parentheses, quotes and comments."""
    parts, depth, cur = [], 0, []
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        if t == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(t)
    parts.append("".join(cur))
    return parts


def _first_name(coldef: str) -> str | None:
    m = re.match(r"""\s*(?:"((?:[^"]|"")*)"|`((?:[^`]|``)*)`|\[([^\]]*)\]|'((?:[^']|'')*)'|([^\s(]+))""", coldef)
    if not m:
        return None
    if m.group(1) is not None:
        return m.group(1).replace('""', '"')
    if m.group(2) is not None:
        return m.group(2).replace("``", "`")
    if m.group(4) is not None:
        return m.group(4).replace("''", "'")
    return m.group(3) if m.group(3) is not None else m.group(5)


def _added_column_defs(old_sql: str, new_sql: str, names: list[str]) -> list[str] | None:
    """The definitions of columns added by ALTER TABLE ADD COLUMN, cut out of the CREATE TABLE text.

    SQLite's ADD COLUMN inserts ", <definition as typed>" into the stored text and changes
    nothing else, so the new text is the old one with one insertion. Where the insertion sits
    can be ambiguous (", b" after "b" or before it): try each place, keep the one that parses."""
    extra = len(new_sql) - len(old_sql)
    if extra <= 0:
        return None
    p = 0
    while p < len(old_sql) and old_sql[p] == new_sql[p]:
        p += 1
    for at in range(p, -1, -1):
        if old_sql[at:] != new_sql[at + extra:]:
            continue
        defs = [d.strip() for d in _split_top(new_sql[at:at + extra])]
        if len(defs) > 1 and defs[0] == "":
            defs = defs[1:]
        elif len(defs) > 1 and defs[-1] == "":
            defs = defs[:-1]
        if len(defs) == len(names) and all(d and (_first_name(d) or "").lower() == n.lower()
                                           for d, n in zip(defs, names)):
            return defs
    return None


def _column_ddl(old: Shape, new: Shape, table: str) -> tuple[list[str], list[str], str | None]:
    """DDL for what changed in the columns of ``table``: (statements, added column names, reason to re-seed)."""
    if old.without_rowid != new.without_rowid:
        return [], [], f"table {table!r} was rebuilt (WITHOUT ROWID changed)"
    o, n = old.xinfo, new.xinfo
    if len(n) == len(o):
        ddl = []
        for a, b in zip(o, n):
            if a[1:] != b[1:]:
                return [], [], f"column {a[0]!r} of table {table!r} changed definition"
            if a[0] != b[0]:
                ddl.append(f"ALTER TABLE {_q(table)} RENAME COLUMN {_q(a[0])} TO {_bare_or_quoted(b[0])}")
        old_names = {a[0].lower() for a in o}
        renamed = [(a[0], b[0]) for a, b in zip(o, n) if a[0] != b[0]]
        # A swap (a->b, b->a) cannot be replayed one rename at a time.
        if any(b.lower() in old_names and b.lower() != a.lower() for a, b in renamed):
            return [], [], f"columns of table {table!r} were renamed onto each other's names"
        return ddl, [], None
    if len(n) > len(o) and n[:len(o)] == o:
        added = [c[0] for c in n[len(o):]]
        defs = _added_column_defs(old.sql, new.sql, added)
        if defs is None:
            return [], [], f"columns added to table {table!r} cannot be told apart in its definition"
        return [f"ALTER TABLE {_q(table)} ADD COLUMN {d}" for d in defs], added, None
    return [], [], f"columns of table {table!r} were dropped or changed"


def _bare_or_quoted(name: str) -> str:
    """SQLite writes a renamed column into the table's text as the ALTER named it; naming it the
    way the application most likely did keeps the copy's schema text equal."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name.upper() not in apsw.keywords:
        return name
    return _q(name)


def _unique_index(sql: str | None) -> bool:
    return bool(sql) and re.match(r"\s*CREATE\s+UNIQUE\s", sql, re.I) is not None


def _sync(con: apsw.Connection, emit: bool) -> RefreshResult:
    """Follow the schema; inside the caller's write transaction. ``emit=False`` (on a copy that just
    ran replicated DDL): only rebuild triggers and the record, log nothing."""
    res = RefreshResult()
    cookie = _one(con, "PRAGMA schema_version")
    if cookie == _meta(con, "schema_version"):
        res.position = _position(con)
        return res
    old_objs = _meta(con, "schema") or []
    now_objs = _objects(con)
    shapes, res.uncaptured = _user_tables(con)
    triggers = dict(con.execute("SELECT name, tbl_name FROM sqlite_schema WHERE type = 'trigger' AND "
                                "substr(name, 1, 9) = ?", (PREFIX,)).fetchall())
    active = [(tid, name, Shape.from_json(js)) for tid, name, js in
              con.execute(f"SELECT id, name, shape FROM {TABLES} WHERE active = 1 ORDER BY id").fetchall()]

    # Where is each captured table now? Our triggers follow a table through RENAME and go with DROP.
    moved: list[tuple[int, str, Shape, str]] = []
    lost: list[tuple[int, str, Shape]] = []
    rebuild: list[tuple[int | None, Shape | None, Shape | None, str]] = []   # old id, old shape, new shape, rows
    for tid, name, shape in active:
        on = {triggers[t] for t in _trigger_names(tid) if t in triggers}
        if not on:
            lost.append((tid, name, shape))
        elif len(on) > 1:
            res.reseed.append(f"the capture triggers of table {name!r} were moved to other tables")
            rebuild.append((tid, shape, None, "retire"))
        else:
            moved.append((tid, name, shape, on.pop()))
    claimed = {now for *_, now in moved}
    drops, renames, columns, creates = [], [], [], []
    rewritten: set[str] = set()          # tables whose indexes/triggers SQLite rewrote (renames)
    for tid, name, shape in lost:
        if name in shapes and name not in claimed:
            claimed.add(name)
            res.reseed.append(f"table {name!r} was dropped and created again (rebuilt)")
            rebuild.append((tid, shape, shapes[name], "none"))
        else:
            drops.append(f"DROP TABLE IF EXISTS {_q(name)}")
            rebuild.append((tid, shape, None, "retire"))
    for tid, name, shape, now in moved:
        new = shapes.get(now)
        if new is None:
            res.reseed.append(f"table {now!r} cannot be captured any more: {res.uncaptured.get(now, 'unknown')}")
            rebuild.append((tid, shape, None, "retire"))
            continue
        if now != name:
            renames.append(f"ALTER TABLE {_q(name)} RENAME TO {_q(now)}")
            rewritten.add(now)
        ddl, added, why = _column_ddl(shape, new, now)
        if why:
            res.reseed.append(why)
            rebuild.append((tid, shape, new, "none"))
            continue
        if ddl and not added:
            rewritten.add(now)
        columns += ddl
        complete = all(t in triggers for t in _trigger_names(tid))
        if now != name or ddl or not complete or not shape.same_structure(new) or shape.sql != new.sql:
            rebuild.append((tid, shape, new, "added" if added else "none"))
    for name, s in shapes.items():
        if name not in claimed:
            creates.append(s.sql)
            rebuild.append((None, None, s, "all"))

    # Indexes, views and the application's triggers: drop what went or changed, create what came or changed.
    def others(objs: list[list[Any]]) -> dict[tuple[str, str], tuple[str, str]]:
        return {(t, n): (tb, sql) for t, n, tb, sql in objs if t != "table" and sql}
    old_other, now_other = others(old_objs), others(now_objs)
    drop_other, create_other = [], []
    for (t, n), (tb, sql) in old_other.items():
        cur = now_other.get((t, n))
        if cur is not None and cur[1] == sql:
            continue
        drop_other.append(f"DROP {t.upper()} IF EXISTS {_q(n)}")
        # A UNIQUE index gone from a table that is still there: rows written since may break it,
        # and the copy (which still has it) would delete rows to make room. A rewrite by RENAME is fine.
        if t == "index" and _unique_index(sql) and not (cur is not None and cur[0] in rewritten) \
                and (tb in shapes or any(name == tb for _, name, _, _ in moved)):
            res.reseed.append(f"UNIQUE index {n!r} was dropped or changed: rows that break it may have been "
                              "written since")
    for t, n, tb, sql in now_objs:
        if t != "table" and sql and old_other.get((t, n), (None, None))[1] != sql:
            create_other.append(sql)
    # Views and triggers first: they may name tables or columns that change below.
    drop_other.sort(key=lambda d: 0 if d.startswith(("DROP VIEW", "DROP TRIGGER")) else 1)
    res.ddl = drop_other + drops + renames + columns + creates + create_other

    if not (res.ddl or rebuild or res.reseed) and now_objs == old_objs:
        # Only the cookie moved: VACUUM (or DDL undone before we looked). VACUUM may renumber
        # the rowids of tables without INTEGER PRIMARY KEY, and copies key those by rowid.
        risky = [name for _, name, sh in active if not sh.without_rowid
                 and sh.key_columns[0] not in [x[0] for x in sh.xinfo]]
        if risky:
            res.reseed.append("the schema cookie moved with no schema change (VACUUM?): rowids of "
                              f"{', '.join(map(repr, risky))} may have been renumbered")
    res.changed = bool(res.ddl or rebuild or res.reseed)

    logging = emit and not res.reseed
    if logging:
        for stmt in res.ddl:
            _log_entry(con, OP_DDL, stmt)
    for old_tid, old_shape, new_shape, rows in rebuild:
        if old_tid is not None:
            _retire(con, old_tid)
        if new_shape is None:
            continue
        tid = _capture_table(con, new_shape)
        if not logging:
            continue
        if rows == "all":
            res.rows_logged += _log_rows(con, tid, new_shape, OP_INSERT)
        elif rows == "added" and old_tid is not None and old_shape is not None:
            # Rows logged by the old triggers lack the new columns: log them again, whole, after the DDL.
            # (Rows logged before the ALTER are among them: more than needed, never less.)
            keys = ", ".join(_q(c) for c in new_shape.key_columns)
            logged = ", ".join(f"c{p}" for p in old_shape.key_pos)
            res.rows_logged += _log_rows(con, tid, new_shape, OP_UPDATE,
                                         f"WHERE ({keys}) IN (SELECT {logged} FROM {LOG} "
                                         f"WHERE tbl = {old_tid} AND op IN ({OP_INSERT}, {OP_UPDATE}))")
    if emit and res.reseed:
        _log_entry(con, OP_RESEED, "; ".join(res.reseed))
    _remember_schema(con)
    res.position = _position(con)
    return res


# -- reading and pruning ----------------------------------------------------------------

def read_changes(target: apsw.Connection | str | os.PathLike, after: int = 0, limit: int = 1000, *,
                 auto_refresh: bool = True) -> list[Change]:
    """Entries with position > ``after``, in position order, at most ``limit``.

    If the schema changed since the last look, :func:`refresh` runs first (``auto_refresh``),
    else :class:`StateConflict` is raised: entries logged under a schema that changed must
    not leave before the DDL that follows them is logged."""
    if limit <= 0:
        return []
    with _connection(target) as con:
        for _ in range(3):
            with _transaction(con, write=False):
                _need_installed(con)
                if _one(con, "PRAGMA schema_version") == _meta(con, "schema_version"):
                    return _read(con, after, limit)
            if not auto_refresh:
                raise StateConflict("the schema changed since capture last looked",
                                    hint="call capture.refresh, then read again")
            with _transaction(con, write=True):
                _sync(con, emit=True)
        raise BusyError("the schema kept changing while changes were read", hint="retry")


def _read(con: apsw.Connection, after: int, limit: int) -> list[Change]:
    origin = _meta(con, "origin")
    shapes = {tid: Shape.from_json(js) for tid, js in con.execute(f"SELECT id, shape FROM {TABLES}").fetchall()}
    names = [f"c{i}" for i in range(_width(con))]
    out = []
    for row in _fetch(con, names, after, limit):
        seq, hlc, op, tid = row[0], row[1], row[2], row[3]
        if op == OP_INSERT or op == OP_UPDATE or op == OP_DELETE:
            s = shapes[tid]
            nv, nk = len(s.columns), len(s.key_columns)
            out.append(Change(seq, hlc, _OP_NAME[op], s.name, s.columns,
                              tuple(row[4:4 + nv]) if op != OP_DELETE else None, s.key_columns,
                              tuple(row[4 + nv:4 + nv + nk]) if op != OP_INSERT else None, None, origin))
        elif op == OP_DDL or op == OP_RESEED:
            out.append(Change(seq, hlc, _OP_NAME[op], None, (), None, (), None, row[4], origin))
    return out


def _fetch(con: apsw.Connection, names: list[str], after: int, limit: int) -> list[tuple[Any, ...]]:
    where = f"FROM {LOG} WHERE seq > ? AND op != {OP_MARK} ORDER BY seq LIMIT ?"
    try:
        return con.execute(f"SELECT seq, hlc, op, tbl, {', '.join(names)} {where}", (after, limit)).fetchall()
    except UnicodeDecodeError:
        pass
    # Some text is not valid UTF-8: read text as bytes, and keep what does not decode as RawText.
    codec = _CODECS.get(_one(con, "PRAGMA encoding"), "utf-8")
    sel = ", ".join(f"CASE WHEN typeof({n}) = 'text' THEN CAST({n} AS BLOB) ELSE {n} END, typeof({n}) = 'text'"
                    for n in names)
    rows = []
    for r in con.execute(f"SELECT seq, hlc, op, tbl, {sel} {where}", (after, limit)):
        vals = []
        for i in range(len(names)):
            v, is_text = r[4 + 2 * i], r[5 + 2 * i]
            if is_text:
                try:
                    v = bytes(v).decode(codec)
                except UnicodeDecodeError:
                    v = RawText(v)
            vals.append(v)
        rows.append((r[0], r[1], r[2], r[3], *vals))
    return rows


def prune(target: apsw.Connection | str | os.PathLike, up_to: int) -> int:
    """Delete entries at positions <= ``up_to`` (acknowledged by every copy); returns how many.

    The last entry always stays: the next position and clock value follow from it."""
    with _connection(target) as con, _transaction(con, write=True):
        _need_installed(con)
        con.execute(f"DELETE FROM {LOG} WHERE seq <= ? AND seq < (SELECT max(seq) FROM {LOG}) AND op != {OP_MARK}",
                    (up_to,))
        n = con.changes()
        if _one(con, f"SELECT count(*) FROM {TABLES} WHERE active = 0"):
            con.execute(f"DELETE FROM {TABLES} WHERE active = 0 AND id NOT IN (SELECT tbl FROM {LOG} "
                        "WHERE tbl IS NOT NULL)")
        return n


def pending(target: apsw.Connection | str | os.PathLike, after: int = 0) -> int:
    """How many entries are logged past ``after`` and not pruned."""
    with _connection(target) as con:
        _need_installed(con)
        return _one(con, f"SELECT count(*) FROM {LOG} WHERE seq > ? AND op != {OP_MARK}", (after,))


# -- applying on a copy -------------------------------------------------------------------

def _applied_table(con: apsw.Connection) -> None:
    if not _exists(con, APPLIED):
        _own_ddl(con, f"CREATE TABLE {APPLIED}(origin TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                      "hlc INTEGER NOT NULL, at REAL NOT NULL)")


def applied_position(target: apsw.Connection | str | os.PathLike, origin: str) -> int | None:
    """Last position of ``origin`` applied to this copy, or None if it never received any."""
    with _connection(target) as con:
        if not _exists(con, APPLIED):
            return None
        return _one(con, f"SELECT seq FROM {APPLIED} WHERE origin = ?", (origin,))


def set_applied(target: apsw.Connection | str | os.PathLike, origin: str, seq: int, hlc: int = 0) -> None:
    """Record that this copy holds every change of ``origin`` up to ``seq`` (after seeding it from a snapshot)."""
    with _connection(target) as con, _transaction(con, write=True):
        _applied_table(con)
        con.execute(f"INSERT OR REPLACE INTO {APPLIED}(origin, seq, hlc, at) VALUES (?, ?, ?, ?)",
                    (origin, seq, hlc, time.time()))


def _upsert_sql(table: str, columns: Sequence[str], marks: Sequence[str]) -> str:
    return f"INSERT OR REPLACE INTO {_q(table)}({', '.join(map(_q, columns))}) VALUES ({', '.join(marks)})"


def _delete_sql(table: str, keys: Sequence[str], marks: Sequence[str]) -> str:
    return f"DELETE FROM {_q(table)} WHERE " + " AND ".join(f"{_q(n)} = {m}" for n, m in zip(keys, marks))


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b))


def apply(target: apsw.Connection | str | os.PathLike, changes: Iterable[Change], origin: str) -> ApplyResult:
    """Apply a batch of ``origin``'s changes to this copy: atomically, in order, idempotently.

    Entries at or before the position recorded for ``origin`` are skipped; the rest must
    follow it without a gap. Nothing is captured here as a local change."""
    batch = list(changes)
    _check_order(batch)
    with _connection(target) as con:
        if con.in_transaction:
            raise UsageError("the connection is already in a transaction",
                             hint="apply runs its own transaction; commit or roll back first")
        triggers_were = con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1)
        fk_was = _one(con, "PRAGMA foreign_keys")
        con.execute("PRAGMA foreign_keys = OFF")        # no effect inside a transaction: set before BEGIN
        con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        try:
            with _transaction(con, write=True):
                return _apply(con, batch, origin)
        finally:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, triggers_were)
            con.execute(f"PRAGMA foreign_keys = {int(bool(fk_was))}")


def _check_order(batch: list[Change]) -> None:
    for a, b in zip(batch, batch[1:]):
        if b.seq <= a.seq:
            raise UsageError(f"changes are out of order: position {b.seq} after {a.seq}",
                             hint="apply entries in the order read_changes returned them")


@contextmanager
def applying(cons: Sequence[apsw.Connection], origin: str, lock_timeout: float = 10.0,
             between_commits: Callable[[], None] | None = None
             ) -> Iterator[Callable[[int, Iterable[Change]], ApplyResult]]:
    """Apply batches to several files of one database as one unit: ``apply(i, changes)``.

    Every file's write lock is taken before anything is written, and the files commit
    one after the other only once every batch went in: a reader that takes the write
    locks of all files (as Bastion's own pause does) never sees one file ahead of
    another. Any error rolls every file back. Commits are per file (SQLite has no
    atomic commit across WAL files): a crash between two of them is the caller's to
    redo, which :func:`apply`'s per-file positions make idempotent."""
    saved = []
    for con in cons:
        if con.in_transaction:
            raise UsageError("the connection is already in a transaction",
                             hint="applying runs its own transaction; commit or roll back first")
        saved.append((con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1), _one(con, "PRAGMA foreign_keys")))
    begun: list[apsw.Connection] = []
    try:
        for con in cons:
            con.execute("PRAGMA foreign_keys = OFF")     # no effect inside a transaction: set before BEGIN
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                for con in cons:
                    con.execute("BEGIN IMMEDIATE")
                    begun.append(con)
                break
            except apsw.BusyError:
                # Someone holds a later file's lock (a pause of all files, taken in another
                # order): let go of ours so it can finish, then take them all again.
                for con in reversed(begun):
                    con.execute("ROLLBACK")
                begun.clear()
                if time.monotonic() > deadline:
                    raise BusyError(f"the copy's files stayed locked for {lock_timeout:g} s",
                                    hint="a long read or write transaction holds them; retry") from None
                time.sleep(0.005)

        def apply_one(i: int, changes: Iterable[Change]) -> ApplyResult:
            batch = list(changes)
            _check_order(batch)
            return _apply(cons[i], batch, origin)

        yield apply_one
        while begun:
            begun[0].execute("COMMIT")
            begun.pop(0)
            if begun and between_commits is not None:
                between_commits()      # crash tests: die with some files committed, not all
    finally:
        for con in reversed(begun):
            if con.in_transaction:
                con.execute("ROLLBACK")
        for con, (trig, fk) in zip(cons, saved):
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
            con.execute(f"PRAGMA foreign_keys = {int(bool(fk))}")


def _apply(con: apsw.Connection, batch: list[Change], origin: str) -> ApplyResult:
    _applied_table(con)
    done = _one(con, f"SELECT seq FROM {APPLIED} WHERE origin = ?", (origin,))
    todo = batch if done is None else [c for c in batch if c.seq > done]
    skipped = len(batch) - len(todo)
    if not todo:
        return ApplyResult(origin, 0, skipped, done if done is not None else 0, 0, 0)
    first = todo[0].seq if done is None else done + 1
    if todo[0].seq != first or todo[-1].seq != first + len(todo) - 1:   # batch is strictly increasing
        i = next(i for i, c in enumerate(todo) if c.seq != first + i)
        raise ChangesMissing(f"changes of {origin!r} are missing: expected position {first + i}, got {todo[i].seq}",
                             hint="send the changes from the recorded position on, or re-seed the copy",
                             details={"expected": first + i, "got": todo[i].seq})
    cur = con.cursor()
    sqls: dict[tuple[Any, ...], tuple[str, str, tuple[int, ...]]] = {}   # per shape (its tuples are shared)
    run_sql: str | None = None
    run: list[Sequence[Any]] = []

    def flush() -> None:
        if len(run) == 1:
            cur.execute(run_sql, run[0])
        elif run:
            cur.executemany(run_sql, run)
        run.clear()

    rows = ddl = 0
    for c in todo:
        op = c.op
        if op == "insert" or op == "update" or op == "delete":
            k = (c.table, id(c.columns), id(c.key_columns))
            got = sqls.get(k)
            if got is None:
                got = sqls[k] = (_upsert_sql(c.table, c.columns, ["?"] * len(c.columns)),
                                 _delete_sql(c.table, c.key_columns, ["?"] * len(c.key_columns)),
                                 tuple(c.columns.index(n) for n in c.key_columns))
            steps: tuple[tuple[str, Sequence[Any], bool], ...]
            if op == "insert":
                steps = ((got[0], c.values, False),)
            elif op == "delete":
                steps = ((got[1], c.key, True),)
            elif _same(c.key, [c.values[p] for p in got[2]]):
                steps = ((got[0], c.values, False),)
            else:   # the key moved: the row leaves its old place first
                steps = ((got[1], c.key, True), (got[0], c.values, False))
            for sql, params, is_delete in steps:
                if RawText in map(type, params):
                    # Text that is not valid UTF-8 goes in as bytes; CAST makes it text again, byte for byte.
                    flush()
                    run_sql = None
                    marks = ["CAST(? AS TEXT)" if type(v) is RawText else "?" for v in params]
                    cur.execute(_delete_sql(c.table, c.key_columns, marks) if is_delete
                                else _upsert_sql(c.table, c.columns, marks),
                                [bytes(v) if type(v) is RawText else v for v in params])
                    continue
                if sql is not run_sql:
                    flush()
                    run_sql = sql
                run.append(params)
            rows += 1
        elif op == "ddl":
            flush()
            run_sql = None
            cur.execute(c.sql)
            ddl += 1
        elif op == "reseed":
            raise ReseedNeeded(f"the source needs a re-seed at position {c.seq}: {c.sql}",
                               hint="seed this copy again from a snapshot taken at or after that position",
                               details={"position": c.seq, "reason": c.sql})
        else:
            raise UsageError(f"unknown change operation {op!r} at position {c.seq}")
    flush()
    last = todo[-1]
    con.execute(f"INSERT OR REPLACE INTO {APPLIED}(origin, seq, hlc, at) VALUES (?, ?, ?, ?)",
                (origin, last.seq, last.hlc, time.time()))
    if ddl and _installed(con):
        _sync(con, emit=False)     # our own capture follows the new schema without logging it as local
    return ApplyResult(origin, len(todo), skipped, last.seq, rows, ddl)


# -- wire form ---------------------------------------------------------------------------

def to_wire(changes: Sequence[Change]) -> dict[str, Any]:
    """Changes as plain lists, ints, floats, str and bytes (msgpack- or pickle-ready).

    Table shapes are sent once per batch; text that is not valid UTF-8 becomes ``[bytes]``."""
    shapes: dict[tuple[Any, ...], int] = {}
    rows = []

    def vals(v: Sequence[Any] | None) -> list[Any] | None:
        return None if v is None else [[bytes(x)] if type(x) is RawText else x for x in v]
    for c in changes:
        k = (c.table, c.columns, c.key_columns)
        idx = shapes.setdefault(k, len(shapes))
        rows.append([c.seq, c.hlc, c.op, idx, vals(c.values), vals(c.key), c.sql])
    origin = changes[0].origin if changes else None
    return {"origin": origin, "shapes": [[t, list(cs), list(ks)] for t, cs, ks in shapes],
            "changes": rows}


def from_wire(data: dict[str, Any]) -> list[Change]:
    shapes = [(t, tuple(cs), tuple(ks)) for t, cs, ks in data["shapes"]]
    origin = data["origin"]

    def vals(v: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if v is None else tuple(RawText(x[0]) if isinstance(x, list) else x for x in v)
    return [Change(seq, hlc, op, shapes[i][0], shapes[i][1], vals(v), shapes[i][2], vals(k), sql, origin)
            for seq, hlc, op, i, v, k, sql in data["changes"]]


# -- status and removal -------------------------------------------------------------------

def status(target: apsw.Connection | str | os.PathLike) -> dict[str, Any]:
    with _connection(target) as con, _transaction(con, write=False):
        if not _installed(con):
            return {"installed": False}
        return {"installed": True, "origin": _meta(con, "origin"), "position": _position(con)._asdict(),
                "oldest_logged": _one(con, f"SELECT min(seq) FROM {LOG} WHERE op != {OP_MARK}"),
                "tables": [r[0] for r in con.execute(f"SELECT name FROM {TABLES} WHERE active = 1 ORDER BY name")],
                "schema_current": _one(con, "PRAGMA schema_version") == _meta(con, "schema_version")}


def remove(target: apsw.Connection | str | os.PathLike, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Drop every Bastion trigger and table from the database; user tables and rows stay as they are.

    ``keep``: tables to leave (a copy taking over keeps its conflict log)."""
    with _connection(target) as con, _transaction(con, write=True):
        objs = con.execute("SELECT type, name FROM sqlite_schema WHERE substr(name, 1, 9) = ? "
                           "AND type IN ('trigger', 'view', 'table') ORDER BY type = 'table'", (PREFIX,)).fetchall()
        objs = [(k, n) for k, n in objs if n not in keep]
        for kind, name in objs:
            con.execute(f"DROP {kind.upper()} IF EXISTS main.{_q(name)}")
        return {"removed": [n for _, n in objs]}
