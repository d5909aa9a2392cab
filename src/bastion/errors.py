"""Every error Bastion raises, in one hierarchy.

    BastionError                 exit 2 (failed) unless a subclass says otherwise
     +-- UsageError              exit 3: the command line or request is wrong; nothing was done
     |    +-- ConfigError        the config file is invalid
     |    +-- UnknownTarget      a database name or file that Bastion does not know
     |    +-- NoRepository       the URL holds no backup repository (yet)
     |    +-- KeyRequired        the repository is encrypted and no passphrase or key file was given
     |    +-- WrongKey           no key slot of the repository opens with the secret given
     |    +-- ResultTooLarge     a SQL result is larger than the server sends (HTTP 413)
     +-- FileProblem             a database file is missing, not SQLite, or cannot be put in WAL mode
     +-- StateConflict           the file is in the wrong state (already in continuous operations, not frozen...)
     |    +-- ReseedNeeded       a copy (replica, site) can only go on from a new snapshot of its source
     |    +-- ChangesMissing     a batch of changes does not follow what the copy holds (a gap)
     +-- BusyError               writers or readers did not let go in time; retry later
     +-- NotConsistent           a copy taken under continuous operations or freeze cannot be trusted
     +-- RecoveryRefused         recover --discard-changes cannot prove it is safe
     +-- DaemonUnavailable       no daemon answers at the configured address
 +-- ChildFailed             a child process doing file work died, or ran out of time and was killed
     +-- AuthError               the token or the user's credentials were missing or wrong
     +-- PermissionDenied        the user may not do that on that database (read-only role)
     +-- SQLFailure              a statement sent to the SQL server failed (details: SQLite's error)
     +-- TransactionGone         an interactive transaction expired (idle timeout) or is unknown
     +-- NotActive               this node is passive (or fenced): ask the active node
     +-- NotReplicated           committed here, but the backup server did not apply it in time
     +-- UnsafeName              a name from a repository could write outside its directory
     +-- RepositoryError         a backup repository is damaged or inconsistent
     |    +-- CorruptChunk       a chunk's bytes do not hash to its name
     |    +-- MissingChunk       a chunk a manifest names is not in the repository
     |    +-- DamagedManifest    a backup's manifest is unreadable or names bad chunks
     |    +-- RestoreFailed      a restore stopped; nothing was put in place
     |    +-- TamperedObject     an object of an encrypted repository fails authentication
     +-- StoreError              a storage operation (file, sftp, s3) failed after its retries
          +-- ObjectMissing      the object is not there
          +-- StoreUnreachable   transient trouble (connection, time-out) outlasted every retry
          +-- StoreRefused       a permanent refusal (credentials, host key, bucket, permissions)
          +-- StoreFull          no room for an object (HTTP 507)

Every class here is registered by name (``_BY_NAME``): an error that crosses a process or
HTTP boundary as ``to_dict()`` comes back as the same class (:meth:`BastionError.from_dict`),
so callers test ``except CorruptChunk``, never the message. Define new errors here.

Each error says what happened, to which file, and (``hint``) what to do next.
The exit codes follow BUTIL: 0 success, 1 partial, 2 failed, 3 usage.
"""

from __future__ import annotations

import enum
from typing import Any

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_FAILED = 2
EXIT_USAGE = 3


class Outcome(enum.StrEnum):
    """How an operation that did not raise went: library results carry this under "verdict"
    (a plain string in JSON), never an exit code; the CLI alone maps it to one
    (cli.base.exit_code_of: ok 0, partial 1, failed 2)."""

    OK = "ok"
    PARTIAL = "partial"      # done, but not all of it (some databases failing, not recorded...)
    FAILED = "failed"        # ran to the end and found it did not work (problems found, no takeover)


_BY_NAME: dict[str, type[BastionError]] = {}


class BastionError(Exception):
    exit_code = EXIT_FAILED
    http_status = 500

    def __init_subclass__(cls, **kw: Any) -> None:
        # every subclass, wherever defined (StoreFull, RepositoryError...), keeps its type and
        # HTTP status when it crosses a process boundary as a dict (backup reader -> daemon -> CLI)
        super().__init_subclass__(**kw)
        _BY_NAME.setdefault(cls.__name__, cls)

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "path": self.path,
            "exit_code": self.exit_code,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BastionError:
        """Rebuild an error the daemon sent, keeping its type when we know it."""
        kind = _BY_NAME.get(str(data.get("type")), BastionError)
        err = kind(str(data.get("message", "unknown error")), hint=data.get("hint"),
                   path=data.get("path"), details=data.get("details") or {})
        code = data.get("exit_code")
        if isinstance(code, int) and code != err.exit_code:
            err.exit_code = code
        return err

    def __str__(self) -> str:
        return self.message


class UsageError(BastionError):
    exit_code = EXIT_USAGE
    http_status = 400


class ConfigError(UsageError):
    pass


class UnknownTarget(UsageError):
    http_status = 404


class FileProblem(BastionError):
    http_status = 422


class StateConflict(BastionError):
    http_status = 409


class BusyError(BastionError):
    http_status = 503


class NotConsistent(BastionError):
    http_status = 409


class RecoveryRefused(BastionError):
    http_status = 409


