"""The SQL service: statements and interactive transactions on protected databases.

Each configured database is served through a small pool of apsw connections on its
first file, with its other files ATTACHed under their stems (``bank.db`` + ``audit.db``
→ ``main`` and ``audit``). A request runs on one connection inside one transaction:

* a batch (``execute``) is atomic: all its statements commit together or none does;
  if SQLite says our snapshot went stale before we could write (BUSY_SNAPSHOT), the
  batch is retried, which is safe because nothing of it was acknowledged;
* an interactive transaction (``begin`` … ``commit``/``rollback``) keeps its connection
  between requests; one left idle longer than ``idle_timeout`` is rolled back so the
  single writer lock is never held forever.

Writers of this daemon take turns on a per-database mutex before SQLite's own lock
(taken in the exec tracer, the moment a statement is known to write): SQLite's busy
handler sleeps in steps of milliseconds, which would waste most of the time group
commit saves. Applications in other processes still meet SQLite's lock as usual.

Durability per database: ``durable`` (acknowledged after the WAL is fsynced, with
group commit: see committer.py; or one fsync per commit with ``group_commit = false``),
``fast`` (acknowledged before the fsync: the last commits may be lost on power loss).

Safety (DESIGN.md): connections never checkpoint on close; ATTACH/DETACH (and so
VACUUM INTO), BEGIN/COMMIT statements, functions that reach files, and every pragma
outside an allow-list (queries of state; for writers, what lasts only for the
transaction) are refused by the authorizer. Internal
statements are never put in the statement cache, so a client's identical text is
still checked by the authorizer.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import apsw

from ..errors import (BastionError, BusyError, FileProblem, PermissionDenied, SQLFailure, StateConflict,
                      TransactionGone, UnknownTarget, UsageError)
from ..errors import ResultTooLarge  # defined in errors.py
from . import values
from .committer import GroupCommitter
from ..config import SQLSettings  # the [sql] section; importable from here too
from ..position import Cut  # the capture positions a replicated commit waits for
from .users import READ_ONLY, Principal
from ..sqlite import connect

log = logging.getLogger("bastion.sql")

DURABLE, FAST, REPLICATED = "durable", "fast", "replicated"
# commits whose answer must wait for their fsync: (committer, ticket), see Tx.acknowledge
Acks = list[tuple[GroupCommitter, int]]
DURABILITIES = (DURABLE, FAST, REPLICATED)

_WRITE_ACTIONS = {
    apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE, apsw.SQLITE_CREATE_INDEX,
    apsw.SQLITE_CREATE_TABLE, apsw.SQLITE_CREATE_TRIGGER, apsw.SQLITE_CREATE_VIEW, apsw.SQLITE_DROP_INDEX,
    apsw.SQLITE_DROP_TABLE, apsw.SQLITE_DROP_TRIGGER, apsw.SQLITE_DROP_VIEW, apsw.SQLITE_ALTER_TABLE,
    apsw.SQLITE_REINDEX, apsw.SQLITE_ANALYZE, apsw.SQLITE_CREATE_VTABLE, apsw.SQLITE_DROP_VTABLE,
}
# The pragma policy is an allow-list, applied by the authorizer (which sees every pragma,
# the table-valued pragma_*() form included, with its argument). Anything not named here
# is refused: most pragmas change the process (heap limits) or stay set on a pooled
# connection for the next user (cache_size, ignore_check_constraints, ...).
# Queries of state, without an argument, for every role:
_QUERY_PRAGMAS = frozenset(["application_id", "auto_vacuum", "automatic_index", "busy_timeout", "cache_size",
                            "cache_spill", "cell_size_check", "checkpoint_fullfsync", "collation_list",
                            "compile_options", "count_changes", "data_version", "database_list", "defer_foreign_keys",
                            "empty_result_callbacks", "encoding", "foreign_key_check", "foreign_keys", "freelist_count",
                            "full_column_names", "fullfsync", "function_list", "hard_heap_limit",
                            "ignore_check_constraints", "integrity_check", "journal_mode", "journal_size_limit",
                            "legacy_alter_table", "locking_mode", "max_page_count", "mmap_size", "module_list",
                            "page_count", "page_size", "pragma_list", "query_only", "quick_check", "read_uncommitted",
                            "recursive_triggers", "reverse_unordered_selects", "schema_version", "secure_delete",
                            "short_column_names", "soft_heap_limit", "synchronous", "table_list", "temp_store",
                            "threads", "trusted_schema", "user_version", "wal_autocheckpoint", "writable_schema",
                            "analysis_limit"])
# Queries whose argument names a table or index (or a row limit), for every role:
_INSPECT_PRAGMAS = frozenset(["foreign_key_check", "foreign_key_list", "index_info", "index_list", "index_xinfo",
                              "integrity_check", "quick_check", "table_info", "table_list", "table_xinfo"])
# Settings that last only for the current transaction, or are written in it like any row:
# read-write roles only (defer_foreign_keys is reset by SQLite at COMMIT/ROLLBACK).
_WRITER_PRAGMAS = frozenset({"defer_foreign_keys", "user_version", "application_id"})
# functions that reach the file system or raw pointers
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit",
                               "sqlar_compress", "sqlar_uncompress"})
_INTERNAL = f" -- bastion {secrets.token_hex(16)}"
_NEEDS_TRANSACTION = "a write: it runs in a transaction"
_READS = frozenset({"SELECT", "WITH", "VALUES"})
POOL_IDLE = 30.0        # seconds an idle connection beyond [sql] pool_size is kept


class _NeedsTransaction(Exception):
    """A statement tried in autocommit turned out to write: nothing of it ran."""


_FIRST_WORD = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w*)", re.S)
# (a comment never runs past its */: "/* x */ DELETE ..." is a statement, not a tail)
_ONE_STATEMENT_TAIL = re.compile(r"(?:\s|;|--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*(?:\*/|$))*", re.S)


def pragma_refusal(name: str, arg: str | None, readonly: bool) -> str | None:
    """Why a pragma is refused to a role, or None if it is allowed (the policy in docs/sql.md)."""
    name = name.lower()
    if arg is None and name in _QUERY_PRAGMAS:
        return None
    if arg is not None and name in _INSPECT_PRAGMAS:
        return None
    if arg is not None and name in _WRITER_PRAGMAS:
        if readonly:
            return f"PRAGMA {name} cannot be set by a read-only user"
        return None
    if arg is None:
        return f"PRAGMA {name} is not allowed through the SQL server (it is not a query of state)"
    return (f"PRAGMA {name} cannot be set through the SQL server: it would change the server process "
            "or the pooled connection for other users (see the pragma policy in docs/sql.md)")


@dataclass
class Statement:
    sql: str
    params: Any = None
    many: list[Any] | None = None     # executemany: one parameter set per element

    @classmethod
    def parse(cls, raw: Any, index: int) -> Statement:
        where = f"statement {index + 1}"
        if isinstance(raw, str):
            return cls(raw)
        if not isinstance(raw, dict) or not isinstance(raw.get("sql"), str) or not raw["sql"].strip():
            raise UsageError(f"{where}: needs a non-empty 'sql' string",
                             hint='send {"sql": "SELECT ...", "params": [...]}')
        unknown = set(raw) - {"sql", "params", "many"}
        if unknown:
            raise UsageError(f"{where}: unknown field {sorted(unknown)[0]!r}", hint="fields: sql, params, many")
        if raw.get("many") is not None:
            if not isinstance(raw["many"], list):
                raise UsageError(f"{where}: 'many' must be a list of parameter sets")
            return cls(raw["sql"], many=[values.decode_params(p, f"{where} row {i + 1}")
                                         for i, p in enumerate(raw["many"])])
        return cls(raw["sql"], values.decode_params(raw.get("params"), where))


class Tx:
    """One transaction on one connection: the exec tracer and authorizer consult it."""

    def __init__(self, db: Database, conn: apsw.Connection, readonly: bool,
                 cancel: threading.Event | None = None) -> None:
        self.db, self.conn, self.readonly = db, conn, readonly
        self.cancel = cancel           # set when the client is gone: the running statement stops
        self.deadline: float | None = None
        self.internal = False          # our own BEGIN/COMMIT/ATTACH pass the authorizer
        self.holds_writer = False
        self.denied: str | None = None
        self.misuse: str | None = None  # why the exec tracer stopped a statement
        self.text: str | None = None     # the client's statement now running
        self.prepared: str | None = None  # its text as SQLite prepared it (no tail)
        self.wrote = False
        self.dirty = False             # a statement of this transaction changed something
        self.description: list[tuple[str, str | None]] | None = None
        self.checked: str | None = None  # the statement text the tracer last checked
        self.autocommit = False        # a lone read in SQLite's autocommit: a write must not run here
        self.many: list[Any] | None = None   # executemany: [changes, last rowid, first set still to come]
        self.pending: tuple[int, bool, Cut | None] | None = None   # a commit not yet acknowledged
        db.hooks[conn].tx = self       # the connection's tracer, authorizer ... now consult this Tx

    def _progress(self) -> bool:
        """Called by SQLite every few thousand VM steps: True interrupts the statement.
        Our own COMMIT/ROLLBACK/SAVEPOINT are never interrupted."""
        if self.internal:
            return False
        if self.cancel is not None and self.cancel.is_set():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    # called by SQLite (through apsw) for every statement about to run
    def _trace(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        if self.internal:
            return True         # our SAVEPOINT/RELEASE must not replace the client's description
        if self.many is not None:
            if self.many[2]:
                self.many[2] = False
            else:
                self._count_set()       # the set before this one is done
        if sql == self.checked:
            pass                # executemany: the same statement again, already checked
        elif not self._check(cursor, sql):
            return False
        if not cursor.is_readonly:
            if self.autocommit:
                self.misuse = _NEEDS_TRANSACTION    # nothing ran: the caller begins and runs it again
                return False
            self.wrote = True
            if not self.holds_writer:
                self.db.take_writer(self.cancel)
                self.holds_writer = True
        return True

    def _check(self, cursor: apsw.Cursor, sql: str) -> bool:
        """Once per statement text: its description, and that it is the only statement."""
        if _ONE_STATEMENT_TAIL.fullmatch(sql):
            return True         # a comment after the statement: SQLite runs nothing, it keeps its result
        try:
            self.description = list(cursor.get_description())
            self.prepared = sql
        except apsw.ExecutionCompleteError:
            self.description = None
        if not self.internal and self.text is not None and not _ONE_STATEMENT_TAIL.fullmatch(sql):
            # one statement per execute, as Python's sqlite3: "SELECT 1; DELETE FROM t" is
            # refused before anything of it runs (SQLite would run both)
            at = self.text.find(sql)
            if at < 0 or not _ONE_STATEMENT_TAIL.fullmatch(self.text[:at]) or \
                    not _ONE_STATEMENT_TAIL.fullmatch(self.text[at + len(sql):]):
                self.misuse = "you can only execute one statement at a time"
                return False
        self.checked = sql
        return True

    def _authorize(self, action: int, a1: str | None, a2: str | None, dbname: str | None, _: str | None) -> int:
        if self.internal:
            return apsw.SQLITE_OK
        reason = None
        if action in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH):
            reason = "ATTACH, DETACH and VACUUM INTO are not allowed through the SQL server"
        elif action == apsw.SQLITE_TRANSACTION:
            reason = (f"{a1} statements are not allowed: send a batch (atomic) or use an interactive "
                      "transaction (begin/commit/rollback in the API, or the driver's commit()/rollback())")
        elif action == apsw.SQLITE_PRAGMA:
            reason = pragma_refusal(a1 or "", a2, self.readonly)
        elif action == apsw.SQLITE_FUNCTION and (a2 or "").lower() in _DENIED_FUNCTIONS:
            reason = f"function {a2}() is not allowed through the SQL server (it reaches the server's files)"
        elif self.readonly and action in _WRITE_ACTIONS and dbname != "temp":
            reason = f"read-only access to database {self.db.name}: writes are not allowed"
        if reason:
            self.denied = reason
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK

    def internal_exec(self, sql: str) -> None:
        self.internal = True
        try:
            # cached under a text no client can send (a secret comment): a client's own "BEGIN"
            # is a different statement, prepared and checked by the authorizer
            self.conn.execute(sql + _INTERNAL)
        finally:
            self.internal = False

    def run(self, stmts: list[Statement]) -> list[dict[str, Any]]:
        return [self._one(i, st) for i, st in enumerate(stmts)]

    def _one(self, i: int, st: Statement) -> dict[str, Any]:
        """One statement. Whatever goes wrong is a clean error of this statement; the
        transaction stays usable unless SQLite itself rolled it back."""
        self.denied = self.misuse = self.checked = None
        self.description = None
        cur = self.conn.cursor()
        self.wrote = False
        self.text = st.sql
        details: dict[str, Any] = {"statement": i}
        settings = self.db.settings
        self.deadline = time.monotonic() + settings.statement_timeout
        try:
            if st.many is not None:
                rows: list[Any] = []
                changes, rowid = self._many(cur, st)
            elif "RETURNING" in st.sql.upper():
                # SQLite makes every change before the first row comes back: a result over
                # the limit must take the changes back with it
                rows, changes, rowid = self._guarded(cur, lambda: self._rows(cur, st, i, details))
            else:
                rows, changes, rowid = self._rows(cur, st, i, details)
        except apsw.ExecTraceAbort:
            if self.misuse is _NEEDS_TRANSACTION:
                raise _NeedsTransaction from None
            raise UsageError(f"statement {i + 1}: {self.misuse or 'refused'}", details=details,
                             hint="send each statement separately (several in one batch run atomically)") from None
        except apsw.Error as exc:
            if isinstance(exc, apsw.BusyError) and self.holds_writer and not self.dirty:
                # nothing written yet (e.g. SQLite refused the first write of a stale
                # snapshot): other writers need not wait for this transaction to end
                self.holds_writer = False
                self.db.give_writer()
            raise self._failure(exc, i, st) from None
        except KeyError as exc:     # apsw: a :name the parameters do not have
            raise UsageError(f"statement {i + 1}: no value for parameter :{exc.args[0] if exc.args else '?'}",
                             details=details, hint="pass every :name the statement uses") from None
        except (TypeError, OverflowError, ValueError, IndexError) as exc:   # bindings that do not fit
            raise UsageError(f"statement {i + 1}: {exc}", details=details) from None
        except BastionError:
            raise
        except Exception as exc:  # never a 500 that leaves the transaction hanging
            log.exception("statement %d failed unexpectedly", i + 1)
            raise UsageError(f"statement {i + 1} could not run: {type(exc).__name__}: {exc}",
                             details=details) from None
        finally:
            self.text = None
            self.deadline = None
            cur.close()
        desc: list[tuple[str, str | None]] = self.description or []
        self.dirty = self.dirty or self.wrote
        # as Python's sqlite3: rowcount is the statement's own changes (not its triggers') for
        # INSERT/UPDATE/DELETE/REPLACE, else -1; lastrowid only after an INSERT that inserted
        # (never a stale value of this pooled connection, which may be another user's)
        m = _FIRST_WORD.match(st.sql)
        first = (m.group(1) if m else "").upper()
        dml = first in ("INSERT", "UPDATE", "DELETE", "REPLACE")
        insert = first in ("INSERT", "REPLACE")
        return {"columns": [d[0] for d in desc], "decltypes": [d[1] for d in desc], "rows": rows,
                "rowcount": changes if dml else -1, "lastrowid": rowid if insert else None}

    def _rows(self, cur: apsw.Cursor, st: Statement, i: int,
              details: dict[str, Any]) -> tuple[list[Any], int, int | None]:
        rows, size = [], 0
        try:
            for r in cur.execute(st.sql, st.params):
                row = values.encode_row(r)
                size += sum(len(v) if isinstance(v, str) else 8 for v in row) + 4
                rows.append(row)
                self._bound(rows, size, i, details)
        except UnicodeDecodeError:
            rows = self._raw_text_rows(cur, st, i, details)
        changes = self.conn.changes()
        rowid = self.conn.last_insert_rowid() if changes else None
        return rows, changes, rowid

    def _bound(self, rows: list[Any], size: int, i: int, details: dict[str, Any]) -> None:
        settings = self.db.settings
        if len(rows) > settings.max_result_rows or size > settings.max_result_bytes:
            raise ResultTooLarge(
                f"statement {i + 1}: the result is larger than the server sends in one answer "
                f"({settings.max_result_rows} rows, {settings.max_result_bytes} bytes: [sql] "
                "max_result_rows, max_result_bytes)",
                hint="add LIMIT and fetch in pages (WHERE id > last_seen)", details=details)

    def _raw_text_rows(self, cur: apsw.Cursor, st: Statement, i: int, details: dict[str, Any]) -> list[Any]:
        """The result holds TEXT that is not valid UTF-8 (written by a C program, or CAST
        from a blob), which apsw cannot turn into str. A read-only query is run again (same
        transaction, same snapshot) with each column read as bytes plus whether it was
        text; such text is sent as {"$text": base64} (values.py). A statement that wrote
        is not run twice."""
        desc, sql = self.description or [], (self.prepared or "").rstrip().rstrip(";")
        cur.close(True)         # force: a tail after the statement (a comment) is no error
        first = _FIRST_WORD.match(sql)
        assert first is not None    # every part of the pattern is optional: it always matches
        if self.wrote or not desc or not sql or first.group(1).upper() not in (
                "SELECT", "WITH", "VALUES"):
            raise SQLFailure(f"statement {i + 1}: a result value is TEXT that is not valid UTF-8", details=details,
                             hint="select it as CAST(column AS BLOB) to read its bytes")
        names = [f"c{n}" for n in range(len(desc))]
        cols = ", ".join(f"CASE WHEN typeof({c}) = 'text' THEN CAST({c} AS BLOB) ELSE {c} END, "
                         f"typeof({c}) = 'text'" for c in names)
        wrapped = f"WITH _bastion_raw({', '.join(names)}) AS (\n{sql}\n) SELECT {cols} FROM _bastion_raw"
        self.text, keep = wrapped, self.description
        rows, size = [], 0
        try:
            for r in self.conn.cursor().execute(wrapped, st.params, can_cache=False):
                row = [values.encode_text(r[k]) if r[k + 1] else values.encode(r[k]) for k in range(0, len(r), 2)]
                size += sum(len(v) if isinstance(v, str) else 8 for v in row) + 4
                rows.append(row)
                self._bound(rows, size, i, details)
        finally:
            self.description = keep
        return rows

    def _guarded(self, cur: apsw.Cursor, fn: Callable[[], Any]) -> Any:
        """Run fn inside a savepoint: all of its changes stay, or none does."""
        self.internal_exec("SAVEPOINT bastion_stmt")
        try:
            out = fn()
        except BaseException:
            cur.close()         # a statement still in progress would keep the savepoint
            if self.conn.in_transaction:
                self.internal_exec("ROLLBACK TO bastion_stmt")
                self.internal_exec("RELEASE bastion_stmt")
            raise
        self.internal_exec("RELEASE bastion_stmt")
        return out

    def _many(self, cur: apsw.Cursor, st: Statement) -> tuple[int, int | None]:
        """executemany: every parameter set runs (rows it returns are read and dropped),
        or none does: a savepoint undoes the sets already run when one fails.
        Returns the statement's own changes over all sets, and the last inserted rowid:
        SQLite's changes() of each set is read by the tracer before the next set runs."""
        if not st.many:
            return 0, None
        self.internal_exec("SAVEPOINT bastion_many")
        self.many = [0, None, True]
        try:
            for _ in cur.executemany(st.sql, st.many):
                pass
            self._count_set()
            changes, rowid = self.many[0], self.many[1]
        except BaseException:
            cur.close()
            if self.conn.in_transaction:
                self.internal_exec("ROLLBACK TO bastion_many")
                self.internal_exec("RELEASE bastion_many")
            raise
        finally:
            self.many = None
        self.internal_exec("RELEASE bastion_many")
        return changes, rowid

    def _count_set(self) -> None:
        """One parameter set of executemany has run: add its own changes (not its triggers')."""
        assert self.many is not None
        n = self.conn.changes()
        self.many[0] += n
        if n:
            self.many[1] = self.conn.last_insert_rowid()

    def _failure(self, exc: apsw.Error, i: int, st: Statement) -> BastionError:
        kind = type(exc).__name__
        details = {"statement": i, "sqlite_error": kind, "extended_code": getattr(exc, "extendedresult", None)}
        if isinstance(exc, apsw.BindingsError):
            return UsageError(f"statement {i + 1}: {str(exc).removeprefix('BindingsError: ')}", details=details)
        if self.denied and (isinstance(exc, apsw.AuthError) or "not authorized" in str(exc)):
            return PermissionDenied(f"statement {i + 1}: {self.denied}", details=details)
        if isinstance(exc, apsw.InterruptError):
            if self.cancel is not None and self.cancel.is_set():
                return SQLFailure(f"statement {i + 1}: interrupted: the client went away", details=details)
            return SQLFailure(f"statement {i + 1}: interrupted after {self.db.settings.statement_timeout:g} s "
                              "(the statement time limit, [sql] statement_timeout)", details=details,
                              hint="make the statement cheaper (an index, a LIMIT) or raise the limit")
        if isinstance(exc, apsw.BusyError):
            return BusyError(f"statement {i + 1}: database {self.db.name} is busy: {exc}", details=details,
                             hint="another writer held the lock longer than the busy timeout; retry")
        msg = str(exc)
        if msg.startswith(kind + ": "):         # apsw prefixes its class name
            msg = msg[len(kind) + 2:]
        return SQLFailure(f"statement {i + 1}: {msg}", details=details,
                          hint=f"in: {st.sql.strip()[:200]}")

    def finish(self, commit: bool) -> None:
        """COMMIT or ROLLBACK; the writer turn is given back either way. A commit is not
        acknowledged yet: the caller gives the connection back, then calls acknowledge()."""
        ticket = None
        replicate = False
        positions: Cut | None = None
        try:
            if self.conn.in_transaction:
                if commit:
                    if self.holds_writer and self.db.guard:
                        self.db.guard()     # a fenced node never acknowledges a write (rolled back below)
                    try:
                        self.internal_exec("COMMIT")
                    except apsw.Error as exc:
                        raise SQLFailure(f"commit failed: {exc}",
                                         details={"sqlite_error": type(exc).__name__}) from exc
                    if self.holds_writer:
                        ticket = self.db.committer.committed()      # (its place in WAL order)
                        if self.db.durability == REPLICATED:
                            replicate = True
                            positions = self.db.log_positions(self.conn)
                else:
                    self.internal_exec("ROLLBACK")
        finally:
            if self.conn.in_transaction:
                try:
                    self.internal_exec("ROLLBACK")
                except apsw.Error:
                    pass
            if self.holds_writer:
                self.holds_writer = False
                self.db.give_writer()
        self.pending = (ticket, replicate, positions) if ticket is not None else None

    def acknowledge(self, acks: Acks | None = None) -> None:
        """Return once the commit finish() made is as durable as the database promises. Called
        after the connection went back to the pool: the wait for the fsync holds neither the
        writer turn nor a connection, so the next writers commit meanwhile (their order is the
        WAL's) and the next fsync covers them. With ``acks`` (the SQL routes), a commit that
        waits only for its fsync is not waited for here: (committer, ticket) is added to acks,
        and the caller must hold the answer back until the committer says it is durable."""
        if self.pending is None:
            return
        (ticket, replicate, positions), self.pending = self.pending, None
        if self.db.wait_for_fsync:
            if acks is not None and not replicate:
                acks.append((self.db.committer, ticket))
                return
            self.db.committer.wait_durable(ticket)
        if replicate:       # None (capture not running yet) fails: never acknowledged as replicated
            self.db.wait_replicated(positions)


