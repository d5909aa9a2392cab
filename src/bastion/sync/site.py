"""n-way sync of one SQLite file: the state a site keeps, and the operations on it.

Every file of a synced database is synced on its own (like replication). A site id
(``"paris"``) is also the capture origin of the file: change capture (capture.py) logs
every local change with a gap-free position and a hybrid logical clock value
(``hlc = unix_ms << 16 | counter``); sync turns that log into versions of rows that
sites exchange, and decides, when two sites changed the same row without seeing each
other's change, which version stays (policy.py). The losing version is recorded, never
dropped.

Control tables (named ``_bastion_sync_*`` / ``_bastion_conflicts``: capture.remove drops them)
-------------------------------------------------------------------------------------
``_bastion_sync_meta``    site id, format, ``ingested``: the last capture position read.
``_bastion_sync_rows``    per row ever changed since install (table, key = msgpack of the key
                          values): its current version (hlc, origin, deleted), ``vv``: the
                          highest hlc per origin of every version of that row seen here (a
                          version vector per row), and ``siblings``: versions that lost a
                          conflict here and that nothing seen here has superseded yet
                          (with their values). A row never changed has no entry.
``_bastion_sync_log``     every change known here, local and remote, in arrival order
                          (``lseq``): origin, ``oseq`` (that origin's gap-free number), hlc,
                          op, shape (-> ``_bastion_sync_shapes``: table, columns, key
                          columns), key, values (capture's values, msgpack, exact for every
                          type), base (the row's version at the origin when it was made)
                          and ``ctx`` (the row's ``vv`` at the origin then). Kept for
                          forwarding to other sites until every peer holds it.
``_bastion_sync_seen``    per origin: the highest oseq held here (contiguous), its hlc, and
                          how far the log of that origin was pruned.
``_bastion_sync_peers``   per peer site and origin: the highest oseq the peer is known to hold.
``_bastion_conflicts``    every conflict: when, table, key, policy, outcome, both versions
                          (hlc, origin, deleted or values), and how it was resolved.

Algorithm
---------
*Ingest* (inside every operation's write transaction) reads capture's log after
``ingested`` and appends each local row change to the sync log with the next local oseq:
its ctx is the row's ``vv`` here, so a local change supersedes every version this site
has seen of the row (the application wrote on top of what it saw). An update that moved
the key is a delete of the old key then an upsert of the new one. Capture's DDL entries
go out as ``ddl`` changes; a capture re-seed marker stops sync (the site needs a new
snapshot). Capture's log is then pruned up to what was ingested.

*Sending* (:func:`changes_for`) returns the log entries the peer lacks (oseq above its
vector for their origin) in arrival order. A site logs a change only after everything
it had seen when the change was made, so arrival order is causal, and a prefix of it
(``limit``) keeps each origin contiguous and every change after its causes.

*Applying* (:func:`apply`) runs one ``BEGIN IMMEDIATE`` transaction with triggers and
foreign keys off (nothing applied is captured again; the application's triggers and
cascades ran at the origin and came as rows). Per change: a duplicate (oseq already
seen) is skipped; a gap is refused. For a row change X:

- if the row's ``vv`` here already covers X (``vv[X.origin] >= X.hlc``), something seen
  here was made after X: X is superseded and the table keeps its row;
- else the *frontier* is X plus the current version and siblings that X's ctx does not
  cover (versions X's site had not seen). Frontier of one: X follows everything here,
  it is applied. Otherwise it is a conflict: the policy picks the winner among the
  frontier (for lww, the highest (hlc, origin)); the table gets the winner's values, the
  rest stay as siblings, and the conflict is recorded with both versions (nothing is
  recorded when both hold the same values).

Each site therefore holds, per row, the policy's winner among the versions that no other
version it has seen supersedes: the same set on every site once they have seen the same
changes, whatever the order, so sites converge for any policy that is an order (lww,
priority, update_delete). Comparing only the row's current version with the change's
base is not enough beyond lww: a site that never saw a losing version may build on the
winner, and the loser must then be weighed against that new version, not dropped.

Every change received is logged and counted in ``seen`` (losers too: other sites must
get them). At the end of the batch, the clock of the file moves past the highest hlc
received (the HLC receive rule): the next local change orders after every change seen.
A site whose clock runs an hour ahead wins concurrent lww conflicts, but every change
made anywhere after seeing its changes orders after them.

*Resolving*: ``reapply`` writes the losing version again as a new local change (through
the triggers, so it is captured and syncs out and supersedes what this site has seen);
``dismiss`` marks the conflict resolved. A resolver's merged row is written the same way.

*Seeding* a new site: a page copy of a current site's file, then :func:`adopt` under a
new site id. The copy keeps the rows, versions, log and vector of the source (it holds
what the source held); capture entries the source had not read yet are first ingested
under the source's id, as the source will ingest them, so both number them alike.

*Pruning*: :func:`prune` drops log entries every listed peer is known to hold
(:func:`apply` records what the sending peer holds, :func:`record_peer` what a peer
reported). A peer asking for pruned changes gets a clear error, never a silent gap.
Ingest prunes capture's log up to what it read: a file that is also replicated one way
needs both readers' positions before capture's log is pruned (the daemon's concern).

Limits: keys are compared by value and type (a key that differs only by collation, such
as 'a' and 'A' under NOCASE, or 1 and 1.0, is another row to sync); UNIQUE constraints on
non-key columns are not reconciled (``INSERT OR REPLACE`` of a remote row deletes the
local row it collides with, which is not recorded); tombstones stay in the rows table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import apsw
import msgpack

from .. import capture
from ..capture import RawText
from ..errors import ChangesMissing, StateConflict, UsageError
from . import conflict_log
from .policy import Policy, Version, same_row

FORMAT = 1
META = "_bastion_sync_meta"
ROWS = "_bastion_sync_rows"
LOG = "_bastion_sync_log"
SHAPES = "_bastion_sync_shapes"
SEEN = "_bastion_sync_seen"
PEERS = "_bastion_sync_peers"
IDS = "_bastion_sync_ids"
COUNTERS = "_bastion_sync_counters"
CONFLICTS = conflict_log.TABLE
KEY_STRATEGIES = ("rekey", "shared")
REKEY_POLICY = "keys:rekey"

OP_INSERT, OP_UPDATE, OP_DELETE, OP_DDL = 1, 2, 3, 4
_OP_NAME = {OP_INSERT: "insert", OP_UPDATE: "update", OP_DELETE: "delete", OP_DDL: "ddl"}
_OP_CODE = {v: k for k, v in _OP_NAME.items()}
_READ_CHUNK = 2000

_TABLES_SQL = [
    f"CREATE TABLE IF NOT EXISTS {META}(key TEXT PRIMARY KEY, value)",
    (f"CREATE TABLE IF NOT EXISTS {ROWS}(tbl TEXT NOT NULL, key BLOB NOT NULL, hlc INTEGER NOT NULL, "
     "origin TEXT NOT NULL, deleted INTEGER NOT NULL, vv BLOB NOT NULL, siblings BLOB, "
     "PRIMARY KEY(tbl, key)) WITHOUT ROWID"),
    (f"CREATE TABLE IF NOT EXISTS {SHAPES}(id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, columns TEXT NOT NULL, "
     "key_columns TEXT NOT NULL, UNIQUE(tbl, columns, key_columns))"),
    (f"CREATE TABLE IF NOT EXISTS {LOG}(lseq INTEGER PRIMARY KEY, origin TEXT NOT NULL, oseq INTEGER NOT NULL, "
     "hlc INTEGER NOT NULL, op INTEGER NOT NULL, shape INTEGER, key BLOB, vals BLOB, base_hlc INTEGER, "
     "base_origin TEXT, ctx BLOB, sql TEXT, counters BLOB, UNIQUE(origin, oseq))"),
    (f"CREATE TABLE IF NOT EXISTS {SEEN}(origin TEXT PRIMARY KEY, oseq INTEGER NOT NULL, hlc INTEGER NOT NULL, "
     "pruned INTEGER NOT NULL DEFAULT 0)"),
    (f"CREATE TABLE IF NOT EXISTS {PEERS}(peer TEXT NOT NULL, origin TEXT NOT NULL, oseq INTEGER NOT NULL, "
     "at REAL NOT NULL, PRIMARY KEY(peer, origin)) WITHOUT ROWID"),
    conflict_log.DDL,
    # Every creation (an insert made where its site had no version of the row) seen per key, and
    # the key its row lives at now: a later concurrent creation of the same key moves (rekey).
    (f"CREATE TABLE IF NOT EXISTS {IDS}(tbl TEXT NOT NULL, key BLOB NOT NULL, hlc INTEGER NOT NULL, "
     "origin TEXT NOT NULL, at_key BLOB NOT NULL, PRIMARY KEY(tbl, key, origin, hlc)) WITHOUT ROWID"),
    # Counter columns: per row and column, the value the group started from and each site's total delta.
    (f"CREATE TABLE IF NOT EXISTS {COUNTERS}(tbl TEXT NOT NULL, key BLOB NOT NULL, col TEXT NOT NULL, base, "
     "contrib BLOB NOT NULL, PRIMARY KEY(tbl, key, col)) WITHOUT ROWID"),
]


class SyncChange(NamedTuple):
    """One change as sites exchange it.

    Row changes: ``key`` (in ``key_columns`` order) and, for insert/update, ``values`` (the
    whole row in ``columns`` order; None for a delete). ``base``: the row's version (hlc,
    origin) at the origin when the change was made, None if it had none. ``ctx``: the
    highest hlc per origin of the versions of that row the origin had seen. ``ddl``:
    ``sql`` to run."""
    origin: str
    oseq: int
    hlc: int
    op: str
    table: str | None
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    key: tuple[Any, ...] | None
    values: tuple[Any, ...] | None
    base: tuple[int, str] | None
    ctx: dict[str, int]
    sql: str | None
    counters: dict[str, int] | None = None     # counter column -> the origin's total delta on this row

    @property
    def time(self) -> float:
        return (self.hlc >> capture.HLC_SHIFT) / 1000.0


@dataclass
class ApplyResult:
    received: int = 0        # changes in the batch
    applied: int = 0         # written to the table (no conflict)
    skipped: int = 0         # already held here (duplicates)
    superseded: int = 0      # older than what this site has of the row: logged, not written
    conflicts: int = 0       # recorded in _bastion_conflicts
    won: int = 0             # conflicts the incoming version won
    merged: int = 0          # conflicts a resolver merged into a new local change
    rekeyed: int = 0         # concurrent inserts of one key: the later one moved to a key of its own
    ddl: int = 0
    vector: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- encoding --------------------------------------------------------------------------------

def _wire(v: Any) -> Any:
    return [bytes(v)] if type(v) is RawText else v


def _unwire(v: Any) -> Any:
    return RawText(v[0]) if type(v) is list else v


def _pack(values: Sequence[Any] | None) -> bytes | None:
    if values is None:
        return None
    return msgpack.packb([_wire(v) for v in values], use_bin_type=True)


def _unpack(blob: bytes | None) -> tuple[Any, ...] | None:
    if blob is None:
        return None
    return tuple(_unwire(v) for v in msgpack.unpackb(blob, raw=False))


def _pack_vv(vv: Mapping[str, int]) -> bytes:
    return msgpack.packb(dict(vv), use_bin_type=True)


def _unpack_vv(blob: bytes | None) -> dict[str, int]:
    return {} if blob is None else msgpack.unpackb(blob, raw=False)


def _covered(hlc: int, origin: str, vv: Mapping[str, int]) -> bool:
    """A version is covered by a version vector when a version of its origin at least as
    recent is in it: that origin's versions of a row are made one after the other."""
    return vv.get(origin, -1) >= hlc


