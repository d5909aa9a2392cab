"""Applying captured changes on a copy, in order, exactly once per position."""

from __future__ import annotations

import itertools
import os
import time
from contextlib import contextmanager
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Sequence

import apsw

from ..errors import BusyError, ChangesMissing, UsageError
from ..sqlite.connect import connection, one, transaction
from .control import APPLIED, ApplyResult, Change, RawText, ReseedNeeded, ensure_applied_table, installed
from .schema import follow_schema
from .sqltools import delete_sql, exists, same_values, upsert_sql


def applied_position(target: apsw.Connection | str | os.PathLike, origin: str) -> int | None:
    """Last position of ``origin`` applied to this copy, or None if it never received any."""
    with connection(target) as con:
        if not exists(con, APPLIED):
            return None
        return one(con, f"SELECT seq FROM {APPLIED} WHERE origin = ?", (origin,))


def set_applied(target: apsw.Connection | str | os.PathLike, origin: str, seq: int, hlc: int = 0) -> None:
    """Record that this copy holds every change of ``origin`` up to ``seq`` (after seeding it from a snapshot)."""
    with connection(target) as con, transaction(con, write=True):
        ensure_applied_table(con)
        con.execute(f"INSERT OR REPLACE INTO {APPLIED}(origin, seq, hlc, at) VALUES (?, ?, ?, ?)",
                    (origin, seq, hlc, time.time()))


def apply(target: apsw.Connection | str | os.PathLike, changes: Iterable[Change], origin: str) -> ApplyResult:
    """Apply a batch of ``origin``'s changes to this copy: atomically, in order, idempotently.

    Entries at or before the position recorded for ``origin`` are skipped; the rest must
    follow it without a gap. Nothing is captured here as a local change."""
    batch = list(changes)
    _check_order(batch)
    with connection(target) as con:
        if con.in_transaction:
            raise UsageError("the connection is already in a transaction",
                             hint="apply runs its own transaction; commit or roll back first")
        triggers_were = con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1)
        fk_was = one(con, "PRAGMA foreign_keys")
        con.execute("PRAGMA foreign_keys = OFF")        # no effect inside a transaction: set before BEGIN
        con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        try:
            with transaction(con, write=True):
                return _apply(con, batch, origin)
        finally:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, triggers_were)
            con.execute(f"PRAGMA foreign_keys = {int(bool(fk_was))}")


def _check_order(batch: list[Change]) -> None:
    for a, b in itertools.pairwise(batch):
        if b.seq <= a.seq:
            raise UsageError(f"changes are out of order: position {b.seq} after {a.seq}",
                             hint="apply entries in the order read_changes returned them")


@contextmanager
def applying(cons: Sequence[apsw.Connection], origin: str, lock_timeout: float = 10.0,
             between_commits: Callable[[], None] | None = None
             ) -> Iterator[Callable[[int, Iterable[Change]], ApplyResult]]:
    """Apply batches to several files of one database as one unit: ``apply(i, changes)``.

    Every file's write lock is taken before anything is written, and the files commit
    one after the other only once every batch went in: a reader that takes the write
    locks of all files (as Bastion's own pause does) never sees one file ahead of
    another. Any error rolls every file back. Commits are per file (SQLite has no
    atomic commit across WAL files): a crash between two of them is the caller's to
    redo, which :func:`apply`'s per-file positions make idempotent."""
    saved = []
    for con in cons:
        if con.in_transaction:
            raise UsageError("the connection is already in a transaction",
                             hint="applying runs its own transaction; commit or roll back first")
        saved.append((con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1), one(con, "PRAGMA foreign_keys")))
    begun: list[apsw.Connection] = []
    try:
        for con in cons:
            con.execute("PRAGMA foreign_keys = OFF")     # no effect inside a transaction: set before BEGIN
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                for con in cons:
                    con.execute("BEGIN IMMEDIATE")
                    begun.append(con)
                break
            except apsw.BusyError:
                # Someone holds a later file's lock (a pause of all files, taken in another
                # order): let go of ours so it can finish, then take them all again.
                for con in reversed(begun):
                    con.execute("ROLLBACK")
                begun.clear()
                if time.monotonic() > deadline:
                    raise BusyError(f"the copy's files stayed locked for {lock_timeout:g} s",
                                    hint="a long read or write transaction holds them; retry") from None
                time.sleep(0.005)

        def apply_one(i: int, changes: Iterable[Change]) -> ApplyResult:
            batch = list(changes)
            _check_order(batch)
            return _apply(cons[i], batch, origin)

        yield apply_one
        while begun:
            begun[0].execute("COMMIT")
            begun.pop(0)
            if begun and between_commits is not None:
                between_commits()      # crash tests: die with some files committed, not all
    finally:
        for con in reversed(begun):
            if con.in_transaction:
                con.execute("ROLLBACK")
        for con, (trig, fk) in zip(cons, saved):
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
            con.execute(f"PRAGMA foreign_keys = {int(bool(fk))}")


