"""The sync tables of one file as one transaction sees them: read through a cache, written back once.

Applying a batch touches the same few rows again and again (a bank's accounts change with
every transfer): reading and writing their version state, counters and table row for every
change cost most of the time of a batch. :class:`Store` keeps what the transaction read or
wrote in memory, and writes it back in :meth:`Store.flush`: at the end of every ingest and
apply, and before anything reads those tables or the application's tables with SQL of its
own (a row moving with its children, DDL, a resolver's row written through the triggers).
Writes to the application's tables are deferred only while a batch is applied
(``deferring``), and :meth:`Store.pending` answers for them until they are flushed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apsw
import msgpack

from .. import capture
from ..capture import RawText
from ..errors import StateConflict
from .model import (COUNTERS, IDS, LOG, OP_CODE, ROWS, SEEN, SyncChange, pack, pack_refs, pack_vv, unpack, unpack_vv,
                    with_values)
from .policy import Version


class _Row:
    __slots__ = ("deleted", "hlc", "origin", "siblings", "vv")

    def __init__(self, hlc: int, origin: str, deleted: bool, vv: dict[str, int], siblings: list[Version]) -> None:
        self.hlc, self.origin, self.deleted, self.vv, self.siblings = hlc, origin, deleted, vv, siblings


_LOG_INSERT = (f"INSERT INTO {LOG}(origin, oseq, hlc, op, shape, key, vals, base_hlc, base_origin, ctx, sql, counters, "
               "refs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _decode_row(hlc: Any, origin: Any, deleted: Any, vv: Any, sib: Any) -> _Row:
    """A row of _bastion_sync_rows (hlc, origin, deleted, vv, siblings) as kept in memory."""
    sibs = [] if sib is None else [Version(h, o, tuple(c), None if v is None else unpack(v))
                                   for h, o, c, v in msgpack.unpackb(sib, raw=False)]
    return _Row(hlc, origin, bool(deleted), unpack_vv(vv), sibs)


class Store:
    """Read-through, write-back access to the sync tables inside the caller's transaction."""

    con: apsw.Connection
    cur: apsw.Cursor
    seen: dict[str, list[int]]
    dirty: set[str]

    def _init_store(self) -> None:
        self._rows: dict[tuple[str, bytes], _Row | None] = {}
        self._rows_dirty: set[tuple[str, bytes]] = set()
        self._counters: dict[tuple[str, bytes, str], list[Any] | None] = {}
        self._counters_dirty: set[tuple[str, bytes, str]] = set()
        self._ids: dict[tuple[str, bytes], list[tuple[int, str, bytes]]] = {}
        self._log: list[tuple[Any, ...]] = []
        self._pending: dict[tuple[str, bytes], tuple[Sequence[str], Sequence[Any], Version]] = {}
        self._read: dict[tuple[str, bytes], Version] = {}      # rows read from the tables in this batch
        self.deferring = False
        self._memo: tuple[Any, bytes] = ((), b"")
        self._sql: dict[tuple[Any, ...], str] = {}

    def keyb(self, key: Sequence[Any]) -> bytes:
        """``pack(key)``, remembered for the last key asked (a change asks for its key several times)."""
        if key is not self._memo[0]:
            self._memo = (key, pack(key) or b"")
        return self._memo[1]

    # version state per row ----------------------------------------------------------------------

    def row(self, table: str, keyb: bytes) -> _Row | None:
        k = (table, keyb)
        if k in self._rows:
            return self._rows[k]
        got = self.cur.execute(f"SELECT hlc, origin, deleted, vv, siblings FROM {ROWS} WHERE tbl = ? AND key = ?",
                               (table, keyb)).fetchall()
        r = self._rows[k] = _decode_row(*got[0]) if got else None
        return r

    def prefetch(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Read the version state and the creations of many rows (a batch's) with a few queries, rather
        than one query per row and table when each change asks."""
        by_table: dict[str, list[bytes]] = {}
        for t, kb in keys:
            if (t, kb) not in self._rows:
                by_table.setdefault(t, []).append(kb)
        for t, kbs in by_table.items():
            kbs = list(dict.fromkeys(kbs))
            for i in range(0, len(kbs), 500):
                part = kbs[i:i + 500]
                marks = ", ".join("?" * len(part))
                for kb in part:
                    self._rows[(t, kb)] = None
                for kb, *state in self.cur.execute(f"SELECT key, hlc, origin, deleted, vv, siblings FROM {ROWS} "
                                                   f"WHERE tbl = ? AND key IN ({marks})", (t, *part)):
                    self._rows[(t, bytes(kb))] = _decode_row(*state)
                fresh = {kb for kb in part if (t, kb) not in self._ids}
                for kb in fresh:
                    self._ids[(t, kb)] = []
                for kb, h, o, a in self.cur.execute(f"SELECT key, hlc, origin, at_key FROM {IDS} WHERE tbl = ? AND key "
                                                    f"IN ({marks}) ORDER BY key, origin, hlc", (t, *part)):
                    if bytes(kb) in fresh:
                        self._ids[(t, bytes(kb))].append((h, o, a))

    def put_row(self, table: str, keyb: bytes, r: _Row) -> None:
        self._rows[(table, keyb)] = r
        self._rows_dirty.add((table, keyb))

    def del_row(self, table: str, keyb: bytes) -> None:
        self._rows[(table, keyb)] = None
        self._rows_dirty.add((table, keyb))

    # counter columns --------------------------------------------------------------------------

    def counter(self, table: str, keyb: bytes, col: str) -> list[Any] | None:
        k = (table, keyb, col)
        if k not in self._counters:
            got = self.cur.execute(f"SELECT base, contrib FROM {COUNTERS} WHERE tbl = ? AND key = ? AND col = ?",
                                   k).fetchall()
            self._counters[k] = [got[0][0], unpack_vv(got[0][1])] if got else None      # type: ignore[arg-type]
        st = self._counters[k]
        return None if st is None else [st[0], dict(st[1])]

    def put_counter(self, table: str, keyb: bytes, col: str, base: Any, contrib: Mapping[str, int]) -> None:
        self._counters[(table, keyb, col)] = [base, dict(contrib)]
        self._counters_dirty.add((table, keyb, col))

    def move_counters(self, table: str, cols: Sequence[str], keyb: bytes, newkb: bytes) -> None:
        """A row's counters go with it to its new key."""
        for col in cols:
            st = self.counter(table, keyb, col)
            if st is not None:
                self.put_counter(table, newkb, col, *st)
                self._counters[(table, keyb, col)] = None
                self._counters_dirty.add((table, keyb, col))

    # creations per key (colliding inserts) ------------------------------------------------------

    def ids_at(self, table: str, keyb: bytes) -> list[tuple[int, str, bytes]]:
        k = (table, keyb)
        got = self._ids.get(k)
        if got is None:
            got = self._ids[k] = [(h, o, a) for h, o, a in self.cur.execute(
                f"SELECT hlc, origin, at_key FROM {IDS} WHERE tbl = ? AND key = ?", k)]
        return got

    def ids_changed(self, table: str | None = None, keyb: bytes | None = None) -> None:
        """``_bastion_sync_ids`` was written (at that key, or anywhere): forget what was read."""
        if table is None or keyb is None:
            self._ids.clear()
        else:
            self._ids.pop((table, keyb), None)

    # the application's tables -------------------------------------------------------------------

    def write(self, table: str, key_columns: Sequence[str], key: Sequence[Any], v: Version) -> None:
        """Make the table hold version ``v`` of the row (upsert of the whole row, or delete)."""
        if self.deferring:
            k = (table, self.keyb(key))
            self._read.pop(k, None)
            self._pending.pop(k, None)          # its place: the last write, as it would have run
            self._pending[k] = (key_columns, key, v)
            return
        self._write_now(table, key_columns, key, v)

    def pending(self, table: str, keyb: bytes) -> Version | None:
        """What the table holds at this row as far as this batch knows (written and not flushed
        yet, or read already), if anything."""
        p = self._pending.get((table, keyb))
        return self._read.get((table, keyb)) if p is None else p[2]

    def was_read(self, table: str, keyb: bytes, v: Version) -> None:
        if self.deferring:
            self._read[(table, keyb)] = v

    def patch_pending(self, table: str, key_columns: Sequence[str], key: Sequence[Any], keyb: bytes,
                      values: Mapping[str, Any]) -> bool:
        """Set columns of the row as this batch knows it (a pending write); False when it does not
        know the row (the caller updates the table)."""
        k = (table, keyb)
        p = self._pending.get(k)
        if p is None:
            got = self._read.get(k)
            if got is None or not self.deferring:
                return False
            p = (key_columns, key, got)
        if p[2].values is not None:
            self._read.pop(k, None)
            self._pending[k] = (p[0], p[1], with_values(p[2], dict(values)))
        return True

    def table_changed(self, table: str, keyb: bytes) -> None:
        self._read.pop((table, keyb), None)

    def _write_now(self, table: str, key_columns: Sequence[str], key: Sequence[Any], v: Version) -> None:
        self._run_writes([self._statement(table, key_columns, key, v)])

    def _statement(self, table: str, key_columns: Sequence[str], key: Sequence[Any],
                   v: Version) -> tuple[str, str, list[Any]]:
        """(table, SQL, parameters) writing version ``v`` of the row (its SQL text is built once)."""
        params = key if v.values is None else v.values
        raw = tuple(type(x) is RawText for x in params) if RawText in map(type, params) else ()
        sk = (table, v.values is None, tuple(key_columns) if v.values is None else v.columns, raw)
        sql = self._sql.get(sk)
        if sql is None:
            marks = ["CAST(? AS TEXT)" if r else "?" for r in raw] if raw else ["?"] * len(params)
            sql = self._sql[sk] = capture.delete_sql(table, key_columns, marks) if v.values is None else \
                capture.upsert_sql(table, v.columns, marks)
        return table, sql, [bytes(x) if type(x) is RawText else x for x in params] if raw else list(params)

    def _run_writes(self, writes: Sequence[tuple[str, str, list[Any]]]) -> None:
        """Run the statements in order, each run of the same statement as one executemany."""
        i = 0
        while i < len(writes):
            j = i + 1
            while j < len(writes) and writes[j][1] == writes[i][1]:
                j += 1
            try:
                if j == i + 1:
                    self.cur.execute(writes[i][1], writes[i][2])
                else:
                    self.cur.executemany(writes[i][1], [w[2] for w in writes[i:j]])
            except apsw.SQLError as e:
                raise StateConflict(f"cannot write a row of table {writes[i][0]!r}: {e}",
                                    hint="the sites' schemas differ; bring this site's schema in line") from e
            i = j

    # the log ------------------------------------------------------------------------------------

    def log(self, origin: str, oseq: int, hlc: int, op: int, sid: int | None, keyb: bytes | None,
            vals: bytes | None, base: tuple[int, str] | None, ctx: Mapping[str, int] | None,
            sql: str | None = None, counters: Mapping[str, int] | None = None,
            refs: dict[str, Any] | None = None) -> None:
        self._log.append((origin, oseq, hlc, op, sid, keyb, vals, base[0] if base else None,
                          base[1] if base else None, None if ctx is None else pack_vv(ctx), sql,
                          pack_vv(counters) if counters else None, pack_refs(refs)))
        s = self.seen.get(origin)
        if s is None:
            self.seen[origin] = [oseq, hlc, 0]
        else:
            s[0], s[1] = oseq, hlc
        self.dirty.add(origin)

    def log_change(self, ch: SyncChange, sid: int) -> None:
        """Log a row change received from another site, as its origin logged it."""
        keyb, vals, ctx, counters, refs = ch.blobs()
        self._log.append((ch.origin, ch.oseq, ch.hlc, OP_CODE[ch.op], sid, keyb, vals,
                          ch.base[0] if ch.base else None, ch.base[1] if ch.base else None, ctx, None, counters,
                          refs))
        s = self.seen.get(ch.origin)
        if s is None:
            self.seen[ch.origin] = [ch.oseq, ch.hlc, 0]
        else:
            s[0], s[1] = ch.oseq, ch.hlc
        self.dirty.add(ch.origin)

    def flush_seen(self) -> None:
        for o in self.dirty:
            n, h, p = self.seen[o]
            self.cur.execute(f"INSERT OR REPLACE INTO {SEEN}(origin, oseq, hlc, pruned) VALUES (?, ?, ?, ?)",
                             (o, n, h, p))
        self.dirty.clear()

    def flush(self) -> None:
        """Write back everything held in memory (the transaction's tables are then current)."""
        pending, self._pending = self._pending, {}
        self._read.clear()
        self._run_writes([self._statement(k[0], *p) for k, p in pending.items()])
        if self._log:
            self.cur.executemany(_LOG_INSERT, self._log)
            self._log = []
        put, gone = [], []
        for k in self._rows_dirty:
            r = self._rows[k]
            if r is None:
                gone.append(k)
                continue
            sib = None if not r.siblings else msgpack.packb(
                [[s.hlc, s.origin, list(s.columns), pack(s.values)] for s in r.siblings], use_bin_type=True)
            put.append((*k, r.hlc, r.origin, int(r.deleted), pack_vv(r.vv), sib))
        if gone:
            self.cur.executemany(f"DELETE FROM {ROWS} WHERE tbl = ? AND key = ?", gone)
        if put:
            self.cur.executemany(f"INSERT OR REPLACE INTO {ROWS}(tbl, key, hlc, origin, deleted, vv, siblings) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", put)
        self._rows_dirty.clear()
        counters = [(*k, st[0], pack_vv(st[1])) for k in self._counters_dirty if (st := self._counters[k]) is not None]
        dropped = [k for k in self._counters_dirty if self._counters[k] is None]
        if dropped:
            self.cur.executemany(f"DELETE FROM {COUNTERS} WHERE tbl = ? AND key = ? AND col = ?", dropped)
        if counters:
            self.cur.executemany(f"INSERT OR REPLACE INTO {COUNTERS}(tbl, key, col, base, contrib) "
                                 "VALUES (?, ?, ?, ?, ?)", counters)
        self._counters_dirty.clear()
        self.flush_seen()
