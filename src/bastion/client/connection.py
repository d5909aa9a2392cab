"""PEP 249 connections and cursors over a Bastion daemon's SQL API.

Transactions follow Python's sqlite3 module (its classic behaviour): a transaction is
begun implicitly before an INSERT, UPDATE, DELETE or REPLACE, and lasts until
``commit()`` or ``rollback()``; other statements outside a transaction run on their
own (autocommit). With ``autocommit=True`` every ``execute`` is its own transaction.
An open transaction lives on the server (an interactive transaction); if it is lost
(idle timeout, node failure) the next call raises :class:`TransactionLost` and
nothing of it was committed — it is never replayed behind the caller's back.
"""

from __future__ import annotations

import base64
import datetime
import math
import os
import re
from typing import Any
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from ..tls import trust
from . import errors
from .errors import (ConnectionClosed, InterfaceError, NoActiveNode, OperationalError, OutcomeUnknown, ProgrammingError,
                     TransactionLost)
from .transport import Transport

_DML = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(INSERT|UPDATE|DELETE|REPLACE)\b", re.I | re.S)


def _encode(v: Any, i: int) -> Any:
    if v is None:
        return v
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ProgrammingError(f"parameter {i}: the string holds surrogates, which are not text "
                                   "SQLite can store", hint="send its bytes as a BLOB (bytes) instead") from None
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise ProgrammingError(f"parameter {i}: integer {v} does not fit in 64 bits")
        return v
    if isinstance(v, float):
        if math.isinf(v):
            return {"$float": "inf" if v > 0 else "-inf"}
        return None if math.isnan(v) else v       # SQLite stores NaN as NULL
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$blob": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat(" ") if isinstance(v, datetime.datetime) else v.isoformat()
    raise ProgrammingError(f"parameter {i}: type {type(v).__name__} is not supported",
                           hint="use None, int, float, str, bytes or datetime")


def _plain(params: list | tuple) -> bool:
    """Only values JSON carries as they are (the common case: no call per value)."""
    for v in params:
        t = type(v)
        if t is int:
            if not -(2**63) <= v < 2**63:
                return False
        elif t is float:
            if not math.isfinite(v):
                return False
        elif t is str:
            if not v.isascii():         # may hold surrogates: checked one by one
                return False
        elif v is not None:
            return False
    return True


def _encode_params(params: Any) -> Any:
    if params is None:
        return []
    if (type(params) is tuple or type(params) is list) and _plain(params):
        return list(params)
    if isinstance(params, dict):
        return {k: _encode(v, k) for k, v in params.items()}
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise ProgrammingError("parameters must be a sequence (for ?) or a mapping (for :name)")
    return [_encode(v, i + 1) for i, v in enumerate(params)]


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "$blob" in v:
            return base64.b64decode(v["$blob"])
        if "$float" in v:
            return float(v["$float"])
        if "$text" in v:    # TEXT that is not UTF-8: a str that keeps its bytes (docs/sql.md)
            return base64.b64decode(v["$text"]).decode("utf-8", "surrogateescape")
    return v