class _Hooks:
    """What SQLite calls on one pooled connection (tracer, authorizer, progress and busy
    handlers), forwarded to the connection's current transaction. Set once per connection:
    setting an authorizer empties the connection's statement cache, and a point query
    prepared every time costs more than the query. The authorizer's answers depend only on
    what a pool's connections share (the database, read-only or not), so a cached client
    statement is one it allowed; internal statements never share a client's text."""

    __slots__ = ("patience", "tx")

    def __init__(self, timeout: float) -> None:
        self.tx: Tx | None = None
        self.patience = _Patience(timeout, self)

    def trace(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        return True if self.tx is None else self.tx._trace(cursor, sql, bindings)

    def authorize(self, action: int, a1: str | None, a2: str | None, dbname: str | None, x: str | None) -> int:
        return apsw.SQLITE_OK if self.tx is None else self.tx._authorize(action, a1, a2, dbname, x)

    def progress(self) -> bool:
        return False if self.tx is None else self.tx._progress()


class _Patience:
    """A busy handler that polls every millisecond or so. SQLite's own sleeps 1, 2, 5 … 100 ms
    between tries, so a local application that commits back to back keeps winning the
    lock and the server's writers starve; polling often gives them a fair share.
    It stops waiting once the client of its transaction is gone."""

    def __init__(self, timeout: float, hooks: _Hooks | None = None) -> None:
        self.timeout = timeout
        self.since = 0.0
        self.hooks = hooks

    def __call__(self, count: int) -> bool:
        now = time.monotonic()
        if count == 0:
            self.since = now
        elif now - self.since > self.timeout:
            return False
        tx = self.hooks.tx if self.hooks is not None else None
        if tx is not None and tx.cancel is not None and tx.cancel.is_set():
            return False
        time.sleep(0.0005 if count < 200 else 0.002)
        return True


def _still_wanted(cancel: threading.Event | None) -> None:
    """A request that waited for a thread while its client left is not run at all."""
    if cancel is not None and cancel.is_set():
        raise TransactionGone("the client went away before its request ran: nothing of it ran")


def _schema_name(path: str, taken: set[str]) -> str:
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]) or "db"
    name, n = stem, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name.lower())
    return name