def _total(base: Any, contrib: Mapping[str, int]) -> int:
    return (base if type(base) is int else 0) + sum(contrib.values())


def _fresh_key(table: str, hlc: int, origin: str, keyb: bytes) -> int:
    """Where a concurrent insert moves: the same key at every site (a hash of who made it when),
    negative, so that no site's rowid allocator (max + 1) ever hands it out or climbs after it."""
    h = hashlib.sha256(b"\0".join([table.encode(), origin.encode(), str(hlc).encode(), keyb])).digest()
    return -1 - (int.from_bytes(h[:8], "big") >> 2)


def _with_key(v: Version, key_columns: Sequence[str], newk: int) -> Version:
    if v.values is None or key_columns[0] not in v.columns:
        return v
    vals = list(v.values)
    vals[v.columns.index(key_columns[0])] = newk
    return Version(v.hlc, v.origin, v.columns, tuple(vals))


def _rekeyed(ch: SyncChange, newk: int) -> SyncChange:
    vals = ch.values
    if vals is not None:
        vals = tuple(newk if c == ch.key_columns[0] else v for c, v in zip(ch.columns, vals))
    return ch._replace(key=(newk,), values=vals)


def _join(vv: dict[str, int], other: Mapping[str, int]) -> dict[str, int]:
    for o, h in other.items():
        if vv.get(o, -1) < h:
            vv[o] = h
    return vv


# -- connections and transactions -------------------------------------------------------------

@contextmanager
def _connection(target: apsw.Connection | str | os.PathLike[str]) -> Iterator[apsw.Connection]:
    if isinstance(target, apsw.Connection):
        yield target
        return
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such database file", path=path,
                         hint="name an existing SQLite database; sync never creates one")
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    con.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)     # never checkpoint the application's WAL on close
    con.setbusytimeout(10_000)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def _transaction(con: apsw.Connection, write: bool = True, quiet: bool = False) -> Iterator[None]:
    """``quiet``: triggers and foreign keys off for the transaction (set before BEGIN: the
    foreign_keys pragma does nothing inside one)."""
    if con.in_transaction:
        raise UsageError("the connection is already in a transaction",
                         hint="sync functions run their own transaction; commit or roll back first")
    saved = None
    if quiet:
        saved = (con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1), capture._one(con, "PRAGMA foreign_keys"))
        con.execute("PRAGMA foreign_keys = OFF")
        con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    try:
        with capture._transaction(con, write):      # begin, commit or roll back: capture's own
            yield
    finally:
        if saved is not None:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, saved[0])
            con.execute(f"PRAGMA foreign_keys = {int(bool(saved[1]))}")


def _installed(con: apsw.Connection) -> bool:
    return capture._exists(con, META)


# -- the state of one site, inside one transaction ---------------------------------------------

class _Row:
    __slots__ = ("deleted", "hlc", "origin", "siblings", "vv")

    def __init__(self, hlc: int, origin: str, deleted: bool, vv: dict[str, int], siblings: list[Version]) -> None:
        self.hlc, self.origin, self.deleted, self.vv, self.siblings = hlc, origin, deleted, vv, siblings