class Cursor:
    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.description: tuple | None = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[tuple] = []
        self._pos = 0
        self._closed = False
        self._executed: str | None = None     # the last statement run (None: none yet)

    def _check(self) -> None:
        if self._closed:
            raise ProgrammingError("cannot operate on a closed cursor")
        self.connection._check()

    def _load(self, result: dict[str, Any]) -> None:
        cols = result.get("columns") or []
        types = result.get("decltypes") or [None] * len(cols)
        self.description = tuple((c, t, None, None, None, None, None) for c, t in zip(cols, types)) or None
        self._rows = [tuple(_decode(v) for v in r) for r in result.get("rows", [])]
        self._pos = 0
        self.rowcount = result.get("rowcount", -1)
        if result.get("lastrowid") is not None:     # as sqlite3: only an INSERT changes it
            self.lastrowid = result["lastrowid"]

    def execute(self, sql: str, parameters: Any = None) -> Cursor:
        self._check()
        if not isinstance(sql, str):
            raise ProgrammingError("sql must be a string")
        self.description, self._executed = None, sql
        result = self.connection._run({"sql": sql, "params": _encode_params(parameters)}, sql)
        self._load(result)
        return self

    def executemany(self, sql: str, seq_of_parameters: Any) -> Cursor:
        self._check()
        many = [_encode_params(p) for p in seq_of_parameters]
        self.description, self._executed = None, sql
        if not many:
            self.rowcount = 0
            return self
        result = self.connection._run({"sql": sql, "many": many}, sql)
        self._load(result)
        self.description = None
        return self

    def _fetchable(self) -> None:
        # PEP 249: an error if no execute() was issued or it produced no result set. (sqlite3
        # returns None/[] instead, which hides a fetch from the wrong statement.)
        self._check()
        if self.description is None:
            raise ProgrammingError("no result set to fetch from: " + (
                "nothing was executed on this cursor yet" if self._executed is None else
                f"the last statement produced none ({self._executed[:60]!r})"),
                hint="fetch after a statement that returns rows (SELECT, PRAGMA, ... RETURNING)")

    def fetchone(self) -> tuple | None:
        self._fetchable()
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        return row

    def fetchmany(self, size: int | None = None) -> list[tuple]:
        self._fetchable()
        n = self.arraysize if size is None else size
        rows = self._rows[self._pos:self._pos + n]
        self._pos += len(rows)
        return rows

    def fetchall(self) -> list[tuple]:
        self._fetchable()
        rows = self._rows[self._pos:]
        self._pos = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[tuple]:
        while (row := self.fetchone()) is not None:
            yield row

    def close(self) -> None:
        self._closed = True
        self._rows = []

    def setinputsizes(self, sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Connection:
    # PEP 249's optional extension: the exception classes on the connection, so code that
    # holds only a connection (of any driver) can catch ``con.IntegrityError``
    Warning = errors.Warning
    Error = errors.Error
    InterfaceError = errors.InterfaceError
    DatabaseError = errors.DatabaseError
    DataError = errors.DataError
    OperationalError = errors.OperationalError
    IntegrityError = errors.IntegrityError
    InternalError = errors.InternalError
    ProgrammingError = errors.ProgrammingError
    NotSupportedError = errors.NotSupportedError

    def __init__(self, transport: Transport, database: str, autocommit: bool = False) -> None:
        self.transport = transport
        self.database = database
        self.autocommit = autocommit
        self._tx: str | None = None
        self._lazy: bool | None = None       # begin(lazy=True) pending: its write flag
        self._closed = False

    def __repr__(self) -> str:       # never shows credentials
        return f"<bastion.client.Connection {self.database} via {self.transport.host}>"

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def _check(self) -> None:
        if self._closed:
            raise ConnectionClosed("cannot operate on a closed connection")

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sql/{self.database}{suffix}"

    def _run(self, statement: dict[str, Any], sql: str) -> dict[str, Any]:
        if self._tx is None and self._lazy is None and (self.autocommit or not _DML.match(sql)):
            return self.transport.post(self._path(), {"statements": [statement]})["results"][0]
        if self._tx is None:
            # the transaction begins with its first statement, in one request; if that fails the
            # server began nothing, and a pending lazy begin still applies to the next statement
            r = self.transport.post(self._path("/transactions"),
                                    {"statements": [statement], "write": bool(self._lazy)})
            self._tx, self._lazy = r["transaction"], None
            return r["results"][0]
        try:
            return self.transport.post(self._path(f"/transactions/{self._tx}"),
                                       {"statements": [statement]})["results"][0]
        except TransactionLost:
            self._tx = None
            raise
        except OperationalError as exc:
            if not isinstance(exc, (OutcomeUnknown, NoActiveNode)):
                raise           # a failed statement: the transaction goes on, as in SQLite
            self._tx = None
            raise TransactionLost(f"the connection was lost during a transaction ({exc.message}); "
                                  "nothing of the transaction was committed",
                                  hint="run the whole transaction again") from None

    def begin(self, write: bool = False, lazy: bool = False) -> None:
        """Start a transaction now (an extension of PEP 249; the shell uses it for BEGIN).
        ``write=True`` takes the write lock at once (BEGIN IMMEDIATE). ``lazy=True`` sends
        nothing yet: the transaction begins with the next statement, whatever it is (reads
        included), in the same request; like SQLite's own BEGIN, which takes no snapshot
        before its first statement. The SQLAlchemy dialect begins its transactions so."""
        self._check()
        if self._tx is not None or self._lazy is not None:
            raise ProgrammingError("a transaction is already open")
        if lazy:
            self._lazy = write
            return
        self._tx = self.transport.post(self._path("/transactions"), {"write": write})["transaction"]

    def commit(self) -> None:
        self._check()
        self._lazy = None
        if self._tx is None:
            return
        tx, self._tx = self._tx, None
        try:
            self.transport.post(self._path(f"/transactions/{tx}/commit"))
        except OutcomeUnknown as exc:
            raise OutcomeUnknown(f"the connection was lost during COMMIT: the transaction may or may not have "
                                 f"been committed ({exc.message})",
                                 hint="check the data before running it again") from None

    def rollback(self) -> None:
        self._check()
        self._lazy = None
        if self._tx is None:
            return
        tx, self._tx = self._tx, None
        try:
            self.transport.post(self._path(f"/transactions/{tx}/rollback"))
        except (TransactionLost, OutcomeUnknown):
            pass        # gone either way: nothing of it was committed

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._tx is not None:
                self.rollback()
        except OperationalError:
            pass
        finally:
            self._closed = True
            self.transport.close()

    def cursor(self) -> Cursor:
        self._check()
        return Cursor(self)

    def execute(self, sql: str, parameters: Any = None) -> Cursor:
        """A shortcut, as in sqlite3: a new cursor, executed."""
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Any) -> Cursor:
        return self.cursor().executemany(sql, seq_of_parameters)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        """As sqlite3: commit if the block succeeded, roll back if it raised (the connection stays open)."""
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def parse_dsn(dsn: str) -> dict[str, Any]:
    """bastion://[user[:password]@]host[:port][,host[:port]...]/DATABASE[?tls=1&ca=PATH&...]"""
    if not isinstance(dsn, str) or not dsn.startswith(("bastion://", "bastions://")):
        raise InterfaceError(f"not a Bastion DSN: {dsn!r}" if "@" not in str(dsn) else "not a Bastion DSN",
                             hint="bastion://user@host1:8750,host2:8750/DATABASE")
    # urlsplit rejects several hosts in the netloc on some versions: split by hand
    scheme, rest = dsn.split("://", 1)
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        user = unquote(user) or None
        password = unquote(pw) if pw else None
    hosts = []
    for h in netloc.split(","):
        h = h.strip()
        if not h:
            continue
        if not urlsplit(f"//{h}").port:
            h = f"{h}:8750"
        hosts.append(h)
    if not hosts:
        raise InterfaceError("the DSN names no host", hint="bastion://user@host1:8750,host2:8750/DATABASE")
    database = unquote(path.strip("/"))
    if not database:
        raise InterfaceError("the DSN names no database", hint="bastion://user@host:8750/DATABASE")
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    return {"scheme": scheme, "user": user, "password": password, "hosts": hosts, "database": database,
            "options": opts}


