"""Every SQLite connection of Bastion is opened here, by one of the named openers below.

What each opener sets, and why (DESIGN.md, "Pitfalls"):

- :func:`app_file`: an application's database, written or read by the daemon beside the
  application (capture, sync, replication's shipper and applier, failover's conflict log, the
  SQL server, the checkpointer). Opened READWRITE only: the daemon never creates an
  application's file, and never changes its journal mode behind its back (``protect`` does that,
  once, on purpose). ``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE``: when the daemon's connection is the
  last one to close, SQLite would checkpoint and delete the WAL, which during continuous
  operations is the delta (the main file must not change by a single byte until endbu).
  ``nofollow`` for the files the daemon protects by path (the checkpointer, the SQL server): a
  symlink swapped in must not redirect them. ``checkpointer``: ``wal_autocheckpoint(0)``, the
  connection that decides when to checkpoint must not also checkpoint on its own after a commit.
- :func:`reader`: read-only (``mode=ro``) over a file someone else may be writing (sync check,
  doctor, replica status, restore drills); ``immutable`` for a snapshot nobody writes (a
  restored or staged copy, a backup's scratch file): no -shm, no locks, the main file alone, so
  a WAL left beside it is ignored on purpose. Readers also never checkpoint on close.
- :func:`staged`: a copy the daemon made and alone holds (a seed or a joining site's copy,
  before it is renamed into place). It may checkpoint and must: its WAL has to be rolled in
  before the rename (a -wal never moves with its file). READWRITE: it must already exist.
- :func:`state_db`: the daemon's own state database: created if missing, WAL, ``synchronous=FULL``
  (sessions and positions must survive a crash), foreign keys on.

Busy timeouts. Before this module, call sites waited 2, 5, 10 or 15 s. Two values remain:

- :data:`BUSY_MS` (10 s) for work: a writer or reader that must get through. 10 s is what
  capture, sync, the shipper and the applier already used, measured against the bank workload
  and the longest application transaction the tests run; 15 s is the *HTTP* read timeout of a
  sync peer, not a lock wait. The 5 s of the staged copy, the state database and drills went
  to 10 s: nobody else opens those files, so the wait never happens there and one value is
  simpler than two.
- :data:`REPORT_BUSY_MS` (2 s) for reports (doctor, replica status): they must answer quickly and
  say "busy" rather than hold a status call behind a long write. (In WAL mode a reader rarely waits
  at all; it does behind WAL recovery or a rollback-journal file's writer.)

The SQL server keeps its own busy handler (``busy_ms=None``, then ``set_busy_handler``): it polls
often so its clients get a fair share against a local application that commits back to back.

Beside the openers: :func:`connection` (a connection, or a path opened as an application's file
for the duration of a call), :func:`transaction` (BEGIN / COMMIT / ROLLBACK, optionally ``quiet``:
triggers and foreign keys off) and :func:`one` (the first value of a query).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any
from collections.abc import Iterator, Sequence
from urllib.parse import quote

import apsw

from ..errors import BusyError, UsageError

BUSY_MS = 10_000
REPORT_BUSY_MS = 2_000


def _busy(con: apsw.Connection, busy_ms: int | None) -> apsw.Connection:
    if busy_ms is not None:
        con.setbusytimeout(busy_ms)
    return con


def app_file(path: str, *, nofollow: bool = False, checkpointer: bool = False,
             busy_ms: int | None = BUSY_MS) -> apsw.Connection:
    """An application's database, read-write; never creates it, never checkpoints on close."""
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_NOFOLLOW if nofollow else 0)
    con = apsw.Connection(path, flags=flags)
    con.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    if checkpointer:
        con.wal_autocheckpoint(0)
    return _busy(con, busy_ms)


def reader(path: str, *, immutable: bool = False, busy_ms: int | None = BUSY_MS) -> apsw.Connection:
    """Read-only (``immutable``: a snapshot nobody writes, the main file alone)."""
    uri = f"file:{quote(path)}?mode=ro" + ("&immutable=1" if immutable else "")
    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    return _busy(con, busy_ms)


def staged(path: str) -> apsw.Connection:
    """A copy the daemon alone holds, before it is renamed into place; checkpoints normally."""
    return _busy(apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE), BUSY_MS)


def state_db(path: str) -> apsw.Connection:
    """The daemon's own state database (created if missing)."""
    con = _busy(apsw.Connection(path), BUSY_MS)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    return con


@contextmanager
def connection(target: apsw.Connection | str | os.PathLike) -> Iterator[apsw.Connection]:
    """``target`` itself if it is a connection, else its path opened as an application's file
    (:func:`app_file`) for the duration of the block."""
    if isinstance(target, apsw.Connection):
        yield target
        return
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such database file", path=path,
                         hint="name an existing SQLite database; Bastion never creates one")
    con = app_file(path)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: apsw.Connection, write: bool = True, quiet: bool = False) -> Iterator[None]:
    """BEGIN IMMEDIATE (``write``) or BEGIN, COMMIT, ROLLBACK on any exception. ``quiet``: triggers
    and foreign keys off for the transaction (set before BEGIN: the foreign_keys pragma does
    nothing inside one)."""
    if con.in_transaction:
        raise UsageError("the connection is already in a transaction",
                         hint="Bastion's functions run their own transaction; commit or roll back first")
    saved = None
    if quiet:
        saved = (con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1), one(con, "PRAGMA foreign_keys"))
        con.execute("PRAGMA foreign_keys = OFF")
        con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    try:
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
    finally:
        if saved is not None:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, saved[0])
            con.execute(f"PRAGMA foreign_keys = {int(bool(saved[1]))}")


def one(con: apsw.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first value of the first row, or None."""
    rows = con.execute(sql, params).fetchall()
    return rows[0][0] if rows else None
