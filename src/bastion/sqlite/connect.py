"""Opening SQLite files, and the small query helpers every module shares."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import apsw

from ..errors import BusyError, UsageError


@contextmanager
def connection(target: apsw.Connection | str | os.PathLike) -> Iterator[apsw.Connection]:
    if isinstance(target, apsw.Connection):
        yield target
        return
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such database file", path=path,
                         hint="name an existing SQLite database; capture never creates one")
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    # Like every daemon connection: closing it must never checkpoint the application's WAL.
    con.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    con.setbusytimeout(10_000)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: apsw.Connection, write: bool) -> Iterator[None]:
    if con.in_transaction:
        raise UsageError("the connection is already in a transaction",
                         hint="capture functions run their own transaction; commit or roll back first")
    try:
        con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    except apsw.BusyError:
        raise BusyError("the database stayed locked by another writer",
                        hint="retry; set a busy timeout on the connection") from None
    try:
        yield
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    try:
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def one(con: apsw.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    rows = con.execute(sql, params).fetchall()
    return rows[0][0] if rows else None
