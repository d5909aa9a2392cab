"""Table shapes and their triggers, and following the application's schema changes (refresh)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import apsw

from ..sqlite.connect import one
from .control import (LOG, MAX_WIDTH, NEXT_HLC_SQL, OP_DDL, OP_DELETE, OP_INSERT, OP_RESEED, OP_UPDATE, PREFIX,
                      ROWID_NAMES, TABLES, RefreshResult, is_ours, last_position, log_entry, meta, next_position,
                      set_meta, trigger_names)
from .sqltools import bare_or_quoted, first_name, is_unique_index, quote, split_top


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
    def from_json(cls, text: str) -> Shape:
        d = json.loads(text)
        return cls(d["name"], d["without_rowid"], tuple(d["columns"]), tuple(d["key_columns"]),
                   tuple(d["key_pos"]), d["xinfo"], d["sql"])

    def same_structure(self, other: Shape) -> bool:
        return (self.without_rowid, self.columns, self.key_columns, self.xinfo) == \
               (other.without_rowid, other.columns, other.key_columns, other.xinfo)


def shape_of(con: apsw.Connection, name: str, without_rowid: bool) -> Shape | str:
    """The shape of a table, or why it cannot be captured."""
    xinfo = [list(r) for r in con.execute(
        'SELECT name, type, "notnull", dflt_value, pk, hidden FROM pragma_table_xinfo(?, \'main\') ORDER BY cid',
        (name,))]
    sql = one(con, "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,))
    plain = [x[0] for x in xinfo if x[5] == 0]           # hidden 2/3: generated columns
    pks = sorted((x for x in xinfo if x[4] > 0), key=lambda x: x[4])
    if without_rowid:
        columns = tuple(plain)
        key = tuple(x[0] for x in pks)
    else:
        alias = None
        if len(pks) == 1 and one(con, "SELECT count(*) FROM pragma_index_list(?, 'main') WHERE origin = 'pk'",
                                  (name,)) == 0:
            alias = pks[0][0]           # INTEGER PRIMARY KEY: the column is the rowid
        if alias is not None:
            columns, key = tuple(plain), (alias,)
        else:
            taken = {x[0].lower() for x in xinfo}
            free = [n for n in ROWID_NAMES if n not in taken]
            if not free:
                return "columns named rowid, _rowid_ and oid hide its rowid"
            columns, key = (free[0], *plain), (free[0],)
    if len(columns) + len(key) > MAX_WIDTH:
        return f"{len(xinfo)} columns: more than the change log can hold"
    return Shape(name, without_rowid, columns, key, tuple(columns.index(k) for k in key), xinfo, sql or "")


def user_tables(con: apsw.Connection) -> tuple[dict[str, Shape], dict[str, str]]:
    """Capturable tables of the main schema, and the others with the reason."""
    shapes: dict[str, Shape] = {}
    other: dict[str, str] = {}
    for name, kind, wr in cast(list[tuple[str, str, int]], con.execute(
            "SELECT name, type, wr FROM pragma_table_list WHERE schema = 'main'").fetchall()):
        if name.startswith("sqlite_") or is_ours(name) or kind in ("view", "shadow"):
            continue
        if kind != "table":
            other[name] = f"{kind} table: not captured (triggers cannot be put on it)"
            continue
        s = shape_of(con, name, bool(wr))
        if isinstance(s, str):
            other[name] = s
        else:
            shapes[name] = s
    return shapes, other


def objects(con: apsw.Connection) -> list[list[Any]]:
    """Every schema object but ours, in creation order: the fingerprint refresh compares."""
    return [list(r) for r in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
            if not is_ours(r[1])]


def log_width(con: apsw.Connection) -> int:
    return one(con, f"SELECT count(*) FROM pragma_table_info('{LOG}', 'main')") - 4


def capture_table(con: apsw.Connection, shape: Shape) -> int:
    """Record ``shape`` and put the triggers on its table; returns the shape id."""
    con.execute(f"INSERT INTO {TABLES}(name, active, shape) VALUES (?, 1, ?)", (shape.name, shape.to_json()))
    tid = con.last_insert_rowid()
    nv, nk = len(shape.columns), len(shape.key_columns)
    for i in range(log_width(con), nv + nk):
        con.execute(f"ALTER TABLE {LOG} ADD COLUMN c{i}")     # no type: no affinity, values kept as given
    vcols = ", ".join(f"c{i}" for i in range(nv))
    kcols = ", ".join(f"c{nv + i}" for i in range(nk))
    new_v = ", ".join(f"NEW.{quote(c)}" for c in shape.columns)
    old_k = ", ".join(f"OLD.{quote(c)}" for c in shape.key_columns)
    ins, upd, dele = trigger_names(tid)
    tbl = quote(shape.name)
    head = f"INSERT INTO {LOG}(hlc, op, tbl, "
    con.execute(f"CREATE TRIGGER main.{quote(ins)} AFTER INSERT ON {tbl} BEGIN {head}{vcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_INSERT}, {tid}, {new_v}); END")
    con.execute(f"CREATE TRIGGER main.{quote(upd)} AFTER UPDATE ON {tbl} BEGIN {head}{vcols}, {kcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_UPDATE}, {tid}, {new_v}, {old_k}); END")
    con.execute(f"CREATE TRIGGER main.{quote(dele)} AFTER DELETE ON {tbl} BEGIN {head}{kcols}) "
                f"VALUES ({NEXT_HLC_SQL}, {OP_DELETE}, {tid}, {old_k}); END")
    return tid


def retire(con: apsw.Connection, tid: int) -> None:
    """Stop capturing under this shape (rows logged under it keep it until pruned)."""
    for t in trigger_names(tid):
        con.execute(f"DROP TRIGGER IF EXISTS main.{quote(t)}")
    con.execute(f"UPDATE {TABLES} SET active = 0 WHERE id = ?", (tid,))


def remember_schema(con: apsw.Connection) -> None:
    set_meta(con, "schema", objects(con))
    set_meta(con, "schema_version", one(con, "PRAGMA schema_version"))


def log_rows(con: apsw.Connection, tid: int, shape: Shape, op: int, where: str = "") -> int:
    """Log rows of the table as they are now (inserts of a new table, whole updates after ADD COLUMN)."""
    seq, hlc = next_position(con)
    nv = len(shape.columns)
    order = ", ".join(quote(c) for c in shape.key_columns)
    xs = ", ".join(f"{quote(c)} AS x{i}" for i, c in enumerate(shape.columns))
    cols = [f"c{i}" for i in range(nv)] + ([f"c{nv + i}" for i in range(len(shape.key_pos))] if op == OP_UPDATE else [])
    vals = [f"x{i}" for i in range(nv)] + ([f"x{p}" for p in shape.key_pos] if op == OP_UPDATE else [])
    con.execute(f"INSERT INTO {LOG}(seq, hlc, op, tbl, {', '.join(cols)}) "
                f"SELECT ?1 + rn, ?2 + rn, {op}, {tid}, {', '.join(vals)} "
                f"FROM (SELECT row_number() OVER (ORDER BY {order}) - 1 AS rn, {xs} FROM {quote(shape.name)} {where}) "
                f"ORDER BY rn", (seq, hlc))
    return con.changes()


def added_column_defs(old_sql: str, new_sql: str, names: list[str]) -> list[str] | None:
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
        defs = [d.strip() for d in split_top(new_sql[at:at + extra])]
        if len(defs) > 1 and defs[0] == "":
            defs = defs[1:]
        elif len(defs) > 1 and defs[-1] == "":
            defs = defs[:-1]
        if len(defs) == len(names) and all(d and (first_name(d) or "").lower() == n.lower()
                                           for d, n in zip(defs, names)):
            return defs
    return None


def column_ddl(old: Shape, new: Shape, table: str) -> tuple[list[str], list[str], str | None]:
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
                ddl.append(f"ALTER TABLE {quote(table)} RENAME COLUMN {quote(a[0])} TO {bare_or_quoted(b[0])}")
        old_names = {a[0].lower() for a in o}
        renamed = [(a[0], b[0]) for a, b in zip(o, n) if a[0] != b[0]]
        # A swap (a->b, b->a) cannot be replayed one rename at a time.
        if any(b.lower() in old_names and b.lower() != a.lower() for a, b in renamed):
            return [], [], f"columns of table {table!r} were renamed onto each other's names"
        return ddl, [], None
    if len(n) > len(o) and n[:len(o)] == o:
        added = [c[0] for c in n[len(o):]]
        defs = added_column_defs(old.sql, new.sql, added)
        if defs is None:
            return [], [], f"columns added to table {table!r} cannot be told apart in its definition"
        return [f"ALTER TABLE {quote(table)} ADD COLUMN {d}" for d in defs], added, None
    return [], [], f"columns of table {table!r} were dropped or changed"


def follow_schema(con: apsw.Connection, emit: bool) -> RefreshResult:
    """Follow the schema; inside the caller's write transaction. ``emit=False`` (on a copy that just
    ran replicated DDL): only rebuild triggers and the record, log nothing."""
    res = RefreshResult()
    cookie = one(con, "PRAGMA schema_version")
    if cookie == meta(con, "schema_version"):
        res.position = last_position(con)
        return res
    old_objs = meta(con, "schema") or []
    now_objs = objects(con)
    shapes, res.uncaptured = user_tables(con)
    triggers = dict(cast(list[tuple[str, str]], con.execute(
        "SELECT name, tbl_name FROM sqlite_schema WHERE type = 'trigger' AND substr(name, 1, 9) = ?",
        (PREFIX,)).fetchall()))
    active = [(tid, name, Shape.from_json(js)) for tid, name, js in cast(list[tuple[int, str, str]],
              con.execute(f"SELECT id, name, shape FROM {TABLES} WHERE active = 1 ORDER BY id").fetchall())]

    # Where is each captured table now? Our triggers follow a table through RENAME and go with DROP.
    moved: list[tuple[int, str, Shape, str]] = []
    lost: list[tuple[int, str, Shape]] = []
    rebuild: list[tuple[int | None, Shape | None, Shape | None, str]] = []   # old id, old shape, new shape, rows
    for tid, name, shape in active:
        on = {triggers[t] for t in trigger_names(tid) if t in triggers}
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
            drops.append(f"DROP TABLE IF EXISTS {quote(name)}")
            rebuild.append((tid, shape, None, "retire"))
    for tid, name, shape, now in moved:
        new = shapes.get(now)
        if new is None:
            res.reseed.append(f"table {now!r} cannot be captured any more: {res.uncaptured.get(now, 'unknown')}")
            rebuild.append((tid, shape, None, "retire"))
            continue
        if now != name:
            renames.append(f"ALTER TABLE {quote(name)} RENAME TO {quote(now)}")
            rewritten.add(now)
        ddl, added, why = column_ddl(shape, new, now)
        if why:
            res.reseed.append(why)
            rebuild.append((tid, shape, new, "none"))
            continue
        if ddl and not added:
            rewritten.add(now)
        columns += ddl
        complete = all(t in triggers for t in trigger_names(tid))
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
        drop_other.append(f"DROP {t.upper()} IF EXISTS {quote(n)}")
        # A UNIQUE index gone from a table that is still there: rows written since may break it,
        # and the copy (which still has it) would delete rows to make room. A rewrite by RENAME is fine.
        if t == "index" and is_unique_index(sql) and not (cur is not None and cur[0] in rewritten) \
                and (tb in shapes or any(name == tb for _, name, _, _ in moved)):
            res.reseed.append(f"UNIQUE index {n!r} was dropped or changed: rows that break it may have been "
                              "written since")
    for t, n, _tb, sql in now_objs:
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
            log_entry(con, OP_DDL, stmt)
    for old_tid, old_shape, new_shape, rows in rebuild:
        if old_tid is not None:
            retire(con, old_tid)
        if new_shape is None:
            continue
        tid = capture_table(con, new_shape)
        if not logging:
            continue
        if rows == "all":
            res.rows_logged += log_rows(con, tid, new_shape, OP_INSERT)
        elif rows == "added" and old_tid is not None and old_shape is not None:
            # Rows logged by the old triggers lack the new columns: log them again, whole, after the DDL.
            # (Rows logged before the ALTER are among them: more than needed, never less.)
            keys = ", ".join(quote(c) for c in new_shape.key_columns)
            logged = ", ".join(f"c{p}" for p in old_shape.key_pos)
            res.rows_logged += log_rows(con, tid, new_shape, OP_UPDATE,
                                         f"WHERE ({keys}) IN (SELECT {logged} FROM {LOG} "
                                         f"WHERE tbl = {old_tid} AND op IN ({OP_INSERT}, {OP_UPDATE}))")
    if emit and res.reseed:
        log_entry(con, OP_RESEED, "; ".join(res.reseed))
    remember_schema(con)
    res.position = last_position(con)
    return res