class _Site:
    """The sync state of one file, used inside one transaction of the caller."""

    def __init__(self, con: apsw.Connection) -> None:
        if not _installed(con):
            raise StateConflict("sync is not installed in this database",
                                hint="install it first (sync.install(target, site))")
        self.con = con
        self.cur = con.cursor()
        meta = dict(con.execute(f"SELECT key, value FROM {META}").fetchall())
        self.site: str = meta["site"]
        if meta.get("format") != FORMAT:
            raise StateConflict(f"sync tables of format {meta.get('format')}, this Bastion knows {FORMAT}")
        self.ingested: int = int(meta["ingested"])
        self.seen: dict[str, list[int]] = {o: [n, h, p] for o, n, h, p in
                                           con.execute(f"SELECT origin, oseq, hlc, pruned FROM {SEEN}")}
        self.dirty: set[str] = set()
        self.shape_ids: dict[tuple[str, tuple[str, ...], tuple[str, ...]], int] = {}
        self.shapes: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
        self.key_pos: dict[tuple[str, tuple[str, ...], tuple[str, ...]], tuple[int, ...]] = {}
        self.local_shapes: dict[str, capture.Shape | None] = {}
        self.ingested_now = 0
        # Per table: its counter columns, and how concurrent inserts of one key are kept (configure()).
        self.counter_cols: dict[str, tuple[str, ...]] = {}
        for t, c in json.loads(meta.get("counters") or "[]"):
            self.counter_cols[t] = (*self.counter_cols.get(t, ()), c)
        self.key_rules: dict[str, str] = json.loads(meta.get("keys") or "{}")

    # shapes ---------------------------------------------------------------------------------

    def shape_id(self, table: str, columns: tuple[str, ...], key_columns: tuple[str, ...]) -> int:
        k = (table, tuple(columns), tuple(key_columns))
        sid = self.shape_ids.get(k)
        if sid is None:
            cols, keys = json.dumps(k[1]), json.dumps(k[2])
            sid = capture._one(self.con, f"SELECT id FROM {SHAPES} WHERE tbl = ? AND columns = ? AND key_columns = ?",
                               (table, cols, keys))
            if sid is None:
                self.cur.execute(f"INSERT INTO {SHAPES}(tbl, columns, key_columns) VALUES (?, ?, ?)",
                                 (table, cols, keys))
                sid = self.con.last_insert_rowid()
            self.shape_ids[k] = sid
            self.shapes[sid] = k
        return sid

    def shape(self, sid: int) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        got = self.shapes.get(sid)
        if got is None:
            t, c, k = self.con.execute(f"SELECT tbl, columns, key_columns FROM {SHAPES} WHERE id = ?",
                                       (sid,)).fetchall()[0]
            got = self.shapes[sid] = (t, tuple(json.loads(c)), tuple(json.loads(k)))
            self.shape_ids[got] = sid
        return got

    def positions(self, table: str, columns: tuple[str, ...], key_columns: tuple[str, ...]) -> tuple[int, ...]:
        k = (table, columns, key_columns)
        got = self.key_pos.get(k)
        if got is None:
            got = self.key_pos[k] = tuple(columns.index(c) for c in key_columns)
        return got

    def local_shape(self, table: str) -> capture.Shape | None:
        if table not in self.local_shapes:
            js = capture._one(self.con, f"SELECT shape FROM {capture.TABLES} WHERE name = ? AND active = 1", (table,))
            self.local_shapes[table] = capture.Shape.from_json(js) if js else None
        return self.local_shapes[table]

    # rows -----------------------------------------------------------------------------------

    def row(self, table: str, keyb: bytes) -> _Row | None:
        got = self.cur.execute(f"SELECT hlc, origin, deleted, vv, siblings FROM {ROWS} WHERE tbl = ? AND key = ?",
                               (table, keyb)).fetchall()
        if not got:
            return None
        hlc, origin, deleted, vv, sib = got[0]
        sibs = [] if sib is None else [Version(h, o, tuple(c), None if v is None else _unpack(v))
                                       for h, o, c, v in msgpack.unpackb(sib, raw=False)]
        return _Row(hlc, origin, bool(deleted), _unpack_vv(vv), sibs)

    def put_row(self, table: str, keyb: bytes, r: _Row) -> None:
        sib = None if not r.siblings else msgpack.packb(
            [[s.hlc, s.origin, list(s.columns), _pack(s.values)] for s in r.siblings], use_bin_type=True)
        self.cur.execute(f"INSERT OR REPLACE INTO {ROWS}(tbl, key, hlc, origin, deleted, vv, siblings) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (table, keyb, r.hlc, r.origin, int(r.deleted),
                                                          _pack_vv(r.vv), sib))

    def read_current(self, table: str, key_columns: Sequence[str], key: Sequence[Any],
                     r: _Row) -> Version:
        """The row's current version with its values as the table holds them now."""
        if r.deleted:
            return Version(r.hlc, r.origin, (), None)
        shape = self.local_shape(table)
        if shape is None:
            raise StateConflict(f"table {table!r} is not captured here", hint="check the schema of this site")
        cols = shape.columns
        where = " AND ".join(f"{capture._q(n)} = {'CAST(? AS TEXT)' if type(v) is RawText else '?'}"
                             for n, v in zip(key_columns, key))
        params = [bytes(v) if type(v) is RawText else v for v in key]
        try:
            got = self.con.execute(f"SELECT {', '.join(map(capture._q, cols))} FROM {capture._q(table)} "
                                   f"WHERE {where}", params).fetchall()
            vals = got[0] if got else None
        except UnicodeDecodeError:
            # Text that is not valid UTF-8: read text as bytes and keep what does not decode as RawText.
            sel = ", ".join(f"CASE WHEN typeof({capture._q(c)}) = 'text' THEN CAST({capture._q(c)} AS BLOB) "
                            f"ELSE {capture._q(c)} END, typeof({capture._q(c)}) = 'text'" for c in cols)
            got = self.con.execute(f"SELECT {sel} FROM {capture._q(table)} WHERE {where}", params).fetchall()
            vals = None
            if got:
                out = []
                for i in range(len(cols)):
                    v, is_text = got[0][2 * i], got[0][2 * i + 1]
                    if is_text:
                        try:
                            v = bytes(v).decode("utf-8")
                        except UnicodeDecodeError:
                            v = RawText(v)
                    out.append(v)
                vals = tuple(out)
        # A row the table lost behind capture's back (REPLACE on another UNIQUE column) counts as deleted.
        return Version(r.hlc, r.origin, tuple(cols), None if vals is None else tuple(vals))

    def write(self, table: str, key_columns: Sequence[str], key: Sequence[Any], v: Version) -> None:
        """Make the table hold version ``v`` of the row (upsert of the whole row, or delete)."""
        if v.values is None:
            names, params = key_columns, key
            marks = ["CAST(? AS TEXT)" if type(x) is RawText else "?" for x in params]
            sql = capture._delete_sql(table, names, marks)
        else:
            params = v.values
            marks = ["CAST(? AS TEXT)" if type(x) is RawText else "?" for x in params]
            sql = capture._upsert_sql(table, v.columns, marks)
        try:
            self.cur.execute(sql, [bytes(x) if type(x) is RawText else x for x in params])
        except apsw.SQLError as e:
            raise StateConflict(f"cannot write a row of table {table!r}: {e}",
                                hint="the sites' schemas differ; bring this site's schema in line") from e

    # the log ----------------------------------------------------------------------------------

    def log(self, origin: str, oseq: int, hlc: int, op: int, sid: int | None, keyb: bytes | None,
            vals: bytes | None, base: tuple[int, str] | None, ctx: Mapping[str, int] | None,
            sql: str | None = None, counters: Mapping[str, int] | None = None) -> None:
        self.cur.execute(f"INSERT INTO {LOG}(origin, oseq, hlc, op, shape, key, vals, base_hlc, base_origin, ctx, "
                         "sql, counters) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (origin, oseq, hlc, op, sid, keyb, vals, base[0] if base else None,
                          base[1] if base else None, None if ctx is None else _pack_vv(ctx), sql,
                          _pack_vv(counters) if counters else None))
        s = self.seen.get(origin)
        if s is None:
            self.seen[origin] = [oseq, hlc, 0]
        else:
            s[0], s[1] = oseq, hlc
        self.dirty.add(origin)

    def flush_seen(self) -> None:
        for o in self.dirty:
            n, h, p = self.seen[o]
            self.cur.execute(f"INSERT OR REPLACE INTO {SEEN}(origin, oseq, hlc, pruned) VALUES (?, ?, ?, ?)",
                             (o, n, h, p))
        self.dirty.clear()

    # ingest -----------------------------------------------------------------------------------

    def ingest(self) -> int:
        """Turn capture's new entries into local changes; returns how many entries were read."""
        con = self.con
        if capture._one(con, "PRAGMA schema_version") != capture._meta(con, "schema_version"):
            capture._sync(con, emit=True)       # log the application's DDL first, as read_changes does
            self.local_shapes.clear()
        n, last = con.execute(f"SELECT count(*), max(seq) FROM {capture.LOG} WHERE seq > ?",
                              (self.ingested,)).fetchall()[0]
        if not n:
            return 0
        if n != last - self.ingested:
            raise StateConflict(f"the change log of this file lost entries sync had not read yet "
                                f"(after position {self.ingested}): something else pruned it",
                                hint="seed this site again from a snapshot of another site of the group")
        read = 0
        while True:
            batch = capture._read(con, self.ingested, _READ_CHUNK)
            if not batch:
                break
            for c in batch:
                self._ingest_one(c)
            self.ingested = batch[-1].seq
            read += len(batch)
        self.ingested = last                  # past the marks too
        self.cur.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('ingested', ?)", (self.ingested,))
        self.flush_seen()
        self.ingested_now += read
        return read

    def _ingest_one(self, c: capture.Change) -> None:
        if c.op == "reseed":
            raise capture.ReseedNeeded(f"this site's schema changed in a way sync cannot replay ({c.sql})",
                                       hint="sync cannot continue for this file: seed every other site again "
                                            "from a snapshot of this one, or this one from another site",
                                       details={"position": c.seq, "reason": c.sql})
        if c.op == "ddl":
            self.log(self.site, self._next_oseq(), c.hlc, OP_DDL, None, None, None, None, None, c.sql)
            return
        assert c.table is not None
        sid = self.shape_id(c.table, c.columns, c.key_columns)
        if c.op == "delete":
            assert c.key is not None
            self._local(c.hlc, c.table, sid, c.key, None, OP_DELETE)
            return
        assert c.values is not None
        pos = self.positions(c.table, c.columns, c.key_columns)
        key = tuple(c.values[p] for p in pos)
        if c.op == "update" and c.key is not None and not capture._same(c.key, key):
            self._local(c.hlc, c.table, sid, c.key, None, OP_DELETE)       # the row left its old key
            self._local(c.hlc, c.table, sid, key, c.values, OP_INSERT)
        else:
            self._local(c.hlc, c.table, sid, key, c.values, _OP_CODE[c.op])

    def _next_oseq(self) -> int:
        s = self.seen.get(self.site)
        return 1 if s is None else s[0] + 1

    def _local(self, hlc: int, table: str, sid: int, key: Sequence[Any], values: Sequence[Any] | None,
               op: int) -> None:
        keyb = _pack(key)
        assert keyb is not None
        r = self.row(table, keyb)
        ctx = r.vv if r is not None else {}
        base = (r.hlc, r.origin) if r is not None else None
        counters = None
        if values is not None:
            if r is None and op == OP_INSERT and self.rekeys(table, key):
                self.cur.execute(f"INSERT OR IGNORE INTO {IDS}(tbl, key, hlc, origin, at_key) VALUES (?, ?, ?, ?, ?)",
                                 (table, keyb, hlc, self.site, keyb))
            counters = self._count_local(table, sid, keyb, values, r is None)
        self.log(self.site, self._next_oseq(), hlc, op, sid, keyb, _pack(values), base, ctx, counters=counters)
        self.put_row(table, keyb, _Row(hlc, self.site, values is None, _join(dict(ctx), {self.site: hlc}), []))

    # apply ------------------------------------------------------------------------------------

    def apply(self, batch: Sequence[SyncChange], policy: Policy, peer: str | None) -> ApplyResult:
        res = ApplyResult(received=len(batch))
        self.ingest()          # a local change not read yet is the current version of its row
        top = 0
        sent: dict[str, int] = {}
        for ch in batch:
            if sent.get(ch.origin, 0) < ch.oseq:
                sent[ch.origin] = ch.oseq
            s = self.seen.get(ch.origin)
            have = s[0] if s is not None else 0
            if ch.oseq <= have:
                res.skipped += 1
                continue
            if ch.origin == self.site:
                raise StateConflict(f"a peer holds change {ch.oseq} of this site, which this site never made "
                                    f"(it made {have}): this file is older than the copy the group knows",
                                    hint="seed this site again from a snapshot of another site of the group",
                                    details={"origin": ch.origin, "oseq": ch.oseq, "have": have})
            if ch.oseq != have + 1:
                raise ChangesMissing(f"changes of {ch.origin!r} are missing: expected {have + 1}, got {ch.oseq}",
                                    hint="send changes in the order changes_for returns them, from this "
                                         "site's vector on", details={"origin": ch.origin, "expected": have + 1,
                                                                      "got": ch.oseq})
            top = max(top, ch.hlc)
            if ch.op == "ddl":
                self._apply_ddl(ch)
                res.ddl += 1
                self.log(ch.origin, ch.oseq, ch.hlc, OP_DDL, None, None, None, None, None, ch.sql)
                continue
            if ch.op not in ("insert", "update", "delete") or ch.table is None or ch.key is None:
                raise UsageError(f"change {ch.origin}:{ch.oseq} is malformed (op {ch.op!r})")
            merged = self._apply_row(ch, policy, res)
            sid = self.shape_id(ch.table, ch.columns, ch.key_columns)
            self.log(ch.origin, ch.oseq, ch.hlc, _OP_CODE[ch.op], sid, _pack(ch.key),
                     _pack(ch.values if ch.op != "delete" else None), ch.base, ch.ctx, counters=ch.counters)
            if merged is not None:
                self._write_merged(self.routed, merged, top)
        self.flush_seen()
        if top:
            raise_clock(self.con, top)
        if peer is not None and sent:
            self.record_peer(peer, sent)
        res.vector = {o: s[0] for o, s in self.seen.items() if s[0] > 0}
        return res

    def _apply_ddl(self, ch: SyncChange) -> None:
        """Run DDL from another site, unless what it creates is already here (both sites ran it)."""
        self.cur.execute("SAVEPOINT bastion_sync_ddl")
        try:
            self.cur.execute(ch.sql or "")
        except apsw.SQLError as e:
            self.cur.execute("ROLLBACK TO bastion_sync_ddl")
            self.cur.execute("RELEASE bastion_sync_ddl")
            msg = str(e)
            if "already exists" in msg or "duplicate column" in msg:
                return
            raise StateConflict(f"DDL from {ch.origin!r} failed here: {msg} ({ch.sql})",
                                hint="bring this site's schema in line with the others, then sync again") from e
        self.cur.execute("RELEASE bastion_sync_ddl")
        capture._sync(self.con, emit=False)      # our capture follows the new schema without logging it as local
        self.local_shapes.clear()

    def _apply_row(self, ch: SyncChange, policy: Policy, res: ApplyResult) -> dict[str, Any] | bool | None:
        """Apply one row change; returns a resolver's merged row (a dict, or False for a merged
        delete) to write as a local change, or None.

        First the row the change is about: a concurrent insert of a key another site also
        created goes to a key of its own, and a change made on a row that moved follows it
        (:meth:`_route`). Then the version rules, then the counter columns."""
        rch = self.routed = self._route(ch, res)
        merged = self._apply_version(rch, policy, res)
        self._count_remote(rch)
        return merged

    # -- colliding inserts ------------------------------------------------------------------------

    def rekeys(self, table: str, key: Sequence[Any]) -> bool:
        """Whether concurrent inserts of this key are two rows (``rekey``) rather than one (``shared``).

        Default: rekey for rowid tables (a rowid, or INTEGER PRIMARY KEY, is a number each site
        allocates on its own), shared for other keys (a natural key names the same thing everywhere)."""
        rule = self.key_rules.get(table)
        if rule == "shared" or len(key) != 1 or type(key[0]) is not int:
            return False
        if rule == "rekey":
            return True
        shape = self.local_shape(table)
        return shape is not None and not shape.without_rowid

    def _route(self, ch: SyncChange, res: ApplyResult) -> SyncChange:
        """The change as it applies here: at its own key, or at the key its row moved to."""
        table = ch.table
        assert table is not None and ch.key is not None
        if not self.rekeys(table, ch.key):
            return ch
        keyb = _pack(ch.key)
        assert keyb is not None
        ids = [(h, o, a) for h, o, a in self.cur.execute(
            f"SELECT hlc, origin, at_key FROM {IDS} WHERE tbl = ? AND key = ?", (table, keyb))]
        if ch.op == "insert" and ch.base is None:
            # A creation: its site had no version of this key, so every creation known here at this
            # key is concurrent with it. The earliest keeps the key, every other one moves.
            here = [(h, o) for h, o, a in ids if a == keyb]
            add = f"INSERT OR IGNORE INTO {IDS}(tbl, key, hlc, origin, at_key) VALUES (?, ?, ?, ?, ?)"
            if not here:
                self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, keyb))
                return ch
            h, o = here[0]
            if (h, o) > (ch.hlc, ch.origin):
                newk = _fresh_key(table, h, o, keyb)
                moved = self._move(table, ch.key_columns, ch.key, newk)
                self.cur.execute(f"UPDATE {IDS} SET at_key = ? WHERE tbl = ? AND key = ? AND origin = ? AND hlc = ?",
                                 (_pack((newk,)), table, keyb, o, h))
                self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, keyb))
                kept = Version(ch.hlc, ch.origin, ch.columns, ch.values)
                if moved is not None:
                    self._record_rekey(table, ch, kept, moved, newk)
                res.rekeyed += 1
                return ch
            newk = _fresh_key(table, ch.hlc, ch.origin, keyb)
            self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, _pack((newk,))))
            rch = _rekeyed(ch, newk)
            r = self.row(table, keyb)
            if r is not None:
                self._record_rekey(table, ch, self.read_current(table, ch.key_columns, ch.key, r),
                                   Version(rch.hlc, rch.origin, rch.columns, rch.values), newk)
            res.rekeyed += 1
            return rch
        # A later change: it is about the row its site had at this key, the earliest creation it had seen.
        covered = [(h, o, a) for h, o, a in ids if ch.ctx.get(o, -1) >= h]
        if not covered:
            return ch
        _h, _o, at = min(covered)
        return ch if at == keyb else _rekeyed(ch, _unpack(at)[0])     # type: ignore[index]

    def _move(self, table: str, key_columns: Sequence[str], key: Sequence[Any], newk: int) -> Version | None:
        """Move the row at ``key`` (table row, version state, counters) to ``newk``; returns its
        current version as it is now (at the new key)."""
        keyb = _pack(key)
        r = self.row(table, keyb)       # type: ignore[arg-type]
        if r is None:
            return None
        cur = self.read_current(table, key_columns, key, r)
        mv = _with_key(cur, key_columns, newk)
        if not cur.deleted:
            self.write(table, key_columns, key, Version(0, "", (), None))
            self.write(table, key_columns, (newk,), mv)
        newkb = _pack((newk,))
        self.put_row(table, newkb, _Row(r.hlc, r.origin, r.deleted, r.vv,      # type: ignore[arg-type]
                                        [_with_key(v, key_columns, newk) for v in r.siblings]))
        self.cur.execute(f"DELETE FROM {ROWS} WHERE tbl = ? AND key = ?", (table, keyb))
        self.cur.execute(f"UPDATE {COUNTERS} SET key = ? WHERE tbl = ? AND key = ?", (newkb, table, keyb))
        return mv

    def _record_rekey(self, table: str, ch: SyncChange, kept: Version, moved: Version, newk: int) -> None:
        """Nothing to decide (both rows stay), but the site whose row moved should know: recorded
        as settled, with both rows (the moved one at its new key)."""
        self._record(table, ch, None, "both", kept, moved)
        self.cur.execute(f"UPDATE {CONFLICTS} SET resolved_at = at, resolved_by = 'bastion', resolution = ? "
                         "WHERE id = ?", (f"both rows kept: the insert of {moved.origin} moved from key "
                                          f"{ch.key[0] if ch.key else None} to {newk}", self.con.last_insert_rowid()))

    # -- counter columns --------------------------------------------------------------------------

    def counter(self, table: str, keyb: bytes, col: str) -> list[Any] | None:
        got = self.cur.execute(f"SELECT base, contrib FROM {COUNTERS} WHERE tbl = ? AND key = ? AND col = ?",
                               (table, keyb, col)).fetchall()
        return [got[0][0], _unpack_vv(got[0][1])] if got else None

    def put_counter(self, table: str, keyb: bytes, col: str, base: Any, contrib: Mapping[str, int]) -> None:
        self.cur.execute(f"INSERT OR REPLACE INTO {COUNTERS}(tbl, key, col, base, contrib) VALUES (?, ?, ?, ?, ?)",
                         (table, keyb, col, base, _pack_vv(contrib)))

    def _count_local(self, table: str, sid: int, keyb: bytes, values: Sequence[Any],
                     creation: bool) -> dict[str, int] | None:
        """A local change's counter columns as deltas: the table held the group's total before the
        application's write, so what it wrote minus that total is this site's delta."""
        cols = self.counter_cols.get(table)
        if not cols:
            return None
        columns = self.shape(sid)[1]
        out = {}
        for col in cols:
            if col not in columns:
                continue
            v = values[columns.index(col)]
            if type(v) is not int:
                continue                # not a number: not counted (row-level policy only)
            st = self.counter(table, keyb, col) or [0 if creation else v, {}]
            base, contrib = st
            contrib[self.site] = contrib.get(self.site, 0) + v - _total(base, contrib)
            self.put_counter(table, keyb, col, base, contrib)
            out[col] = contrib[self.site]
        return out or None

    def _count_remote(self, ch: SyncChange) -> None:
        """Take the origin's total delta of each counter column, and make the table hold the sum."""
        table = ch.table
        cols = self.counter_cols.get(table or "")
        if not cols or table is None or ch.key is None:
            return
        shape = self.local_shape(table)
        keyb = _pack(ch.key)
        assert keyb is not None
        sets = []
        for col in cols:
            if shape is None or col not in shape.columns:
                continue
            st = self.counter(table, keyb, col)
            n = (ch.counters or {}).get(col)
            if n is not None:
                st = st or [0, {}]
                if st[1].get(ch.origin) != n:
                    st[1][ch.origin] = n
                    self.put_counter(table, keyb, col, st[0], st[1])
            if st is not None:
                sets.append((col, _total(*st)))
        if sets:
            where = " AND ".join(f"{capture._q(k)} = {'CAST(? AS TEXT)' if type(v) is RawText else '?'}"
                                 for k, v in zip(ch.key_columns, ch.key))
            self.cur.execute(f"UPDATE {capture._q(table)} SET {', '.join(f'{capture._q(c)} = ?' for c, _ in sets)} "
                             f"WHERE {where}", [t for _, t in sets] + [bytes(v) if type(v) is RawText else v
                                                                        for v in ch.key])

    def with_totals(self, table: str, key: Sequence[Any], row: dict[str, Any]) -> dict[str, Any]:
        """A row to write as a local change (a resolution), its counter columns at the group's total:
        the write then adds no delta of its own."""
        keyb = _pack(key)
        for col in self.counter_cols.get(table, ()):
            st = self.counter(table, keyb, col) if col in row else None     # type: ignore[arg-type]
            if st is not None:
                row = {**row, col: _total(*st)}
        return row

    def unmasked(self, table: str, row: dict[str, Any] | None) -> dict[str, Any] | None:
        """A row without its counter columns: versions that differ only there do not conflict."""
        cols = self.counter_cols.get(table)
        if row is None or not cols:
            return row
        return {k: v for k, v in row.items() if k not in cols}

    def _apply_version(self, ch: SyncChange, policy: Policy, res: ApplyResult) -> dict[str, Any] | bool | None:
        table = ch.table
        assert table is not None and ch.key is not None
        keyb = _pack(ch.key)
        assert keyb is not None
        r = self.row(table, keyb)
        x = Version(ch.hlc, ch.origin, ch.columns, ch.values if ch.op != "delete" else None)
        if r is None:
            self.write(table, ch.key_columns, ch.key, x)
            self.put_row(table, keyb, _Row(x.hlc, x.origin, x.deleted, _join(dict(ch.ctx), {x.origin: x.hlc}), []))
            res.applied += 1
            return None
        vv = _join(dict(r.vv), ch.ctx)
        if _covered(x.hlc, x.origin, r.vv):
            # Something this site holds was made after x (by a site that had seen it).
            res.superseded += 1
            if vv != r.vv:
                r.vv = vv
                self.put_row(table, keyb, r)
            return None
        vv = _join(vv, {x.origin: x.hlc})
        current_open = not _covered(r.hlc, r.origin, ch.ctx)
        others: list[Version] = []
        if current_open:
            others.append(self.read_current(table, ch.key_columns, ch.key, r))
        others += [s for s in r.siblings if not _covered(s.hlc, s.origin, ch.ctx)]
        if not others:                          # x was made on top of everything this site has of the row
            self.write(table, ch.key_columns, ch.key, x)
            self.put_row(table, keyb, _Row(x.hlc, x.origin, x.deleted, vv, []))
            res.applied += 1
            return None
        # A conflict: x and versions its site had not seen.
        lww = Policy()
        if policy.total:
            local = max(others, key=policy.key)
        else:
            local = others[0] if current_open else max(others, key=lww.key)
        merged: dict[str, Any] | bool | None = None
        if same_row(self.unmasked(table, local.row()), self.unmasked(table, x.row())):
            # The same values: nothing to resolve, nothing to record; keep the greater version.
            winner = max(local, x, key=policy.key if policy.total else lww.key)
            outcome = None
        else:
            choice = policy.choose(table, local, x)
            outcome = choice.winner
            winner = x if choice.winner == "remote" else local
            if choice.winner == "merged":
                merged = False if choice.row is None else choice.row
                mk = None if choice.row is None else [choice.row.get(c) for c in ch.key_columns]
                if mk is not None and not all(capture._same([a], [b]) for a, b in zip(mk, ch.key)):
                    raise UsageError(f"resolver {policy.resolver!r} changed the key of a row of table {table!r}",
                                     hint="a resolver may merge the other columns, not move the row")
        frontier = [*others, x]
        shown = (r.hlc, r.origin)
        if winner.ident != shown:
            self.write(table, ch.key_columns, ch.key, winner)
        self.put_row(table, keyb, _Row(winner.hlc, winner.origin, winner.deleted, vv,
                                       [v for v in frontier if v.ident != winner.ident]))
        if outcome is not None:
            self._record(table, ch, policy, outcome, local, x)
            res.conflicts += 1
            res.won += outcome == "remote"
            res.merged += outcome == "merged"
        elif winner is x:
            res.applied += 1
        return merged

    def _write_merged(self, ch: SyncChange, row: dict[str, Any] | bool, top: int) -> None:
        """A resolver's new row: written through the triggers so capture logs it as a local
        change of this site, ordered after everything seen, then ingested at once."""
        assert ch.table is not None and ch.key is not None
        raise_clock(self.con, top)
        shape = self.local_shape(ch.table)
        trig = self.con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
        try:
            if row is False:
                self.write(ch.table, ch.key_columns, ch.key, Version(0, "", (), None))
            else:
                assert isinstance(row, dict)
                row = self.with_totals(ch.table, ch.key, row)
                cols = tuple(c for c in (shape.columns if shape else ch.columns) if c in row)
                self.write(ch.table, ch.key_columns, ch.key, Version(0, "", cols, tuple(row[c] for c in cols)))
        finally:
            self.con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
        self.ingest()

    def _record(self, table: str, ch: SyncChange, policy: Policy | None, outcome: str, local: Version,
                remote: Version) -> None:
        self.cur.execute(
            f"INSERT INTO {CONFLICTS}(at, tbl, key, key_columns, policy, outcome, local_hlc, local_origin, "
            "local_columns, local_values, remote_hlc, remote_origin, remote_oseq, remote_columns, remote_values) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), table, _pack(ch.key), json.dumps(list(ch.key_columns)),
             policy.describe() if policy is not None else REKEY_POLICY, outcome,
             local.hlc, local.origin, None if local.deleted else json.dumps(list(local.columns)),
             _pack(local.values), remote.hlc, remote.origin, ch.oseq,
             None if remote.deleted else json.dumps(list(remote.columns)), _pack(remote.values)))

    def record_peer(self, peer: str, vector: Mapping[str, int]) -> None:
        now = time.time()
        for origin, oseq in vector.items():
            self.cur.execute(f"INSERT INTO {PEERS}(peer, origin, oseq, at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(peer, origin) DO UPDATE SET oseq = max(oseq, excluded.oseq), "
                             "at = excluded.at", (peer, origin, int(oseq), now))

    # reading the log ----------------------------------------------------------------------------

    def decode(self, row: Sequence[Any]) -> SyncChange:
        origin, oseq, hlc, op, sid, keyb, vals, bh, bo, ctx, sql, counters = row
        if op == OP_DDL:
            return SyncChange(origin, oseq, hlc, "ddl", None, (), (), None, None, None, {}, sql)
        table, cols, kcols = self.shape(sid)
        return SyncChange(origin, oseq, hlc, _OP_NAME[op], table, cols, kcols, _unpack(keyb), _unpack(vals),
                          None if bh is None else (bh, bo), _unpack_vv(ctx), None,
                          _unpack_vv(counters) if counters is not None else None)


