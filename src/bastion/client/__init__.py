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

from .connection import Connection, Cursor, connect, parse_dsn
from .errors import (AccessDenied, DatabaseError, DataError, Error, IntegrityError, InterfaceError, InternalError,
                     NotReplicated, NotSupportedError, OperationalError, OutcomeUnknown, ProgrammingError, TransactionLost, Warning)

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


class _Type(frozenset):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.upper() in self or frozenset.__eq__(self, other)

    __hash__ = frozenset.__hash__


STRING = _Type({"TEXT", "VARCHAR", "CHAR", "CLOB"})
BINARY = _Type({"BLOB"})
NUMBER = _Type({"INTEGER", "INT", "REAL", "FLOAT", "DOUBLE", "NUMERIC", "DECIMAL", "BOOLEAN"})
DATETIME = _Type({"DATE", "DATETIME", "TIMESTAMP", "TIME"})
ROWID = _Type({"INTEGER"})

__all__ = ["connect", "Connection", "Cursor", "parse_dsn", "apilevel", "threadsafety", "paramstyle",
           "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError", "IntegrityError",
           "InternalError", "ProgrammingError", "NotSupportedError", "AccessDenied", "TransactionLost",
           "OutcomeUnknown", "NotReplicated", "Binary", "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks",
           "TimestampFromTicks", "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID"]
