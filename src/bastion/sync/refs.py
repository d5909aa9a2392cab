"""Declared foreign keys that follow a row moved by ``rekey`` (concurrent inserts of one key).

A child row refers to its parent by the parent's key. When two sites created the same key
concurrently, the later creation moves to a new key at every site (state.py, ``_route``);
the child rows its site wrote for it must then hold the new key, or they would point at the
other site's row, the one that kept the key. Two ways a child meets a move, both
deterministic at every site:

- **the child arrives after its parent moved here**: every change of a child row carries,
  per foreign key column, the *creation* of the parent row that held that key at its origin
  when the application wrote (``refs``: hlc, origin and original key of the insert that
  made it, as ``_bastion_sync_ids`` records it). The receiver writes the key that creation
  lives at here (:func:`follow`). A child that meant the row that kept the key names that
  row's creation, and does not move.
- **the child is here when its parent moves**: every row holding the old key meant the row
  that moves, because the creation that takes the key over only now arrives, and a row
  referring to it can only have been made after it (changes travel in causal order). They
  move with it in the same transaction (:func:`move_children`).

Only single-column foreign keys to the key of a table that rekeys are followed (a rekeyed
table has one integer key, so a composite foreign key cannot point at it). A foreign key
column that is part of the child's own key (a composite key such as ``(order_id, n)``, or
a one-to-one table keyed by its parent's key) moves the child row to its new key, with its
sync state. ``ON UPDATE`` actions play no part: Bastion writes with foreign keys off, and a
moved row is the same row under a new key, so its children follow whatever the declaration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, cast

import apsw

from .. import capture
from .model import IDS, ROWS, SyncChange, pack, unpack, with_values
from .policy import Version


def _first(keyb: Any) -> Any:
    """The value of a one-column key as stored (msgpack)."""
    k = unpack(bytes(keyb))
    assert k is not None
    return k[0]


class ForeignKey(NamedTuple):
    table: str        # the child table
    column: str       # its column holding the parent's key
    parent: str       # a table whose key rekeys


class SiteState(Protocol):
    """What this module uses of state.SiteState (which imports this module)."""
    con: apsw.Connection
    cur: apsw.Cursor
    key_rules: dict[str, str]
    fk_cache: dict[str, list[ForeignKey]] | None

    def local_shape(self, table: str) -> capture.Shape | None: ...
    def rekeys(self, table: str, key: Sequence[Any]) -> bool: ...
    def row(self, table: str, keyb: bytes) -> Any: ...
    def put_row(self, table: str, keyb: bytes, r: Any) -> None: ...
    def flush(self) -> None: ...
    def ids_changed(self, table: str | None = None, keyb: bytes | None = None) -> None: ...
    def move_row(self, table: str, key_columns: Sequence[str], key: Sequence[Any],
                 newkey: Sequence[Any]) -> Version: ...


def foreign_keys(s: SiteState) -> dict[str, list[ForeignKey]]:
    """Per child table, its foreign keys that may need following (cached until the schema changes)."""
    if s.fk_cache is not None:
        return s.fk_cache
    tables = {t.lower(): t for (t,) in s.con.execute(f"SELECT name FROM {capture.TABLES} WHERE active = 1")}
    out: dict[str, list[ForeignKey]] = {}
    for t in tables.values():
        cols: dict[int, list[tuple[str, str, str | None]]] = {}
        for fid, parent, frm, to in s.con.execute(
                'SELECT id, "table", "from", "to" FROM pragma_foreign_key_list(?)', (t,)):
            cols.setdefault(fid, []).append((parent, frm, to))
        child = s.local_shape(t)
        for fk in cols.values():
            if len(fk) != 1 or child is None:
                continue
            parent, frm, to = fk[0]
            parent = tables.get(parent.lower(), parent)
            shape = s.local_shape(parent)
            if shape is None or shape.without_rowid or len(shape.key_columns) != 1 \
                    or s.key_rules.get(parent) == "shared":
                continue
            if to is not None and to.lower() != shape.key_columns[0].lower():
                continue            # a UNIQUE column of the parent: the key moves, not that column
            col = next((c for c in child.columns if c.lower() == frm.lower()), None)
            if col is not None:
                out.setdefault(t, []).append(ForeignKey(t, col, parent))
    s.fk_cache = out
    return out


def _living_at(s: SiteState, parent: str, value: Any) -> tuple[int, str, Any] | None:
    got = s.cur.execute(f"SELECT hlc, origin, key FROM {IDS} WHERE tbl = ? AND at_key = ?",
                        (parent, pack((value,)))).fetchall()
    if not got:
        return None             # no creation lives there (a row older than sync, or none)
    h, o, k = got[0]
    return cast(int, h), str(o), _first(k)


def refs_for(s: SiteState, table: str, columns: Sequence[str], values: Sequence[Any]) -> dict[str, Any] | None:
    """A local change's references: per foreign key column, the parent creation living at the
    key it holds here now (``columns``/``values``: the row, or the key of a delete)."""
    fks = foreign_keys(s).get(table)
    if not fks:
        return None
    out = {}
    for fk in fks:
        if fk.column not in columns:
            continue
        v = values[columns.index(fk.column)]
        if type(v) is int and s.rekeys(fk.parent, (v,)):
            got = _living_at(s, fk.parent, v)
            if got is not None:
                out[fk.column] = got
    return out or None


def follow(s: SiteState, ch: SyncChange) -> SyncChange:
    """The change with each reference at the key its parent row lives at here."""
    if not ch.refs or ch.table is None or ch.key is None:
        return ch
    parents = {fk.column: fk.parent for fk in foreign_keys(s).get(ch.table, ())}
    vals = None if ch.values is None else list(ch.values)
    key = list(ch.key)
    moved = False
    for col, (h, o, k) in ch.refs.items():
        parent = parents.get(col)
        if parent is None:
            continue
        got = s.cur.execute(f"SELECT at_key FROM {IDS} WHERE tbl = ? AND key = ? AND origin = ? AND hlc = ?",
                            (parent, pack((k,)), o, h)).fetchall()
        if not got:
            continue            # not known here (cannot happen in causal order): the value as written
        at = _first(got[0][0])
        for names, row in ((ch.columns, vals), (ch.key_columns, key)):
            if row is not None and col in names and not capture.same_values([row[names.index(col)]], [at]):
                row[names.index(col)] = at
                moved = True
    if not moved:
        return ch
    return ch._replace(key=tuple(key), values=None if vals is None else tuple(vals), raw=None)


def _holds(v: Version, col: str, value: Any) -> bool:
    return v.values is not None and col in v.columns and \
        capture.same_values([v.values[v.columns.index(col)]], [value])


def move_children(s: SiteState, parent: str, old: int, new: int) -> int:
    """The rows referring to ``parent``'s row at ``old`` refer to it at ``new`` now (it moved);
    returns how many rows followed."""
    q = capture.quote
    n = 0
    for fks in foreign_keys(s).values():
        for fk in fks:
            if fk.parent != parent:
                continue
            s.flush()           # the SQL below reads and writes the tables themselves
            shape = s.local_shape(fk.table)
            assert shape is not None
            kc = shape.key_columns
            if fk.column not in kc:
                s.cur.execute(f"UPDATE {q(fk.table)} SET {q(fk.column)} = ? WHERE {q(fk.column)} = ?", (new, old))
                n += s.con.changes()
                # Versions kept as siblings (losers not superseded yet) may be written again later.
                for kb, in s.cur.execute(f"SELECT key FROM {ROWS} WHERE tbl = ? AND siblings IS NOT NULL",
                                         (fk.table,)).fetchall():
                    keyb = bytes(kb)            # type: ignore[arg-type]
                    r = s.row(fk.table, keyb)
                    assert r is not None
                    sibs = [with_values(v, {fk.column: new}) if _holds(v, fk.column, old) else v
                            for v in r.siblings]
                    if sibs != r.siblings:
                        r.siblings = sibs
                        s.put_row(fk.table, keyb, r)
                continue
            # The reference is (part of) the child's key: the child row moves, with its sync state
            # (tombstones too: a delete made at the origin went to the new key elsewhere).
            i = kc.index(fk.column)
            keys = {tuple(r) for r in s.cur.execute(f"SELECT {', '.join(map(q, kc))} FROM {q(fk.table)} "
                                                    f"WHERE {q(fk.column)} = ?", (old,)).fetchall()}
            for kb, in s.cur.execute(f"SELECT key FROM {ROWS} WHERE tbl = ?", (fk.table,)).fetchall():
                k = unpack(bytes(kb))           # type: ignore[arg-type]
                if k is not None and len(k) == len(kc) and type(k[i]) is int and k[i] == old:
                    keys.add(k)
            for k in sorted(keys, key=repr):
                newk = tuple(new if j == i else x for j, x in enumerate(k))
                s.move_row(fk.table, kc, k, newk)
                s.cur.execute(f"UPDATE OR REPLACE {IDS} SET key = ?1, at_key = ?1 WHERE tbl = ?2 AND key = ?3 "
                              "AND at_key = ?3", (pack(newk), fk.table, pack(k)))
                s.ids_changed()
                n += 1
    return n
