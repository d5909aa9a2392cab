"""The change log: install, positions, reading, pruning, wire form, status and removal."""

from __future__ import annotations

import os
import time
from typing import Any, NotRequired, TypedDict, cast
from collections.abc import Sequence

import apsw

from ..errors import BusyError, StateConflict, UsageError
from ..sqlite.connect import connection, one, transaction
from .control import (CODECS, FORMAT, HLC_SHIFT, LOG, META, NOT_CAPTURES, NOW_MS_SQL, OP_DDL, OP_DELETE, OP_INSERT,
                      OP_MARK, OP_NAME, OP_RESEED, OP_UPDATE, PREFIX, TABLES, Change, InstallResult, Position, RawText,
                      RefreshResult, ensure_applied_table, installed, last_position, meta, need_installed, set_meta)
from .schema import Shape, capture_table, follow_schema, log_width, remember_schema, user_tables
from .sqltools import quote


def install(target: apsw.Connection | str | os.PathLike, origin: str) -> InstallResult:
    """Create the control tables and triggers in the database (idempotent for the same origin).

    Every change committed after this transaction is logged. The position returned is
    where a copy taken right after this call starts."""
    if not isinstance(origin, str) or not origin.strip():
        raise UsageError("the origin id must be a non-empty string", hint="use the site or daemon name")
    with connection(target) as con, transaction(con, write=True):
        if installed(con):
            have = meta(con, "origin")
            if have != origin:
                raise StateConflict(f"change capture is already installed here for origin {have!r}, not {origin!r}",
                                    hint="if this file is a copy of another site's database, remove capture "
                                         "from it first (capture.remove), then install")
            res = follow_schema(con, emit=True)
            names = [r[0] for r in con.execute(f"SELECT name FROM {TABLES} WHERE active = 1 ORDER BY name")]
            return InstallResult(origin, last_position(con), names, res.uncaptured, already=True, refresh=res)
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
        ensure_applied_table(con)
        shapes, other = user_tables(con)
        for s in shapes.values():
            capture_table(con, s)
        set_meta(con, "origin", origin)
        set_meta(con, "format", FORMAT)
        set_meta(con, "installed_at", time.time())
        remember_schema(con)
        return InstallResult(origin, last_position(con), sorted(shapes), other)


def position(target: apsw.Connection | str | os.PathLike) -> Position:
    """The last position given in this database (seq, hlc)."""
    with connection(target) as con:
        need_installed(con)
        return last_position(con)


def origin_of(target: apsw.Connection | str | os.PathLike) -> str | None:
    with connection(target) as con:
        return meta(con, "origin") if installed(con) else None


def is_installed(target: apsw.Connection | str | os.PathLike) -> bool:
    with connection(target) as con:
        return installed(con)


def refresh(target: apsw.Connection | str | os.PathLike) -> RefreshResult:
    """Bring control tables and triggers in line with the schema.

    Logs (at the next positions) the DDL a copy must run and the rows no trigger
    could see, and returns the DDL. ``reseed`` lists what DDL cannot replay: then a
    re-seed marker is logged instead, where :func:`apply` will stop."""
    with connection(target) as con, transaction(con, write=True):
        need_installed(con)
        return follow_schema(con, emit=True)


def read_changes(target: apsw.Connection | str | os.PathLike, after: int = 0, limit: int = 1000, *,
                 auto_refresh: bool = True) -> list[Change]:
    """Entries with position > ``after``, in position order, at most ``limit``.

    If the schema changed since the last look, :func:`refresh` runs first (``auto_refresh``),
    else :class:`StateConflict` is raised: entries logged under a schema that changed must
    not leave before the DDL that follows them is logged."""
    if limit <= 0:
        return []
    with connection(target) as con:
        for _ in range(3):
            with transaction(con, write=False):
                need_installed(con)
                if one(con, "PRAGMA schema_version") == meta(con, "schema_version"):
                    return read_entries(con, after, limit)
            if not auto_refresh:
                raise StateConflict("the schema changed since capture last looked",
                                    hint="call capture.refresh, then read again")
            with transaction(con, write=True):
                follow_schema(con, emit=True)
        raise BusyError("the schema kept changing while changes were read", hint="retry")


