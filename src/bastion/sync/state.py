"""The sync state of one file (:class:`SiteState`), used inside one transaction of the caller."""

from __future__ import annotations

import json
import time
from typing import Any, cast
from collections.abc import Mapping, Sequence

import apsw

from .. import capture
from ..capture import RawText
from ..errors import ChangesMissing, StateConflict, UsageError
from ..sqlite.connect import one
from .model import (ApplyResult, CONFLICTS, FORMAT, IDS, META, OP_CODE, OP_DDL, OP_DELETE, OP_INSERT,
                    OP_NAME, PEERS, READ_CHUNK, REKEY_POLICY, SEEN, SHAPES, SyncChange, fresh_key, installed,
                    is_covered, join, pack, rekey_change, total, unpack, unpack_refs, unpack_vv, with_values)
from .policy import Policy, Version, same_row
from . import refs as fkeys
from .store import Store, _Row


class SiteState(Store):
    """The sync state of one file, used inside one transaction of the caller."""

    def __init__(self, con: apsw.Connection) -> None:
        if not installed(con):
            raise StateConflict("sync is not installed in this database",
                                hint="install it first (sync.install(target, site))")
        self.con = con
        self.cur = con.cursor()
        self._init_store()
        meta = dict(cast(list[tuple[str, Any]], con.execute(f"SELECT key, value FROM {META}").fetchall()))
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
        self.fk_cache: dict[str, list[fkeys.ForeignKey]] | None = None     # refs.foreign_keys()
        self._names_json: dict[Sequence[str], str] = {}
        self._select_sql: dict[tuple[Any, ...], str] = {}
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
            sid = one(self.con, f"SELECT id FROM {SHAPES} WHERE tbl = ? AND columns = ? AND key_columns = ?",
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
            t, c, k = cast(tuple[str, str, str], self.con.execute(
                f"SELECT tbl, columns, key_columns FROM {SHAPES} WHERE id = ?", (sid,)).fetchall()[0])
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
            js = one(self.con, f"SELECT shape FROM {capture.TABLES} WHERE name = ? AND active = 1", (table,))
            self.local_shapes[table] = capture.Shape.from_json(js) if js else None
        return self.local_shapes[table]

    # rows -----------------------------------------------------------------------------------

    def read_current(self, table: str, key_columns: Sequence[str], key: Sequence[Any],
                     r: _Row) -> Version:
        """The row's current version with its values as the table holds them now."""
        if r.deleted:
            return Version(r.hlc, r.origin, (), None)
        shape = self.local_shape(table)
        if shape is None:
            raise StateConflict(f"table {table!r} is not captured here", hint="check the schema of this site")
        cols = shape.columns
        keyb = self.keyb(key)
        p = self.pending(table, keyb)
        if p is not None:
            if p.values is None or tuple(p.columns) == tuple(cols):
                return Version(r.hlc, r.origin, tuple(cols), p.values)
            self.flush()
        raw = tuple(type(v) is RawText for v in key)
        params = [bytes(v) if type(v) is RawText else v for v in key]
        where = " AND ".join(f"{capture.quote(n)} = {'CAST(? AS TEXT)' if r else '?'}"
                             for n, r in zip(key_columns, raw))
        sk = (table, cols, tuple(key_columns), raw)
        sql = self._select_sql.get(sk)
        if sql is None:
            sql = self._select_sql[sk] = f"SELECT {', '.join(map(capture.quote, cols))} FROM {capture.quote(table)} " \
                                         f"WHERE {where}"
        try:   # the row's values: any of SQLite's types
            got: list[tuple[Any, ...]] = self.cur.execute(sql, params).fetchall()
            vals = got[0] if got else None
        except UnicodeDecodeError:
            # Text that is not valid UTF-8: read text as bytes and keep what does not decode as RawText.
            sel = ", ".join(f"CASE WHEN typeof({capture.quote(c)}) = 'text' THEN CAST({capture.quote(c)} AS BLOB) "
                            f"ELSE {capture.quote(c)} END, typeof({capture.quote(c)}) = 'text'" for c in cols)
            got = self.con.execute(f"SELECT {sel} FROM {capture.quote(table)} WHERE {where}", params).fetchall()
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
        got_v = Version(r.hlc, r.origin, tuple(cols), None if vals is None else tuple(vals))
        self.was_read(table, keyb, got_v)
        return got_v

    # the log ----------------------------------------------------------------------------------

    # ingest -----------------------------------------------------------------------------------

    def ingest(self) -> int:
        """Turn capture's new entries into local changes; returns how many entries were read."""
        con = self.con
        if one(con, "PRAGMA schema_version") != capture.meta(con, "schema_version"):
            capture.follow_schema(con, emit=True)       # log the application's DDL first, as read_changes does
            self.local_shapes.clear()
            self.fk_cache = None
        n, last = cast("tuple[int, int | None]", con.execute(
            f"SELECT count(*), max(seq) FROM {capture.LOG} WHERE seq > ?", (self.ingested,)).fetchall()[0])
        if not n:
            return 0
        assert last is not None         # n entries: max(seq) is one of them
        if n != last - self.ingested:
            raise StateConflict(f"the change log of this file lost entries sync had not read yet "
                                f"(after position {self.ingested}): something else pruned it",
                                hint="seed this site again from a snapshot of another site of the group")
        read = 0
        while True:
            batch = capture.read_entries(con, self.ingested, READ_CHUNK)
            if not batch:
                break
            for c in batch:
                self._ingest_one(c)
            self.ingested = batch[-1].seq
            read += len(batch)
        self.ingested = last                  # past the marks too
        self.cur.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('ingested', ?)", (self.ingested,))
        self.flush()
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
        if c.op == "update" and c.key is not None and not capture.same_values(c.key, key):
            self._local(c.hlc, c.table, sid, c.key, None, OP_DELETE)       # the row left its old key
            self._local(c.hlc, c.table, sid, key, c.values, OP_INSERT)
        else:
            self._local(c.hlc, c.table, sid, key, c.values, OP_CODE[c.op])

    def _next_oseq(self) -> int:
        s = self.seen.get(self.site)
        return 1 if s is None else s[0] + 1

    def _local(self, hlc: int, table: str, sid: int, key: Sequence[Any], values: Sequence[Any] | None,
               op: int) -> None:
        keyb = pack(key)
        assert keyb is not None
        r = self.row(table, keyb)
        ctx = r.vv if r is not None else {}
        base = (r.hlc, r.origin) if r is not None else None
        counters = None
        if values is not None:
            if r is None and op == OP_INSERT and self.rekeys(table, key):
                self.cur.execute(f"INSERT OR IGNORE INTO {IDS}(tbl, key, hlc, origin, at_key) VALUES (?, ?, ?, ?, ?)",
                                 (table, keyb, hlc, self.site, keyb))
                self.ids_changed(table, keyb)
            counters = self._count_local(table, sid, keyb, values, r is None)
        shape = self.shape(sid)
        refs = fkeys.refs_for(self, table, *((shape[1], values) if values is not None else (shape[2], key)))
        self.log(self.site, self._next_oseq(), hlc, op, sid, keyb, pack(values), base, ctx, counters=counters,
                 refs=refs)
        self.put_row(table, keyb, _Row(hlc, self.site, values is None, join(dict(ctx), {self.site: hlc}), []))

    # apply ------------------------------------------------------------------------------------

    def apply(self, batch: Sequence[SyncChange], policy: Policy, peer: str | None) -> ApplyResult:
        self.ingest()          # a local change not read yet is the current version of its row
        self.deferring = True
        try:
            return self._apply(batch, policy, peer)
        finally:
            self.deferring = False

    def _apply(self, batch: Sequence[SyncChange], policy: Policy, peer: str | None) -> ApplyResult:
        res = ApplyResult(received=len(batch))
        top = 0
        sent: dict[str, int] = {}
        later = self._replaced_in_batch(batch, policy)
        self.prefetch((ch.table, (ch.raw[0] if ch.raw is not None else None) or self.keyb(ch.key))
                      for i, ch in enumerate(batch) if i not in later and ch.table is not None and ch.key is not None)
        for i, ch in enumerate(batch):
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
            if i in later:
                merged = None               # its own site's next change of the row, below, supersedes it
                res.superseded += 1
            else:
                merged = self._apply_row(ch, policy, res)
            self.log_change(ch, self.shape_id(ch.table, ch.columns, ch.key_columns))
            if merged is not None:
                self._write_merged(self.routed, merged, top)
        self.flush()
        if top:
            raise_clock(self.con, top)
        if peer is not None and sent:
            self.record_peer(peer, sent)
        res.vector = {o: s[0] for o, s in self.seen.items() if s[0] > 0}
        return res

    def _replaced_in_batch(self, batch: Sequence[SyncChange], policy: Policy) -> set[int]:
        """The changes of the batch that a later change of the same row in the batch, made by the same
        site on top of them, supersedes: weighing only the later one leaves the row as weighing both
        would (a row's state is the winner among the versions nothing seen supersedes, whatever the
        order; a counter column carries the site's whole delta). A bank's batch changes the same few
        rows over and over: most of its changes are skipped here (still logged, for forwarding).

        Only plain changes: not a creation (it may collide with another site's), not a row that moved
        or may move (ids recorded at its key, or a creation of it in the batch), none of a table with
        foreign keys that follow rows, no DDL in the batch, and a policy that is an order (a
        resolver's merge is a new local change)."""
        if not policy.total or any(ch.op == "ddl" for ch in batch):
            return set()
        fks = fkeys.foreign_keys(self)
        linked = set(fks) | {fk.parent for f in fks.values() for fk in f}

        def keyb(ch: SyncChange) -> bytes:
            return (ch.raw[0] if ch.raw is not None else pack(ch.key)) or b""
        created = {(ch.table, keyb(ch)) for ch in batch if ch.op == "insert" and ch.base is None}
        nxt: dict[tuple[str, bytes, str], SyncChange] = {}
        plain: dict[tuple[str, bytes], bool] = {}
        out: set[int] = set()
        for i in range(len(batch) - 1, -1, -1):
            ch = batch[i]
            if ch.table is None or ch.key is None or ch.refs or (ch.op == "insert" and ch.base is None):
                continue
            row = (ch.table, keyb(ch))
            ok = plain.get(row)
            if ok is None:
                ok = plain[row] = ch.table not in linked and row not in created and \
                    not (self.rekeys(ch.table, ch.key) and self.ids_at(*row))
            if not ok:
                continue
            k = (*row, ch.origin)
            after = nxt.get(k)
            if after is not None and after.ctx.get(ch.origin, -1) >= ch.hlc \
                    and (not ch.counters or ch.counters.keys() <= (after.counters or {}).keys()):
                out.add(i)
            nxt[k] = ch
        return out

    def _apply_ddl(self, ch: SyncChange) -> None:
        """Run DDL from another site, unless what it creates is already here (both sites ran it)."""
        self.flush()
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
        # our capture follows the new schema without logging it as local
        capture.follow_schema(self.con, emit=False)
        self.local_shapes.clear()
        self.fk_cache = None

    def _apply_row(self, ch: SyncChange, policy: Policy, res: ApplyResult) -> dict[str, Any] | bool | None:
        """Apply one row change; returns a resolver's merged row (a dict, or False for a merged
        delete) to write as a local change, or None.

        First the row the change is about: a concurrent insert of a key another site also
        created goes to a key of its own, and a change made on a row that moved follows it
        (:meth:`_route`), its references to rows that moved following them (refs.py). Then the
        version rules, then the counter columns."""
        if ch.values is None and ch.op != "delete" and ch.raw is not None:
            ch = ch._replace(values=unpack(ch.raw[1]))      # from_wire(lazy=True) left them packed
        rch = self.routed = self._route(fkeys.follow(self, ch), res)
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
        keyb = self.keyb(ch.key)
        assert keyb is not None
        ids = self.ids_at(table, keyb)
        if ch.op == "insert" and ch.base is None:
            # A creation: its site had no version of this key, so every creation known here at this
            # key is concurrent with it. The earliest keeps the key, every other one moves.
            here = [(h, o) for h, o, a in ids if a == keyb]
            add = f"INSERT OR IGNORE INTO {IDS}(tbl, key, hlc, origin, at_key) VALUES (?, ?, ?, ?, ?)"
            self.ids_changed(table, keyb)          # one is added below, whatever happens
            if not here:
                self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, keyb))
                return ch
            h, o = here[0]
            if (h, o) > (ch.hlc, ch.origin):
                newk = fresh_key(table, h, o, keyb)
                moved = self._move(table, ch.key_columns, ch.key, newk)
                fkeys.move_children(self, table, ch.key[0], newk)
                self.cur.execute(f"UPDATE {IDS} SET at_key = ? WHERE tbl = ? AND key = ? AND origin = ? AND hlc = ?",
                                 (pack((newk,)), table, keyb, o, h))
                self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, keyb))
                kept = Version(ch.hlc, ch.origin, ch.columns, ch.values)
                if moved is not None:
                    self._record_rekey(table, ch, kept, moved, newk)
                res.rekeyed += 1
                return ch
            newk = fresh_key(table, ch.hlc, ch.origin, keyb)
            self.cur.execute(add, (table, keyb, ch.hlc, ch.origin, pack((newk,))))
            rch = rekey_change(ch, newk)
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
        return ch if at == keyb else rekey_change(ch, unpack(at)[0])     # type: ignore[index]

    def _move(self, table: str, key_columns: Sequence[str], key: Sequence[Any], newk: int) -> Version | None:
        """Move the row at ``key`` (table row, version state, counters) to ``newk``; returns its
        current version as it is now (at the new key)."""
        if self.row(table, pack(key)) is None:      # type: ignore[arg-type]
            return None
        return self.move_row(table, key_columns, key, (newk,))

    def move_row(self, table: str, key_columns: Sequence[str], key: Sequence[Any], newkey: Sequence[Any]) -> Version:
        """Move a row to another key: the table's row (if any), its version state and counters."""
        keyb, newkb = pack(key), pack(newkey)
        assert keyb is not None and newkb is not None
        changed = {c: n for c, o, n in zip(key_columns, key, newkey) if not capture.same_values([o], [n])}
        r = self.row(table, keyb)
        cur = self.read_current(table, key_columns, key, r or _Row(0, "", False, {}, []))
        mv = with_values(cur, changed)
        if not cur.deleted:
            self.write(table, key_columns, key, Version(0, "", (), None))
            self.write(table, key_columns, newkey, mv)
        if r is not None:
            r.siblings = [with_values(v, changed) for v in r.siblings]
            self.put_row(table, newkb, r)
            self.del_row(table, keyb)
        self.move_counters(table, self.counter_cols.get(table, ()), keyb, newkb)
        return mv

    def _record_rekey(self, table: str, ch: SyncChange, kept: Version, moved: Version, newk: int) -> None:
        """Nothing to decide (both rows stay), but the site whose row moved should know: recorded
        as settled, with both rows (the moved one at its new key)."""
        self._record(table, ch, None, "both", kept, moved, f"both rows kept: the insert of {moved.origin} moved "
                     f"from key {ch.key[0] if ch.key else None} to {newk}")

    # -- counter columns --------------------------------------------------------------------------

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
            contrib[self.site] = contrib.get(self.site, 0) + v - total(base, contrib)
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
        keyb = self.keyb(ch.key)
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
                sets.append((col, total(*st)))
        if sets and not self.patch_pending(table, ch.key_columns, ch.key, keyb, dict(sets)):
            self.table_changed(table, keyb)
            where = " AND ".join(f"{capture.quote(k)} = {'CAST(? AS TEXT)' if type(v) is RawText else '?'}"
                                 for k, v in zip(ch.key_columns, ch.key))
            assignments = ", ".join(f"{capture.quote(c)} = ?" for c, _ in sets)
            self.cur.execute(f"UPDATE {capture.quote(table)} SET {assignments} WHERE {where}",
                             [t for _, t in sets] + [bytes(v) if type(v) is RawText else v for v in ch.key])

    def with_totals(self, table: str, key: Sequence[Any], row: dict[str, Any]) -> dict[str, Any]:
        """A row to write as a local change (a resolution), its counter columns at the group's total:
        the write then adds no delta of its own."""
        keyb = pack(key)
        for col in self.counter_cols.get(table, ()):
            st = self.counter(table, keyb, col) if col in row else None     # type: ignore[arg-type]
            if st is not None:
                row = {**row, col: total(*st)}
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
        keyb = self.keyb(ch.key)
        assert keyb is not None
        r = self.row(table, keyb)
        x = Version(ch.hlc, ch.origin, ch.columns, ch.values if ch.op != "delete" else None)
        if r is None:
            self.write(table, ch.key_columns, ch.key, x)
            self.put_row(table, keyb, _Row(x.hlc, x.origin, x.deleted, join(dict(ch.ctx), {x.origin: x.hlc}), []))
            res.applied += 1
            return None
        vv = join(dict(r.vv), ch.ctx)
        if is_covered(x.hlc, x.origin, r.vv):
            # Something this site holds was made after x (by a site that had seen it).
            res.superseded += 1
            if vv != r.vv:
                r.vv = vv
                self.put_row(table, keyb, r)
            return None
        vv = join(vv, {x.origin: x.hlc})
        current_open = not is_covered(r.hlc, r.origin, ch.ctx)
        others: list[Version] = []
        if current_open:
            others.append(self.read_current(table, ch.key_columns, ch.key, r))
        others += [s for s in r.siblings if not is_covered(s.hlc, s.origin, ch.ctx)]
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
                if mk is not None and not all(capture.same_values([a], [b]) for a, b in zip(mk, ch.key)):
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
        self.flush()                # the batch's writes first: this one goes to the table now
        self.deferring = False
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
            self.deferring = True
        self.ingest()

    def _record(self, table: str, ch: SyncChange, policy: Policy | None, outcome: str, local: Version,
                remote: Version, settled: str | None = None) -> None:
        """Record a conflict (``settled``: recorded as resolved by Bastion, with that resolution)."""
        now = time.time()
        self.cur.execute(
            f"INSERT INTO {CONFLICTS}(at, tbl, key, key_columns, policy, outcome, local_hlc, local_origin, "
            "local_columns, local_values, remote_hlc, remote_origin, remote_oseq, remote_columns, remote_values, "
            "resolved_at, resolution, resolved_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, table, pack(ch.key), self._json(ch.key_columns),
             policy.describe() if policy is not None else REKEY_POLICY, outcome,
             local.hlc, local.origin, None if local.deleted else self._json(local.columns),
             pack(local.values), remote.hlc, remote.origin, ch.oseq,
             None if remote.deleted else self._json(remote.columns), pack(remote.values),
             None if settled is None else now, settled, None if settled is None else "bastion"))

    def _json(self, names: Sequence[str]) -> str:
        """A list of column names as JSON (the same few lists, again and again)."""
        got = self._names_json.get(names)
        if got is None:
            got = self._names_json[names] = json.dumps(list(names))
        return got

    def record_peer(self, peer: str, vector: Mapping[str, int]) -> None:
        now = time.time()
        for origin, oseq in vector.items():
            self.cur.execute(f"INSERT INTO {PEERS}(peer, origin, oseq, at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(peer, origin) DO UPDATE SET oseq = max(oseq, excluded.oseq), "
                             "at = excluded.at", (peer, origin, int(oseq), now))

    # reading the log ----------------------------------------------------------------------------

    def decode(self, row: Sequence[Any]) -> SyncChange:
        origin, oseq, hlc, op, sid, keyb, vals, bh, bo, ctx, sql, counters, refs = row
        if op == OP_DDL:
            return SyncChange(origin, oseq, hlc, "ddl", None, (), (), None, None, None, {}, sql)
        table, cols, kcols = self.shape(sid)
        return SyncChange(origin, oseq, hlc, OP_NAME[op], table, cols, kcols, unpack(keyb), unpack(vals),
                          None if bh is None else (bh, bo), unpack_vv(ctx), None,
                          unpack_vv(counters) if counters is not None else None, unpack_refs(refs),
                          (keyb, vals, ctx, counters, refs))


LOG_COLS = "origin, oseq, hlc, op, shape, key, vals, base_hlc, base_origin, ctx, sql, counters, refs"


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