_LOG_COLS = "origin, oseq, hlc, op, shape, key, vals, base_hlc, base_origin, ctx, sql, counters"


def raise_clock(con: apsw.Connection, hlc: int) -> None:
    """The HLC receive rule, inside the caller's write transaction: the next change capture
    logs takes max(last + 1, now), so raising the last entry's clock value to ``hlc`` orders
    it after every change received.

    The last entry is raised rather than a mark entry added: capture's readers skip marks,
    so a mark would leave a hole in the positions that capture.apply on a replication copy
    of this file refuses as missing changes. Only the clock value of the newest entry moves
    (upwards); capture's prune always keeps that entry."""
    con.execute(f"UPDATE {capture.LOG} SET hlc = ?1 WHERE seq = (SELECT max(seq) FROM {capture.LOG}) AND hlc < ?1",
                (hlc,))


# -- operations --------------------------------------------------------------------------------

def install(target: apsw.Connection | str | os.PathLike[str], site: str) -> dict[str, Any]:
    """Install change capture (origin = ``site``) and the sync tables; idempotent for the same site.

    Changes committed from capture's install on are synced; rows already in the file are
    the common starting point (every site of a group starts from a copy of the same file)."""
    if not isinstance(site, str) or not site.strip():
        raise UsageError("the site id must be a non-empty string", hint="use the site's name, e.g. 'paris'")
    with _connection(target) as con:
        cap = capture.install(con, site)          # refuses a file captured under another origin
        with _transaction(con):
            if _installed(con):
                have = capture._one(con, f"SELECT value FROM {META} WHERE key = 'site'")
                if have != site:
                    raise StateConflict(f"sync is already installed here for site {have!r}, not {site!r}",
                                        hint="a copy of another site's file must be seeded as a new site")
                already = True
                _upgrade(con)
            else:
                for sql in _TABLES_SQL:
                    # Our own DDL moves the schema cookie: let capture know it was ours, not a VACUUM.
                    capture._own_ddl(con, sql)
                con.executemany(f"INSERT INTO {META}(key, value) VALUES (?, ?)",
                                [("site", site), ("format", FORMAT), ("ingested", cap.position.seq),
                                 ("installed_at", time.time())])
                con.execute(f"INSERT INTO {SEEN}(origin, oseq, hlc) VALUES (?, 0, 0)", (site,))
                already = False
        return {"site": site, "already_installed": already, "tables": cap.tables, "uncaptured": cap.uncaptured,
                "capture_position": cap.position.seq}