def _apply(con: apsw.Connection, batch: list[Change], origin: str) -> ApplyResult:
    ensure_applied_table(con)
    done = one(con, f"SELECT seq FROM {APPLIED} WHERE origin = ?", (origin,))
    todo = batch if done is None else [c for c in batch if c.seq > done]
    skipped = len(batch) - len(todo)
    if not todo:
        return ApplyResult(origin, 0, skipped, done if done is not None else 0, 0, 0)
    first = todo[0].seq if done is None else done + 1
    if todo[0].seq != first or todo[-1].seq != first + len(todo) - 1:   # batch is strictly increasing
        i = next(i for i, c in enumerate(todo) if c.seq != first + i)
        raise ChangesMissing(f"changes of {origin!r} are missing: expected position {first + i}, got {todo[i].seq}",
                             hint="send the changes from the recorded position on, or re-seed the copy",
                             details={"expected": first + i, "got": todo[i].seq})
    cur = con.cursor()
    sqls: dict[tuple[Any, ...], tuple[str, str, tuple[int, ...]]] = {}   # per shape (its tuples are shared)
    run_sql: str | None = None
    run: list[Sequence[Any]] = []

    def flush() -> None:
        if not run:
            return
        assert run_sql is not None      # set with the first row of the run
        if len(run) == 1:
            cur.execute(run_sql, run[0])
        else:
            cur.executemany(run_sql, run)
        run.clear()

    rows = ddl = 0
    for c in todo:
        op = c.op
        if op == "insert" or op == "update" or op == "delete":
            assert c.table is not None      # a row change names its table
            k = (c.table, id(c.columns), id(c.key_columns))
            got = sqls.get(k)
            if got is None:
                got = sqls[k] = (upsert_sql(c.table, c.columns, ["?"] * len(c.columns)),
                                 delete_sql(c.table, c.key_columns, ["?"] * len(c.key_columns)),
                                 tuple(c.columns.index(n) for n in c.key_columns))
            steps: tuple[tuple[str, Sequence[Any], bool], ...]
            # an insert carries the new row, a delete the old key, an update both
            if op == "insert":
                assert c.values is not None
                steps = ((got[0], c.values, False),)
            elif op == "delete":
                assert c.key is not None
                steps = ((got[1], c.key, True),)
            else:
                assert c.values is not None and c.key is not None
                if same_values(c.key, [c.values[p] for p in got[2]]):
                    steps = ((got[0], c.values, False),)
                else:   # the key moved: the row leaves its old place first
                    steps = ((got[1], c.key, True), (got[0], c.values, False))
            for sql, params, is_delete in steps:
                if RawText in map(type, params):
                    # Text that is not valid UTF-8 goes in as bytes; CAST makes it text again, byte for byte.
                    flush()
                    run_sql = None
                    marks = ["CAST(? AS TEXT)" if type(v) is RawText else "?" for v in params]
                    cur.execute(delete_sql(c.table, c.key_columns, marks) if is_delete
                                else upsert_sql(c.table, c.columns, marks),
                                [bytes(v) if type(v) is RawText else v for v in params])
                    continue
                if sql is not run_sql:
                    flush()
                    run_sql = sql
                run.append(params)
            rows += 1
        elif op == "ddl":
            flush()
            run_sql = None
            assert c.sql is not None        # a ddl change carries its statement
            cur.execute(c.sql)
            ddl += 1
        elif op == "reseed":
            raise ReseedNeeded(f"the source needs a re-seed at position {c.seq}: {c.sql}",
                               hint="seed this copy again from a snapshot taken at or after that position",
                               details={"position": c.seq, "reason": c.sql})
        else:
            raise UsageError(f"unknown change operation {op!r} at position {c.seq}")
    flush()
    last = todo[-1]
    con.execute(f"INSERT OR REPLACE INTO {APPLIED}(origin, seq, hlc, at) VALUES (?, ?, ?, ?)",
                (origin, last.seq, last.hlc, time.time()))
    if ddl and installed(con):
        follow_schema(con, emit=False)     # our own capture follows the new schema without logging it as local
    return ApplyResult(origin, len(todo), skipped, last.seq, rows, ddl)
