"""Bastion's DB-API 2.0 (PEP 249) driver.

    import bastion.client
    con = bastion.client.connect("bastion://alice@db1:8750,db2:8750/bank", password="...")
    with con:
        con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (10, 1))

See connection.py for transactions and transport.py for failover.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from .connection import Connection, Cursor, connect, parse_dsn
from .errors import (AccessDenied, DatabaseError, DataError, Error, IntegrityError, InterfaceError, InternalError,
                     NotReplicated, NotSupportedError, OperationalError, OutcomeUnknown, ProgrammingError,
                     TransactionLost, Warning)

apilevel = "2.0"
threadsafety = 1          # threads may share the module, not connections
paramstyle = "qmark"      # named (:name) works too

Binary = bytes
Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime


def DateFromTicks(ticks: float) -> datetime.date:
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:
    return Timestamp(*time.localtime(ticks)[:6])


def affinity(decltype: str | None) -> str | None:
    """SQLite's type affinity of a declared column type (https://www.sqlite.org/datatype3.html
    section 3.1, its rules in their order); None for a result column that is not a table
    column (an expression has no declared type)."""
    if decltype is None:
        return None
    t = decltype.upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if "BLOB" in t or not t.strip():
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


class _Type:
    """A PEP 249 type object. ``cursor.description`` type codes are the declared types
    (``"varchar(20)"``, ``"BIGINT"``); a type object equals every declared type of its
    affinities: ``"varchar(20)" == STRING``, ``"BIGINT" == NUMBER``, ``"BLOB" == BINARY``."""

    def __init__(self, name: str, affinities: frozenset[str], match: Any = None) -> None:
        self.name, self.affinities, self._match = name, affinities, match

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Type):
            return other is self
        if not isinstance(other, str):
            return NotImplemented
        return affinity(other) in self.affinities or bool(self._match and self._match(other.upper()))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"bastion.client.{self.name}"


STRING = _Type("STRING", frozenset({"TEXT"}))
BINARY = _Type("BINARY", frozenset({"BLOB"}))
NUMBER = _Type("NUMBER", frozenset({"INTEGER", "REAL", "NUMERIC"}))
# SQLite has no date type: dates are text or numbers; a declared type that names one
# (DATE, DATETIME, TIMESTAMP, TIME) is DATETIME as well as its affinity's object
DATETIME = _Type("DATETIME", frozenset(), lambda t: "DATE" in t or "TIME" in t)
# an INTEGER PRIMARY KEY is the rowid; only the exact declared type INTEGER can be one
ROWID = _Type("ROWID", frozenset(), lambda t: t.strip() == "INTEGER")

__all__ = ["connect", "Connection", "Cursor", "parse_dsn", "apilevel", "threadsafety", "paramstyle",
           "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError", "IntegrityError",
           "InternalError", "ProgrammingError", "NotSupportedError", "AccessDenied", "TransactionLost",
           "OutcomeUnknown", "NotReplicated", "Binary", "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks",
           "TimestampFromTicks", "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID", "affinity"]