def _upgrade(con: apsw.Connection) -> None:
    """Tables and columns a file synced by an earlier version lacks (colliding inserts, counters)."""
    for sql in _TABLES_SQL[-2:]:
        name = sql.split("EXISTS ", 1)[1].split("(", 1)[0]
        if not capture._exists(con, name):
            capture._own_ddl(con, sql)
    if "counters" not in [r[1] for r in con.execute(f"PRAGMA table_info({LOG})")]:
        capture._own_ddl(con, f"ALTER TABLE {LOG} ADD COLUMN counters BLOB")


def _counter_spec(spec: Any) -> tuple[str, str]:
    if isinstance(spec, str) and "." in spec:
        t, _, c = spec.partition(".")
        if t and c:
            return t, c
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(x, str) and x for x in spec):
        return spec[0], spec[1]
    raise UsageError(f"counter column {spec!r} is not \"table.column\"", hint='e.g. counters = ["accounts.balance"]')


def configure(target: apsw.Connection | str | os.PathLike[str], counters: Sequence[Any] = (),
              keys: Mapping[str, str] | None = None, present_only: bool = False) -> dict[str, Any]:
    """Set the sync group's per-table settings in this file (every site of the group sets the same).

    ``counters``: columns (``"table.column"``) whose concurrent updates add up: each site's
    change counts as a delta on the total. The value each row holds now is the base every
    site counts from: configure counters while every site holds the same rows (when the
    group is set up). ``keys``: per table, ``"rekey"`` (concurrent inserts of one integer
    key are two rows: the later one moves to a key of its own at every site) or ``"shared"``
    (the key names the same row at every site: the policy decides). Default: rekey for
    rowid tables, shared for others. ``present_only``: settings of tables this file does not
    have are left out (a database of several files: each file takes its own tables')."""
    pairs = sorted({_counter_spec(c) for c in counters})
    rules = dict(keys or {})
    for t, rule in rules.items():
        if rule not in KEY_STRATEGIES:
            raise UsageError(f"keys: table {t!r} has strategy {rule!r}", hint=f"use one of {', '.join(KEY_STRATEGIES)}")
    with _connection(target) as con:
        ingest(con)
        with _transaction(con):
            s = _Site(con)
            _upgrade(con)
            if present_only:
                pairs = [(t, c) for t, c in pairs if s.local_shape(t) is not None]
                rules = {t: r for t, r in rules.items() if s.local_shape(t) is not None}
            for t, rule in rules.items():
                shape = s.local_shape(t)
                if rule == "rekey" and shape is not None and (len(shape.key_columns) != 1 or shape.without_rowid):
                    raise UsageError(f"keys: table {t!r} cannot be rekeyed: its key is not a rowid",
                                     hint="rekey moves rows between integer keys; use \"shared\" for this table")
            had = {(t, c) for t, cs in s.counter_cols.items() for c in cs}
            added = []
            for t, c in pairs:
                shape = s.local_shape(t)
                if shape is None or c not in shape.columns:
                    raise UsageError(f"counter column {t}.{c}: no captured table {t!r} with a column {c!r} here",
                                     hint="name a column of a synced table: counters = [\"table.column\"]")
                if c in shape.key_columns:
                    raise UsageError(f"counter column {t}.{c} is (part of) the table's key",
                                     hint="a counter is a value column, e.g. a balance or a quantity")
                if (t, c) in had:
                    continue
                added.append(f"{t}.{c}")
                q = capture._q
                keys_sql = ", ".join(map(q, shape.key_columns))
                for row in con.execute(f"SELECT {keys_sql}, {q(c)} FROM {q(t)}"):
                    key, v = tuple(row[:-1]), row[-1]
                    con.execute(f"INSERT OR IGNORE INTO {COUNTERS}(tbl, key, col, base, contrib) "
                                "VALUES (?, ?, ?, ?, ?)", (t, _pack(key), c, v, _pack_vv({})))
            for t, c in had - set(pairs):
                con.execute(f"DELETE FROM {COUNTERS} WHERE tbl = ? AND col = ?", (t, c))
            con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('counters', ?)", (json.dumps(pairs),))
            con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('keys', ?)",
                        (json.dumps(rules, sort_keys=True),))
        return {"counters": [f"{t}.{c}" for t, c in pairs], "added": added, "keys": rules}