class DaemonUnavailable(BastionError):
    http_status = 503


class ChildFailed(BastionError):
    """A child process doing raw file work (sqlite.child) died without an answer or ran out of
    time (then it was killed); ``details``: the task, its return code or the time limit."""


class AuthError(BastionError):
    http_status = 401


class PermissionDenied(BastionError):
    http_status = 403


class SQLFailure(BastionError):
    """details: sqlite_error (apsw's class name, e.g. ConstraintError), statement (its index)."""
    http_status = 400


class TransactionGone(BastionError):
    http_status = 410


class NotActive(BastionError):
    http_status = 503


class NotReplicated(BastionError):
    http_status = 504


class NoRepository(UsageError):
    """The URL holds no repository (yet)."""


class KeyRequired(UsageError):
    """The repository is encrypted and no passphrase or key file was supplied (nothing was written)."""


class WrongKey(UsageError):
    """No key slot opens with the passphrase or key file supplied (nothing was written)."""


class ResultTooLarge(UsageError):
    http_status = 413


class ReseedNeeded(StateConflict):
    """The copy can only follow from a new snapshot: the source changed in a way DDL cannot replay,
    or the replica was seeded from another primary."""


class ChangesMissing(StateConflict):
    """details: expected, got (positions): the batch starts after a gap in what the copy holds."""


class UnsafeName(BastionError):
    """A name from a repository that could write outside its directory or clobber another file."""
    http_status = 422


class RepositoryError(BastionError):
    pass


class CorruptChunk(RepositoryError):
    pass


class MissingChunk(RepositoryError):
    pass


class CorruptPack(CorruptChunk):
    """A format-2 pack's bytes do not decode to what its index says (damaged, truncated, or tampered)."""


class MissingPack(MissingChunk):
    """A pack an index or a format-2 backup needs is not in the repository."""


class DamagedIndex(RepositoryError):
    """A pack index that cannot be read, or whose values cannot be right for its pack."""


class DamagedManifest(RepositoryError):
    """details: backup, and problems: [{"file", "chunk", "problem"}] (every one found, not just the first)."""


class DamagedSegment(RepositoryError):
    """A WAL archive segment that cannot be read, fails its hash, or breaks the WAL checksum chain
    (``details["segment"]``: its object name)."""


class RestoreFailed(RepositoryError):
    """``details["file"]``: the backup's file (its name in the manifest) the restore stopped on,
    when one file was at fault; read it as :attr:`file` (it survives HTTP, not the message)."""

    @property
    def file(self) -> str | None:
        f = self.details.get("file")
        return f if isinstance(f, str) else None


class TamperedObject(RepositoryError):
    """An object of an encrypted repository fails authentication: edited, truncated, or moved
    from another name. The repository reports it as the object's own error (CorruptChunk...)."""


class StoreError(BastionError):
    """A storage operation failed (after retries, when it looked transient)."""


class ObjectMissing(StoreError):
    pass


class StoreUnreachable(StoreError):
    """Transient-looking trouble (connection, time-out) that outlasted every retry."""


class StoreRefused(StoreError):
    """A permanent refusal: credentials, host key, missing bucket, permissions. Retrying cannot help."""


class StoreFull(StoreError):
    """The repository's file system (or quota) has no room for an object."""
    http_status = 507


def registry() -> dict[str, type[BastionError]]:
    """Every error class by name (a copy): what from_dict can rebuild."""
    return dict(_BY_NAME)


def internal_error(exc: BaseException) -> BastionError:
    """An exception no code path expected, as the error the daemon answers with (the traceback
    goes to its log): one wording for the admin API and the SQL routes."""
    return BastionError(f"internal error in the daemon: {type(exc).__name__}: {exc}",
                        hint="see the daemon's log; please report this")


def from_os_error(exc: OSError, doing: str) -> BastionError:
    """An OSError that reached the edge (daemon route, CLI) in words: what was being done, on
    which path, and what to do. ``doing`` says the side, e.g. "reading the database file"."""
    import errno
    path = exc.filename if isinstance(exc.filename, str) else None
    where = f" {path}" if path else ""
    what = exc.strerror or str(exc)
    hints = {
        errno.ENOSPC: "free space on that file system (df -h), then retry",
        errno.EACCES: "give the daemon's user access to it (ls -l, chmod/chown), then retry",
        errno.EPERM: "the operation is not permitted there (immutable file, mount options): fix that, then retry",
        errno.EROFS: "the file system is mounted read-only: remount it read-write, or use another place",
        errno.EIO: "the disk reported an I/O error: check it (dmesg) before retrying",
        errno.ENOENT: "check that the path exists (and its directory): the config may name a moved file",
        errno.ENOTDIR: "a component of the path is a file, not a directory: check the path",
    }
    cls = FileProblem if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM) else BastionError
    err = cls(f"{doing}{where}: {what}", path=path, hint=hints.get(exc.errno or 0, "check the path and retry"),
              details={"errno": exc.errno})
    if exc.errno == errno.ENOSPC:
        err.http_status = 507
    elif cls is BastionError:
        err.http_status = 503 if exc.errno in (errno.EROFS, errno.EIO) else 500
    return err


_BY_NAME["BastionError"] = BastionError