class Database:
    """One served database: its connection pools, writer turns and group committer."""

    def __init__(self, name: str, paths: list[str], durability: str, group_commit: bool,
                 settings: SQLSettings, foreign_keys: bool = False) -> None:
        self.name, self.paths, self.settings = name, list(paths), settings
        self.foreign_keys = foreign_keys
        self.durability, self.group_commit = durability, group_commit
        self._writer = threading.Lock()
        self.committer = GroupCommitter(self.paths)
        self.wait_for_fsync = durability in (DURABLE, REPLICATED) and group_commit
        # replicated: set by the daemon once real-time backup runs; waits until the backup
        # server has applied every change up to the given capture positions (one per file)
        self.replicated_wait: Callable[[Cut], None] | None = None
        # idle connections per role, most recently used last, with when each came back
        self._pools: dict[bool, list[tuple[apsw.Connection, float]]] = {True: [], False: []}
        self._pool_lock = threading.Lock()
        self.hooks: weakref.WeakKeyDictionary[apsw.Connection, _Hooks] = weakref.WeakKeyDictionary()
        self.suspended: str | None = None
        self.guard: Callable[[], None] | None = None    # cluster: may this node acknowledge writes now?
        self.expire_idle: Callable[[], Any] | None = None  # the service's sweep, for waiting writers
        taken = {"main", "temp"}
        self.schemas = ["main"] + [_schema_name(p, taken) for p in self.paths[1:]]

    def log_positions(self, conn: apsw.Connection) -> Cut | None:
        """The last change-capture position of each file, read right after our COMMIT (we
        still hold the writer turn, so nothing of ours can come later). After DDL, capture
        has not yet logged the new schema (nor the rows no trigger saw): refresh it first,
        so that the positions cover this commit."""
        from .. import capture
        out = []
        for schema, path in zip(self.schemas, self.paths):
            try:
                cookie = connect.one(conn, f'PRAGMA "{schema}".schema_version')
                seen = conn.execute(f'SELECT value FROM "{schema}"._bastion_meta '
                                    "WHERE key = 'schema_version'").fetchone()
                if seen is None or seen[0] != cookie:
                    capture.refresh(path)
                last = connect.one(conn, f'SELECT max(rowid) FROM "{schema}"._bastion_log')
            except apsw.SQLError:
                return None         # capture not installed yet: nothing can be replicated
            out.append(int(last or 0))
        return Cut.of(out)

    def wait_replicated(self, positions: Cut | None) -> None:
        from ..errors import NotReplicated
        if positions is None or self.replicated_wait is None:
            raise NotReplicated(f"database {self.name}: committed here, but real-time backup is not running yet "
                                "(capture not installed), so the commit is not on the backup server",
                                hint="see `bastion replicate status`; the commit is durable on this node")
        self.replicated_wait(positions)

    def take_writer(self, cancel: threading.Event | None = None) -> None:
        # While waiting, expire idle transactions now rather than at the sweeper's next
        # round (once a second): an abandoned writer is rolled back at its idle timeout
        # (half the busy timeout) even when the busy timeout is shorter than that round.
        # A request whose client has gone stops waiting: it must never run after the lock frees.
        deadline = time.monotonic() + self.settings.busy_timeout
        while True:
            got = self._writer.acquire(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            if cancel is not None and cancel.is_set():      # gone while waiting, or just as the lock came free
                if got:
                    self._writer.release()
                raise TransactionGone(f"database {self.name}: the client went away while waiting for the write "
                                      "lock; nothing of its request ran")
            if got:
                return
            if self.expire_idle is not None:
                self.expire_idle()
            if time.monotonic() >= deadline:
                raise BusyError(f"database {self.name}: another transaction held the write lock for more than "
                                f"{self.settings.busy_timeout:g} s", hint="retry; long transactions block writers")

    def give_writer(self) -> None:
        self._writer.release()

    def _open(self, readonly: bool) -> apsw.Connection:
        if not os.path.exists(self.paths[0]):
            raise FileProblem(f"database {self.name}: {self.paths[0]} does not exist", path=self.paths[0])
        conn = connect.app_file(self.paths[0], nofollow=True, busy_ms=None)
        conn.set_busy_handler(_Patience(self.settings.busy_timeout))
        sync = "FULL" if self.durability in (DURABLE, REPLICATED) and not self.group_commit else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        for path, schema in zip(self.paths[1:], self.schemas[1:]):
            conn.execute("ATTACH ? AS " + f'"{schema}"', (path,), can_cache=False)    # never a client's
        for schema in self.schemas:
            conn.execute(f'PRAGMA "{schema}".synchronous={sync}')
            mode = connect.one(conn, f'PRAGMA "{schema}".journal_mode')
            if mode != "wal":
                conn.close()
                raise FileProblem(f"database {self.name}: schema {schema} is in {mode} mode, not WAL",
                                  hint="the daemon protects (switches to WAL) every configured file; "
                                       "see `bastion status`")
        if self.foreign_keys:
            conn.execute("PRAGMA foreign_keys=ON")
        if readonly:
            conn.execute("PRAGMA query_only=1")
        hooks = self.hooks[conn] = _Hooks(self.settings.busy_timeout)
        conn.exec_trace = hooks.trace
        conn.authorizer = hooks.authorize       # (empties the statement cache: nothing above is in it)
        conn.set_progress_handler(hooks.progress, 2000)
        conn.set_busy_handler(hooks.patience)
        return conn

    def acquire(self, readonly: bool) -> apsw.Connection:
        with self._pool_lock:
            if self.suspended:
                raise BusyError(f"database {self.name} is unavailable: {self.suspended}", hint="retry shortly")
            pool = self._pools[readonly]
            if pool:
                return pool.pop()[0]
        return self._open(readonly)

    def release(self, conn: apsw.Connection, readonly: bool, healthy: bool = True, check_temp: bool = True) -> None:
        self.hooks[conn].tx = None
        if healthy and check_temp:
            try:    # TEMP objects would be seen by the next client of this connection
                healthy = not conn.execute("SELECT 1 FROM temp.sqlite_schema LIMIT 1").fetchall()
            except apsw.Error:
                healthy = False
        with self._pool_lock:
            # Up to one connection per worker thread stays: group commit answers in bursts, so
            # bursts of requests hold more connections at once than pool_size; closing the
            # extra ones at once would reopen them at the next burst. trim() closes those that
            # stay idle.
            if healthy and not self.suspended and not conn.in_transaction \
                    and len(self._pools[readonly]) < max(self.settings.pool_size, self.settings.threads):
                self._pools[readonly].append((conn, time.monotonic()))
                return
        conn.close()

    def trim(self, now: float, idle: float = POOL_IDLE) -> None:
        """Close the idle connections beyond pool_size that nobody used for ``idle`` seconds."""
        old: list[apsw.Connection] = []
        with self._pool_lock:
            for pool in self._pools.values():
                while len(pool) > self.settings.pool_size and now - pool[0][1] > idle:
                    old.append(pool.pop(0)[0])
        for c in old:
            c.close()

    def close_idle(self) -> None:
        with self._pool_lock:
            conns = [c for c, _ in self._pools[True] + self._pools[False]]
            self._pools = {True: [], False: []}
        for c in conns:
            c.close()


@dataclass
class Session:
    id: str
    user: str
    db: Database
    tx: Tx
    readonly: bool
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SQLService:
    def __init__(self, databases: dict[str, Database], settings: SQLSettings,
                 guard: Callable[[], None] | None = None) -> None:
        self.databases = databases
        for d in databases.values():
            d.guard = guard
            d.expire_idle = self.sweep
        self.settings = settings
        self._sessions: dict[str, Session] = {}
        self._gone: dict[str, tuple[float, str]] = {}       # id -> (when, why): for clear errors
        self._lock = threading.Lock()

    # -- lookups ----------------------------------------------------------------------
    def _database(self, principal: Principal, name: str, write: bool) -> tuple[Database, bool]:
        db = self.databases.get(name)
        role = principal.role(name)
        if db is None or role is None:
            # the same answer whether it does not exist or is not yours: names are not disclosed
            raise UnknownTarget(f"no database {name!r} that user {principal.name} may use",
                                hint="check the name (bastion status) and the user's access in the config")
        readonly = role == READ_ONLY
        if write and readonly:
            raise PermissionDenied(f"user {principal.name} has read-only access to database {name}")
        return db, readonly

    @staticmethod
    def _parse(statements: Any) -> list[Statement]:
        if not isinstance(statements, list) or not statements:
            raise UsageError("'statements' must be a non-empty list")
        return [Statement.parse(s, i) for i, s in enumerate(statements)]

    # -- batches ----------------------------------------------------------------------
    def execute(self, principal: Principal, name: str, statements: Any, readonly: bool = False,
                cancel: threading.Event | None = None, acks: Acks | None = None) -> dict[str, Any]:
        stmts = self._parse(statements)
        _still_wanted(cancel)
        db, ro = self._database(principal, name, write=False)
        ro = ro or readonly
        t0 = time.perf_counter()
        # A lone query runs in SQLite's autocommit (a read transaction of its own), without a
        # BEGIN/COMMIT around it. SQLite says whether it writes: then nothing of it ran, and
        # it runs again in a transaction. Nothing a query runs can leave TEMP objects behind.
        m = _FIRST_WORD.match(stmts[0].sql)
        lone = len(stmts) == 1 and stmts[0].many is None and m is not None and m.group(1).upper() in _READS \
            and "RETURNING" not in stmts[0].sql.upper()
        for attempt in range(5):
            conn = db.acquire(ro)
            tx = Tx(db, conn, ro, cancel)
            healthy = True
            clean = False
            try:
                if lone and attempt == 0:
                    tx.autocommit = True
                    try:
                        results = tx.run(stmts)
                        clean = True
                        return {"database": name, "results": results, "retries": 0,
                                "seconds": round(time.perf_counter() - t0, 6)}
                    except _NeedsTransaction:
                        tx.autocommit = False
                tx.internal_exec("BEGIN")
                results = tx.run(stmts)
                tx.finish(commit=True)
            except BusyError as exc:
                tx.finish(commit=False)
                # stale snapshot: nothing was acknowledged, the whole batch may run again
                if exc.details.get("extended_code") == apsw.SQLITE_BUSY_SNAPSHOT and attempt < 4:
                    continue
                raise
            except BaseException:
                try:
                    tx.finish(commit=False)
                except BaseException:
                    healthy = False
                raise
            finally:
                db.release(conn, ro, healthy, check_temp=not clean)
            tx.acknowledge(acks)        # committed: wait for durability holding no connection
            return {"database": name, "results": results, "retries": attempt,
                    "seconds": round(time.perf_counter() - t0, 6)}
        raise AssertionError("unreachable")

    # -- interactive transactions -------------------------------------------------------
    def begin(self, principal: Principal, name: str, statements: Any = None, write: bool = False,
              readonly: bool = False, cancel: threading.Event | None = None) -> dict[str, Any]:
        stmts = self._parse(statements) if statements else []
        _still_wanted(cancel)
        db, ro = self._database(principal, name, write=write)
        ro = ro or readonly
        with self._lock:
            if len(self._sessions) >= self.settings.max_transactions:
                raise BusyError(f"{len(self._sessions)} interactive transactions are open, the most allowed",
                                hint="commit or roll back open transactions; [sql] max_transactions raises it")
            mine = sum(1 for x in self._sessions.values() if x.user == principal.name)
            if not principal.admin and mine >= self.settings.max_transactions_per_user:
                raise BusyError(f"user {principal.name} has {mine} interactive transactions open, the most "
                                "one user may have", hint="commit or roll back one first; [sql] "
                                "max_transactions_per_user raises it")
        conn = db.acquire(ro)
        tx = Tx(db, conn, ro, cancel)
        try:
            if write:
                db.take_writer(cancel)
                tx.holds_writer = True
                tx.internal_exec("BEGIN IMMEDIATE")
            else:
                tx.internal_exec("BEGIN")
            results = tx.run(stmts) if stmts else []
        except BaseException:
            tx.finish(commit=False)
            db.release(conn, ro)
            raise
        if cancel is not None and cancel.is_set():    # nobody will ever learn its id
            tx.finish(commit=False)
            db.release(conn, ro)
            raise TransactionGone("the client went away while the transaction began; it was rolled back")
        tx.cancel = None
        s = Session(secrets.token_urlsafe(18), principal.name, db, tx, ro)
        with self._lock:
            self._sessions[s.id] = s
        return {"database": name, "transaction": s.id, "results": results,
                "idle_timeout": self.settings.idle_timeout}

    def _session(self, principal: Principal, sid: str) -> Session:
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or (s.user != principal.name):
                gone = self._gone.get(sid)
                if gone:
                    raise TransactionGone(f"transaction {sid} is over: {gone[1]}",
                                          hint=None if gone[1] == "committed" else
                                          "nothing of it was committed; start a new transaction")
                raise TransactionGone(f"no open transaction {sid}",
                                      hint="it was never begun, already ended, or the daemon restarted "
                                           "(nothing of it was committed)")
            return s

    def _end(self, s: Session, why: str) -> None:
        with self._lock:
            self._sessions.pop(s.id, None)
            self._gone[s.id] = (time.monotonic(), why)

    def run_in(self, principal: Principal, sid: str, statements: Any, database: str | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
        stmts = self._parse(statements)
        s = self._session(principal, sid)
        if database is not None and s.db.name != database:
            raise UsageError(f"transaction {sid} belongs to database {s.db.name}, not {database}")
        with s.lock:
            self._session(principal, sid)     # still open now that we have it
            s.last_used = time.monotonic()
            s.tx.cancel = cancel
            try:
                _still_wanted(cancel)
                results = s.tx.run(stmts)
                if cancel is not None and cancel.is_set():
                    raise TransactionGone("the client went away during a request")
            except BastionError:
                if cancel is not None and cancel.is_set():      # nobody is left to commit it
                    self._close(s, commit=False, why="rolled back: the client went away during a request")
                elif not s.tx.conn.in_transaction:    # SQLite rolled the whole transaction back
                    self._close(s, commit=False, why="SQLite rolled it back after an error")
                raise
            except BaseException:   # not a statement's error: end it now rather than orphan it
                self._close(s, commit=False, why="an internal error in the daemon rolled it back")
                raise
            finally:
                s.tx.cancel = None
                s.last_used = time.monotonic()
            return {"transaction": sid, "results": results}

    def finish(self, principal: Principal, sid: str, commit: bool, acks: Acks | None = None) -> dict[str, Any]:
        s = self._session(principal, sid)
        with s.lock:
            self._session(principal, sid)
            self._close(s, commit, "committed" if commit else "rolled back", acks)
        return {"transaction": sid, "committed": commit}

    def _close(self, s: Session, commit: bool, why: str, acks: Acks | None = None) -> None:
        self._end(s, why)
        healthy = True
        try:
            s.tx.finish(commit)
        except BaseException:
            healthy = False
            raise
        finally:
            s.db.release(s.tx.conn, s.readonly, healthy)
        s.tx.acknowledge(acks)

    # -- upkeep -------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Roll back transactions idle past the timeout, close pooled connections idle too long
        (called by the daemon every second)."""
        now = now or time.monotonic()
        expired = []
        for d in self.databases.values():
            d.trim(now)
        with self._lock:
            candidates = [s for s in self._sessions.values() if now - s.last_used > (
                self.settings.writer_idle_timeout if s.tx.holds_writer else self.settings.idle_timeout)]
            for sid, (when, _) in list(self._gone.items()):
                if now - when > 3600:
                    del self._gone[sid]
        for s in candidates:
            if not s.lock.acquire(blocking=False):
                continue                        # in use right now: not idle
            try:
                if s.id not in self._sessions:
                    continue
                limit = self.settings.writer_idle_timeout if s.tx.holds_writer else self.settings.idle_timeout
                self._close(s, commit=False, why=f"rolled back after {limit:g} s idle (the idle timeout"
                            + (", halved for a transaction holding the write lock)" if limit
                               < self.settings.idle_timeout else ")"))
                log.warning("transaction %s of %s on %s rolled back: idle timeout", s.id, s.user, s.db.name)
                expired.append(s.id)
            except BaseException:  # the sweeper must go on
                log.exception("rolling back idle transaction %s", s.id)
            finally:
                s.lock.release()
        return expired

    def open_transactions(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [{"transaction": s.id[:6] + "…", "user": s.user, "database": s.db.name,
                     "age_seconds": round(now - s.started, 3), "idle_seconds": round(now - s.last_used, 3),
                     "holds_write_lock": s.tx.holds_writer} for s in self._sessions.values()]

    def suspend(self, paths: list[str], why: str) -> Callable[[], None]:
        """Take the databases owning ``paths`` out of service (restore --replace); returns resume()."""
        dbs = [d for d in self.databases.values() if set(d.paths) & set(paths)]
        with self._lock:
            busy = [s for s in self._sessions.values() if s.db in dbs]
        if busy:
            raise StateConflict(f"database {busy[0].db.name} has {len(busy)} open SQL transaction(s)",
                                hint="commit or roll them back (or wait for the idle timeout); nothing was changed")
        for d in dbs:
            d.suspended = why
            d.close_idle()

        def resume() -> None:
            for d in dbs:
                d.suspended = None
        return resume

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            try:
                self._close(s, commit=False, why="the daemon stopped")
            except BaseException:
                pass
        for d in self.databases.values():
            d.suspended = "the daemon is stopping"
            d.close_idle()

    def stats(self) -> dict[str, Any]:
        return {name: {"durability": d.durability, "group_commit": d.group_commit, "fsyncs": d.committer.fsyncs,
                       "schemas": dict(zip(d.schemas, d.paths))} for name, d in self.databases.items()}
