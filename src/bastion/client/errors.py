"""The PEP 249 exception hierarchy, and how the server's errors map onto it."""

from __future__ import annotations

from typing import Any

from .. import errors as server
from . import codes


class Warning(Exception):  # the name PEP 249 requires
    pass


class Error(Exception):
    def __init__(self, message: str, *, hint: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message if not hint else f"{message} ({hint})")
        self.message, self.hint, self.details = message, hint, details or {}


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


class AccessDenied(OperationalError):
    """Wrong credentials, or the user's role does not allow it."""


class TransactionLost(OperationalError):
    """The transaction is over and nothing of it was committed (idle timeout, lost
    connection, node failover). Start it again: the driver never replays it."""


class NotReplicated(OperationalError):
    """``durability = "replicated"``: the commit is durable on the node that answered, but
    the backup server did not apply it in time. It stays queued there and is shipped later."""


class OutcomeUnknown(OperationalError):
    """The connection broke after a commit (or an autocommit statement) was sent:
    it may or may not have been committed. Check before retrying."""


class NoActiveNode(OperationalError):
    """No host of the DSN answered as the active node within failover_timeout."""


class ConnectionClosed(ProgrammingError):
    """The connection was closed (by the application) and cannot be used any more."""


_SQLITE_BUSY_SNAPSHOT = 517     # SQLITE_BUSY | (2 << 8)


def from_server(status: int, body: Any) -> Error:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return InterfaceError(f"unexpected answer from the server (HTTP {status}): {str(body)[:200]}")
    kind, msg, hint, details = err.get("type"), err.get("message", "error"), err.get("hint"), err.get("details") or {}
    # by the server's class (the errors.py registry), so that its subclasses map like their parent
    sc: type = server.registry().get(str(kind), type(None))
    cls: type[Error]
    if issubclass(sc, server.SQLFailure):
        cls = globals().get(codes.class_name(details) or "", OperationalError)     # sqlite3's table
    elif issubclass(sc, (server.AuthError, server.PermissionDenied)):
        cls = AccessDenied
    elif issubclass(sc, server.NotReplicated):
        cls = NotReplicated
    elif issubclass(sc, server.TransactionGone):
        cls = TransactionLost
    elif issubclass(sc, server.UsageError):
        cls = ProgrammingError
    elif issubclass(sc, (server.BusyError, server.FileProblem, server.StateConflict, server.DaemonUnavailable)):
        cls = OperationalError
    else:
        cls = InternalError if status >= 500 else DatabaseError
    if details.get("extended_code") == _SQLITE_BUSY_SNAPSHOT:
        # not a lock held too long: SQLite refuses at once to write from a stale snapshot
        msg = (f"{msg.split(':', 1)[0]}: another transaction committed after this transaction's first read, "
               "so it cannot write (SQLite's serializable isolation)")
        hint = "roll back and run the whole transaction again"
    return cls(msg, hint=hint, details=details)
