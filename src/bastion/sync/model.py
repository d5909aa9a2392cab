"""Sync's control tables, its change and result types, and how versions are encoded in them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Mapping, Sequence

import apsw
import msgpack

from .. import capture
from .. import conflicts as conflict_log
from ..capture import RawText
from .policy import Version


FORMAT = 1          # of the sync tables
# Of a batch on the wire. 1: every value as msgpack-ready lists; 2: each change's key, values, ctx,
# counters and refs as the blobs the sync log holds (the sender does not decode them, the receiver
# logs them as they came).
WIRE_FORMAT = 2


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


OP_NAME = {OP_INSERT: "insert", OP_UPDATE: "update", OP_DELETE: "delete", OP_DDL: "ddl"}


OP_CODE = {v: k for k, v in OP_NAME.items()}


READ_CHUNK = 2000


TABLES_SQL = [
    f"CREATE TABLE IF NOT EXISTS {META}(key TEXT PRIMARY KEY, value)",
    (f"CREATE TABLE IF NOT EXISTS {ROWS}(tbl TEXT NOT NULL, key BLOB NOT NULL, hlc INTEGER NOT NULL, "
     "origin TEXT NOT NULL, deleted INTEGER NOT NULL, vv BLOB NOT NULL, siblings BLOB, "
     "PRIMARY KEY(tbl, key)) WITHOUT ROWID"),
    (f"CREATE TABLE IF NOT EXISTS {SHAPES}(id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, columns TEXT NOT NULL, "
     "key_columns TEXT NOT NULL, UNIQUE(tbl, columns, key_columns))"),
    (f"CREATE TABLE IF NOT EXISTS {LOG}(lseq INTEGER PRIMARY KEY, origin TEXT NOT NULL, oseq INTEGER NOT NULL, "
     "hlc INTEGER NOT NULL, op INTEGER NOT NULL, shape INTEGER, key BLOB, vals BLOB, base_hlc INTEGER, "
     "base_origin TEXT, ctx BLOB, sql TEXT, counters BLOB, refs BLOB, UNIQUE(origin, oseq))"),
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
    # Which creation lives at a key now: what a foreign key value written at a site refers to.
    f"CREATE INDEX IF NOT EXISTS {IDS}_at ON {IDS}(tbl, at_key)",
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
    # foreign key column -> the parent row it meant at the origin: its creation (hlc, origin, key)
    refs: dict[str, tuple[int, str, Any]] | None = None
    # key, values, ctx, counters and refs as the sync log holds them (msgpack), when read from a log
    raw: tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None] | None = None

    def blobs(self) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None]:
        """key, values, ctx, counters, refs, packed as the sync log holds them."""
        if self.raw is not None:
            return self.raw
        return (pack(self.key), pack(self.values if self.op != "delete" else None),
                None if self.op == "ddl" else pack_vv(self.ctx),
                pack_vv(self.counters) if self.counters else None, pack_refs(self.refs))

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


def wire(v: Any) -> Any:
    return [bytes(v)] if type(v) is RawText else v


def unwire(v: Any) -> Any:
    return RawText(v[0]) if type(v) is list else v


def pack(values: Sequence[Any] | None) -> bytes | None:
    if values is None:
        return None
    if RawText in map(type, values):
        values = [wire(v) for v in values]
    return msgpack.packb(values, use_bin_type=True)       # a tuple packs as a list does


def unpack(blob: bytes | None) -> tuple[Any, ...] | None:
    if blob is None:
        return None
    vals = msgpack.unpackb(blob, raw=False)
    return tuple(unwire(v) for v in vals) if list in map(type, vals) else tuple(vals)


def pack_vv(vv: Mapping[str, int]) -> bytes:
    return msgpack.packb(dict(vv), use_bin_type=True)


def unpack_vv(blob: bytes | None) -> dict[str, int]:
    return {} if blob is None else msgpack.unpackb(blob, raw=False)


def is_covered(hlc: int, origin: str, vv: Mapping[str, int]) -> bool:
    """A version is covered by a version vector when a version of its origin at least as
    recent is in it: that origin's versions of a row are made one after the other."""
    return vv.get(origin, -1) >= hlc


def total(base: Any, contrib: Mapping[str, int]) -> int:
    return (base if type(base) is int else 0) + sum(contrib.values())


def fresh_key(table: str, hlc: int, origin: str, keyb: bytes) -> int:
    """Where a concurrent insert moves: the same key at every site (a hash of who made it when),
    negative, so that no site's rowid allocator (max + 1) ever hands it out or climbs after it."""
    h = hashlib.sha256(b"\0".join([table.encode(), origin.encode(), str(hlc).encode(), keyb])).digest()
    return -1 - (int.from_bytes(h[:8], "big") >> 2)


def with_values(v: Version, changed: Mapping[str, Any]) -> Version:
    """A version with some columns set to new values (a row that moved, or whose reference did)."""
    if v.values is None or not any(c in v.columns for c in changed):
        return v
    return Version(v.hlc, v.origin, v.columns, tuple(changed.get(c, x) for c, x in zip(v.columns, v.values)))


def pack_refs(refs: Mapping[str, Any] | None) -> bytes | None:
    """A change's references (foreign key column -> the parent's creation: hlc, origin, key)."""
    return None if not refs else msgpack.packb({c: [r[0], r[1], wire(r[2])] for c, r in refs.items()},
                                               use_bin_type=True)


def unpack_refs(blob: bytes | None) -> dict[str, tuple[int, str, Any]] | None:
    if blob is None:
        return None
    return {c: (int(h), str(o), unwire(k)) for c, (h, o, k) in msgpack.unpackb(blob, raw=False).items()}


def rekey_change(ch: SyncChange, newk: int) -> SyncChange:
    vals = ch.values
    if vals is not None:
        vals = tuple(newk if c == ch.key_columns[0] else v for c, v in zip(ch.columns, vals))
    return ch._replace(key=(newk,), values=vals, raw=None)


def join(vv: dict[str, int], other: Mapping[str, int]) -> dict[str, int]:
    for o, h in other.items():
        if vv.get(o, -1) < h:
            vv[o] = h
    return vv


def installed(con: apsw.Connection) -> bool:
    return capture.exists(con, META)