def read_entries(con: apsw.Connection, after: int, limit: int) -> list[Change]:
    origin = meta(con, "origin")
    shapes = {tid: Shape.from_json(js)
              for tid, js in cast(list[tuple[int, str]], con.execute(f"SELECT id, shape FROM {TABLES}").fetchall())}
    names = [f"c{i}" for i in range(log_width(con))]
    out = []
    for row in _fetch(con, names, after, limit):
        seq, hlc, op, tid = row[0], row[1], row[2], row[3]
        if op in (OP_INSERT, OP_UPDATE, OP_DELETE):
            s = shapes[tid]
            nv, nk = len(s.columns), len(s.key_columns)
            out.append(Change(seq, hlc, OP_NAME[op], s.name, s.columns,
                              tuple(row[4:4 + nv]) if op != OP_DELETE else None, s.key_columns,
                              tuple(row[4 + nv:4 + nv + nk]) if op != OP_INSERT else None, None, origin))
        elif op in (OP_DDL, OP_RESEED):
            out.append(Change(seq, hlc, OP_NAME[op], None, (), None, (), None, row[4], origin))
    return out


def _fetch(con: apsw.Connection, names: list[str], after: int, limit: int) -> list[tuple[Any, ...]]:
    where = f"FROM {LOG} WHERE seq > ? AND op != {OP_MARK} ORDER BY seq LIMIT ?"
    try:
        return con.execute(f"SELECT seq, hlc, op, tbl, {', '.join(names)} {where}", (after, limit)).fetchall()
    except UnicodeDecodeError:
        pass
    # Some text is not valid UTF-8: read text as bytes, and keep what does not decode as RawText.
    codec = CODECS.get(one(con, "PRAGMA encoding"), "utf-8")
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
    with connection(target) as con, transaction(con, write=True):
        need_installed(con)
        con.execute(f"DELETE FROM {LOG} WHERE seq <= ? AND seq < (SELECT max(seq) FROM {LOG}) AND op != {OP_MARK}",
                    (up_to,))
        n = con.changes()
        if one(con, f"SELECT count(*) FROM {TABLES} WHERE active = 0"):
            con.execute(f"DELETE FROM {TABLES} WHERE active = 0 AND id NOT IN (SELECT tbl FROM {LOG} "
                        "WHERE tbl IS NOT NULL)")
        return n


def pending(target: apsw.Connection | str | os.PathLike, after: int = 0) -> int:
    """How many entries are logged past ``after`` and not pruned."""
    with connection(target) as con:
        need_installed(con)
        return one(con, f"SELECT count(*) FROM {LOG} WHERE seq > ? AND op != {OP_MARK}", (after,))


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


class LogStatus(TypedDict):
    """What the capture log of a file holds; only ``installed`` when it has none."""
    installed: bool
    origin: NotRequired[str | None]
    position: NotRequired[dict[str, int]]       # position.Position.to_json()
    oldest_logged: NotRequired[int | None]
    tables: NotRequired[list[str]]               # the tables it captures
    schema_current: NotRequired[bool]


def status(target: apsw.Connection | str | os.PathLike) -> LogStatus:
    with connection(target) as con, transaction(con, write=False):
        if not installed(con):
            return {"installed": False}
        return {"installed": True, "origin": meta(con, "origin"), "position": last_position(con).to_json(),
                "oldest_logged": one(con, f"SELECT min(seq) FROM {LOG} WHERE op != {OP_MARK}"),
                "tables": [r[0] for r in con.execute(f"SELECT name FROM {TABLES} WHERE active = 1 ORDER BY name")],
                "schema_current": one(con, "PRAGMA schema_version") == meta(con, "schema_version")}


def remove(target: apsw.Connection | str | os.PathLike, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Drop every Bastion trigger and table from the database; user tables and rows stay as they are.

    ``keep``: tables to leave (a copy taking over keeps its conflict log)."""
    with connection(target) as con, transaction(con, write=True):
        objs = cast(list[tuple[str, str]], con.execute(
            "SELECT type, name FROM sqlite_schema WHERE substr(name, 1, 9) = ? "
            "AND type IN ('trigger', 'view', 'table') ORDER BY type = 'table'", (PREFIX,)).fetchall())
        objs = [(k, n) for k, n in objs if n not in keep]
        for kind, name in objs:
            con.execute(f"DROP {kind.upper()} IF EXISTS main.{quote(name)}")
        return {"removed": [n for _, n in objs]}
