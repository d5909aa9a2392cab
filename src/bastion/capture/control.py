"""The control tables' names, entry types and results; the meta record and the log's positions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import apsw

from ..errors import ReseedNeeded, StateConflict  # noqa: F401 - ReseedNeeded lives in errors.py; imported from here too
from ..position import Position  # the log's positions: one type for capture, replication and the SQL server
from ..sqlite.connect import one
from .sqltools import exists

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


OP_NAME = {OP_INSERT: "insert", OP_UPDATE: "update", OP_DELETE: "delete", OP_DDL: "ddl", OP_RESEED: "reseed"}


ROWID_NAMES = ("rowid", "_rowid_", "oid")


CODECS = {"UTF-8": "utf-8", "UTF-16le": "utf-16-le", "UTF-16be": "utf-16-be"}


MAX_WIDTH = 1900          # log columns; SQLite allows 2000 columns per table by default


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
                "uncaptured": self.uncaptured, "position": self.position.to_json() if self.position else None}


@dataclass
class InstallResult:
    origin: str
    position: Position
    tables: list[str]
    uncaptured: dict[str, str]
    already: bool = False
    refresh: RefreshResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "position": self.position.to_json(), "tables": self.tables,
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


def trigger_names(tid: int) -> tuple[str, str, str]:
    return f"{PREFIX}ins_{tid}", f"{PREFIX}upd_{tid}", f"{PREFIX}del_{tid}"


def is_ours(name: str) -> bool:
    return name.startswith(PREFIX)   # case-sensitive on purpose: never touch a user's _BASTION_x


def installed(con: apsw.Connection) -> bool:
    return exists(con, META) and one(con, f"SELECT value FROM {META} WHERE key = 'origin'") is not None


def meta(con: apsw.Connection, key: str) -> Any:
    v = one(con, f"SELECT value FROM {META} WHERE key = ?", (key,))
    return json.loads(v) if key == "schema" and isinstance(v, str) else v


def set_meta(con: apsw.Connection, key: str, value: Any) -> None:
    if key == "schema":
        value = json.dumps(value)
    con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES (?, ?)", (key, value))


def need_installed(con: apsw.Connection) -> None:
    if not installed(con):
        raise StateConflict("change capture is not installed in this database",
                            hint="install it first (capture.install)")


def own_ddl(con: apsw.Connection, sql: str) -> None:
    """DDL on our own tables. It bumps the schema cookie as the application's DDL would; when
    nothing else was pending, move the recorded cookie along so refresh does not take it for
    a VACUUM. (If something was pending, refresh looks at the whole schema anyway.)"""
    before = one(con, "PRAGMA schema_version")
    con.execute(sql)
    if exists(con, META) and meta(con, "schema_version") == before:
        set_meta(con, "schema_version", one(con, "PRAGMA schema_version"))


def last_position(con: apsw.Connection) -> Position:
    row = con.execute(f"SELECT seq, hlc FROM {LOG} ORDER BY seq DESC LIMIT 1").fetchall()[0]
    seq, hlc = cast("tuple[int, int]", row)
    return Position(seq, hlc)


def next_position(con: apsw.Connection) -> tuple[int, int]:
    """The next position and clock value (nothing taken yet: the caller inserts them)."""
    seq, hlc = cast(tuple[int, int], con.execute(f"SELECT seq + 1, max(hlc + 1, {NOW_MS_SQL} << {HLC_SHIFT}) "
                                                 f"FROM {LOG} ORDER BY seq DESC LIMIT 1").fetchall()[0])
    return seq, hlc


def log_entry(con: apsw.Connection, op: int, text: str) -> None:
    seq, hlc = next_position(con)
    con.execute(f"INSERT INTO {LOG}(seq, hlc, op, c0) VALUES (?, ?, ?, ?)", (seq, hlc, op, text))


def ensure_applied_table(con: apsw.Connection) -> None:
    if not exists(con, APPLIED):
        own_ddl(con, f"CREATE TABLE {APPLIED}(origin TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                      "hlc INTEGER NOT NULL, at REAL NOT NULL)")