def connect(dsn: str, *, password: str | None = None, token: str | None = None, token_file: str | None = None,
            autocommit: bool = False, timeout: float = 30.0, failover_timeout: float = 30.0,
            ca: str | None = None) -> Connection:
    """Connect to a Bastion daemon (or the active node of several).

    Credentials: a user of the daemon's [users] (password in the DSN, the ``password``
    argument, or $BASTION_PASSWORD), or the daemon's admin token (``token`` /
    ``token_file``). TLS with ``bastions://`` or ``?tls=1``; ``ca`` (or ``?ca=PATH``)
    names the certificate authority to trust."""
    d = parse_dsn(dsn)
    opts = d["options"]
    tls = d["scheme"] == "bastions" or opts.get("tls", "").lower() in ("1", "true", "yes")
    ca = ca or opts.get("ca")
    token_file = token_file or opts.get("token_file")
    if token is None and token_file:
        try:
            with open(os.path.expanduser(token_file), encoding="ascii") as f:
                token = f.read().strip()
        except OSError as exc:
            raise InterfaceError(f"cannot read token file {token_file}: {exc.strerror}") from None
    if token:
        headers = {"Authorization": f"Bearer {token}"}
    else:
        if not d["user"]:
            raise InterfaceError("no credentials: name a user in the DSN (bastion://user@host/DB) or pass token=",
                                 hint="users are configured in the daemon's [users] section")
        pw = password if password is not None else d["password"]
        if pw is None:
            pw = os.environ.get("BASTION_PASSWORD")
        if pw is None:
            raise InterfaceError(f"no password for user {d['user']}",
                                 hint="pass password=..., put it in $BASTION_PASSWORD, or in the DSN")
        basic = base64.b64encode(f"{d['user']}:{pw}".encode()).decode("ascii")
        headers = {"Authorization": f"Basic {basic}"}
    timeout = float(opts.get("timeout", timeout))
    failover_timeout = float(opts.get("failover_timeout", failover_timeout))
    transport = Transport(d["hosts"], scheme="https" if tls else "http", headers=headers,
                          timeout=timeout, failover_timeout=failover_timeout, verify=trust(ca))
    try:
        transport.find_active()
    except OperationalError:
        transport.close()
        raise
    return Connection(transport, d["database"], autocommit)