def is_installed(target: apsw.Connection | str | os.PathLike[str]) -> bool:
    with _connection(target) as con:
        return _installed(con)


def site_of(target: apsw.Connection | str | os.PathLike[str]) -> str | None:
    with _connection(target) as con:
        return capture._one(con, f"SELECT value FROM {META} WHERE key = 'site'") if _installed(con) else None


def _needs_ingest(con: apsw.Connection) -> bool:
    """Whether capture logged anything sync has not read (a read: no write lock for a poll)."""
    with _transaction(con, write=False):
        if not _installed(con):
            raise StateConflict("sync is not installed in this database",
                                hint="install it first (sync.install(target, site))")
        if capture._one(con, "PRAGMA schema_version") != capture._meta(con, "schema_version"):
            return True
        last = capture._one(con, f"SELECT max(seq) FROM {capture.LOG}")
        return last is not None and last > int(capture._one(con, f"SELECT value FROM {META} WHERE key = 'ingested'"))


def _prune_capture(con: apsw.Connection, site: _Site) -> None:
    """Capture's log is read: the sync log holds those changes now."""
    if site.ingested_now:
        capture.prune(con, site.ingested)


def ingest(target: apsw.Connection | str | os.PathLike[str]) -> int:
    """Read capture's new entries into the sync log now; returns how many."""
    with _connection(target) as con:
        if not _needs_ingest(con):
            return 0
        with _transaction(con):
            s = _Site(con)
            n = s.ingest()
        _prune_capture(con, s)
        return n


def vector(target: apsw.Connection | str | os.PathLike[str]) -> dict[str, int]:
    """Per origin, the highest change number held here (local changes read first)."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            return {o: n for o, n in con.execute(f"SELECT origin, oseq FROM {SEEN} WHERE oseq > 0")}


def changes_for(target: apsw.Connection | str | os.PathLike[str], their_vector: Mapping[str, int],
                limit: int = 1000) -> list[SyncChange]:
    """The changes a peer with ``their_vector`` lacks, at most ``limit``, in the order to apply them."""
    if limit <= 0:
        return []
    their = {str(o): int(n) for o, n in (their_vector or {}).items()}
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            s = _Site(con)
            start = None
            for origin, (oseq, _hlc, pruned) in s.seen.items():
                have = their.get(origin, 0)
                if have >= oseq:
                    continue
                if have < pruned:
                    raise StateConflict(f"the peer needs changes of {origin!r} from {have + 1} on, but this site "
                                        f"pruned them (up to {pruned}): it was not listed as a peer here",
                                        hint="sync it from another site that still has them, or seed it again",
                                        details={"origin": origin, "needed": have + 1, "pruned": pruned})
                first = capture._one(con, f"SELECT min(lseq) FROM {LOG} WHERE origin = ? AND oseq > ?",
                                     (origin, have))
                if first is not None and (start is None or first < start):
                    start = first
            if start is None:
                return []
            out: list[SyncChange] = []
            for row in con.execute(f"SELECT {_LOG_COLS} FROM {LOG} WHERE lseq >= ? ORDER BY lseq", (start,)):
                if row[1] > their.get(row[0], 0):
                    out.append(s.decode(row))
                    if len(out) >= limit:
                        break
            return out


def apply(target: apsw.Connection | str | os.PathLike[str], changes: Iterable[SyncChange],
          policy: Policy | str | Mapping[str, Any] | None = None, peer: str | None = None) -> ApplyResult:
    """Apply a peer's batch (as :func:`changes_for` returned it) in one transaction.

    Duplicates are skipped, so a batch sent twice changes nothing; a batch that skips
    changes of an origin is refused whole. ``peer``: the site that sent it (it holds at
    least what it sent, which :func:`prune` uses)."""
    pol = Policy.of(policy)
    batch = list(changes)
    with _connection(target) as con:
        with _transaction(con, quiet=True):
            s = _Site(con)
            res = s.apply(batch, pol, peer)
        _prune_capture(con, s)
        return res


def record_peer(target: apsw.Connection | str | os.PathLike[str], peer: str, vector: Mapping[str, int]) -> None:
    """Record that ``peer`` holds at least ``vector`` (e.g. the vector it sent, or ours after a push)."""
    with _connection(target) as con, _transaction(con):
        _Site(con).record_peer(peer, vector)


def prune(target: apsw.Connection | str | os.PathLike[str], peers: Sequence[str] | None = None) -> int:
    """Drop log entries every peer holds; returns how many.

    ``peers``: the sites this one exchanges changes with (default: every peer recorded).
    A peer listed but never recorded holds nothing, so nothing is pruned. Each site only
    needs its direct peers: in a hub topology a spoke keeps what the hub lacks."""
    with _connection(target) as con, _transaction(con):
        s = _Site(con)
        group = list(peers) if peers is not None else \
            [p for (p,) in con.execute(f"SELECT DISTINCT peer FROM {PEERS}")]
        group = [p for p in group if p != s.site]
        if not group:
            return 0
        held: dict[str, dict[str, int]] = {p: {} for p in group}
        for p, o, n in con.execute(f"SELECT peer, origin, oseq FROM {PEERS}"):
            if p in held:
                held[p][o] = n
        dropped = 0
        for origin, st in s.seen.items():
            upto = min(min(held[p].get(origin, 0) for p in group), st[0])
            if upto <= st[2]:
                continue
            con.execute(f"DELETE FROM {LOG} WHERE origin = ? AND oseq <= ?", (origin, upto))
            dropped += con.changes()
            st[2] = upto
            s.dirty.add(origin)
        s.flush_seen()
        return dropped


# -- conflicts ---------------------------------------------------------------------------------

def conflicts(target: apsw.Connection | str | os.PathLike[str], unresolved: bool = True,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Recorded conflicts, oldest first (only those not resolved yet, by default)."""
    with _connection(target) as con, _transaction(con, write=False):
        _Site(con)
        where = "WHERE resolved_at IS NULL" if unresolved else ""
        lim = f"LIMIT {int(limit)}" if limit is not None else ""
        return [conflict_log.as_dict(r) for r in con.execute(f"SELECT {conflict_log.COLUMNS} FROM {CONFLICTS} "
                                                             f"{where} ORDER BY id {lim}")]


def conflict(target: apsw.Connection | str | os.PathLike[str], conflict_id: int) -> dict[str, Any]:
    with _connection(target) as con, _transaction(con, write=False):
        _Site(con)
        return conflict_log.get(con, conflict_id)


def resolve(target: apsw.Connection | str | os.PathLike[str], conflict_id: int, action: str,
            by: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Resolve a recorded conflict.

    ``dismiss``: keep what won. ``reapply``: write the losing version (``version`` =
    ``"local"``/``"remote"`` to choose one after a merge) again as a new local change,
    through the triggers: capture logs it, it orders after everything this site has seen,
    and it syncs out like any change made here."""
    if action not in ("reapply", "dismiss"):
        raise UsageError(f"unknown resolution {action!r}", hint="use reapply or dismiss")
    with _connection(target) as con:
        trig = con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
        try:
            with _transaction(con):
                s = _Site(con)
                c = conflict_log.get(con, conflict_id)
                pick = conflict_log.to_reapply(c, action, version)
                resolution = "dismissed"
                if pick is not None:
                    s.ingest()
                    v = c[pick]
                    kcols = tuple(c["key"])
                    key = tuple(c["key"].values())
                    if v["deleted"]:
                        s.write(c["table"], kcols, key, Version(0, "", (), None))
                    else:
                        vals = s.with_totals(c["table"], key, v["values"])
                        cols = tuple(vals)
                        s.write(c["table"], kcols, key, Version(0, "", cols, tuple(vals[k] for k in cols)))
                    before = s.seen[s.site][0]
                    s.ingest()
                    if s.seen[s.site][0] == before:
                        raise StateConflict("the reapplied version was not captured",
                                            hint="is change capture installed on this table?")
                    resolution = f"reapplied {pick} as local change {s.seen[s.site][0]}"
                con.execute(f"UPDATE {CONFLICTS} SET resolved_at = ?, resolution = ?, resolved_by = ? WHERE id = ?",
                            (time.time(), resolution, by, int(conflict_id)))
            _prune_capture(con, s)
        finally:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
        c.update(resolved_at=time.time(), resolution=resolution, resolved_by=by)
        return c


# -- status ------------------------------------------------------------------------------------

def status(target: apsw.Connection | str | os.PathLike[str]) -> dict[str, Any]:
    """Site, vector, log size, per-peer position and lag (changes held here that the peer lacks)."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            s = _Site(con)
            vec = {o: st[0] for o, st in s.seen.items()}
            peers: dict[str, dict[str, int]] = {}
            seen_at: dict[str, float] = {}
            for p, o, n, at in con.execute(f"SELECT peer, origin, oseq, at FROM {PEERS}"):
                peers.setdefault(p, {})[o] = n
                seen_at[p] = max(seen_at.get(p, 0.0), at)
            return {
                "site": s.site, "vector": vec,
                "log_entries": capture._one(con, f"SELECT count(*) FROM {LOG}"),
                "unresolved_conflicts": capture._one(con, f"SELECT count(*) FROM {CONFLICTS} "
                                                          "WHERE resolved_at IS NULL"),
                "peers": {p: {"vector": v, "lag_changes": sum(max(0, n - v.get(o, 0)) for o, n in vec.items()),
                              "recorded_at": seen_at[p]} for p, v in peers.items()},
            }


# -- wire form -----------------------------------------------------------------------------------

def to_wire(changes: Sequence[SyncChange]) -> dict[str, Any]:
    """Changes as lists, ints, floats, str, bytes and dicts (msgpack-ready), exact for every value:
    text that is not valid UTF-8 travels as ``[bytes]``. Table shapes are sent once per batch."""
    shapes: dict[tuple[Any, ...], int] = {}
    rows = []

    def vals(v: Sequence[Any] | None) -> list[Any] | None:
        return None if v is None else [_wire(x) for x in v]
    for c in changes:
        idx = None
        if c.table is not None:
            idx = shapes.setdefault((c.table, tuple(c.columns), tuple(c.key_columns)), len(shapes))
        rows.append([c.origin, c.oseq, c.hlc, c.op, idx, vals(c.key), vals(c.values),
                     None if c.base is None else list(c.base), dict(c.ctx), c.sql,
                     None if not c.counters else dict(c.counters)])
    return {"format": FORMAT, "shapes": [[t, list(cs), list(ks)] for t, cs, ks in shapes], "changes": rows}


def from_wire(data: Mapping[str, Any]) -> list[SyncChange]:
    if data.get("format") != FORMAT:
        raise UsageError(f"sync changes of format {data.get('format')!r}; this Bastion reads {FORMAT}",
                         hint="run the same Bastion version on every site of the group")
    shapes = [(t, tuple(cs), tuple(ks)) for t, cs, ks in data["shapes"]]

    def vals(v: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if v is None else tuple(_unwire(x) for x in v)
    out = []
    for origin, oseq, hlc, op, idx, key, values, base, ctx, sql, *rest in data["changes"]:
        t, cs, ks = shapes[idx] if idx is not None else (None, (), ())
        counters = rest[0] if rest else None
        out.append(SyncChange(origin, int(oseq), int(hlc), op, t, cs, ks, vals(key), vals(values),
                              None if base is None else (int(base[0]), str(base[1])),
                              {str(k): int(v) for k, v in (ctx or {}).items()}, sql,
                              None if not counters else {str(k): int(v) for k, v in counters.items()}))
    return out


def adopt(target: apsw.Connection | str | os.PathLike[str], new_site: str) -> dict[str, Any]:
    """Make a copy of another site's file the file of ``new_site`` (a site joining the group).

    What the copy's capture log holds that its site had not ingested yet is ingested first,
    under that site's id: the source ingests the same entries the same way, so both agree
    on their numbers. Then capture's origin and the sync site become ``new_site``; every
    version, log entry and vector of the copy stays (the new site holds what the source
    held), and the source is recorded as holding at least that."""
    if not isinstance(new_site, str) or not new_site.strip():
        raise UsageError("the site id must be a non-empty string")
    with _connection(target) as con:
        ingest(con)
        with _transaction(con):
            s = _Site(con)
            old = s.site
            if old == new_site:
                raise StateConflict(f"this copy already belongs to site {new_site!r}",
                                    hint="a joining site needs its own site id")
            if new_site in s.seen and s.seen[new_site][0] > 0:
                raise StateConflict(f"site {new_site!r} already made changes known to this copy: a site id "
                                    "cannot be reused by a new copy", hint="give the joining site a new id")
            con.execute(f"UPDATE {META} SET value = ? WHERE key = 'site'", (new_site,))
            capture._set_meta(con, "origin", new_site)
            con.execute(f"INSERT OR IGNORE INTO {SEEN}(origin, oseq, hlc) VALUES (?, 0, 0)", (new_site,))
            vec = {o: st[0] for o, st in s.seen.items() if st[0] > 0}
            s.record_peer(old, vec)
        return {"site": new_site, "from": old, "vector": vec}
