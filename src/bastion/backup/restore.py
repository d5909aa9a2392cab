"""Restoring a backup into a directory: temp names, fsync, check, then rename.

Needs nothing but the repository: the manifest carries the file names, chunk
lists, sizes, hashes and content digests (disaster recovery on a fresh machine).
Never runs inside the daemon: it is a library call of the CLI (or a child).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypedDict
from collections.abc import Callable, Iterator

import apsw

from ..errors import BastionError, Outcome, RecoveryRefused, UsageError
from ..errors import RestoreFailed  # defined in errors.py
from ..sqlite.exclusive import replace_in_child
from . import names
from . import format2
from .digest import table_digests
from .manifest import Chunk, digests_of
from ..fsutil import fsync_dir  # noqa: F401  (its old home; kept for callers on other branches)
from .repository import Repository, RepositoryError
from ..sqlite import connect

TMP_SUFFIX = ".bastion-restore-tmp"


class FileCheck(TypedDict):
    """What the checks of one restored file found (before it had its final name)."""
    name: str
    integrity: str                # PRAGMA integrity_check: "ok"
    tables: int                   # tables whose content digests matched (0 for format 2)


class RestoredFile(FileCheck):
    path: str
    previous_kept_as: str | None  # --force over existing files: where the old ones were kept


class RestoreResult(TypedDict):
    """`bastion restore --to DIR`."""
    backup: str
    database: str
    instant: str
    to: str
    files: list[RestoredFile]
    bytes: int
    seconds: float
    verdict: Outcome


def _open_immutable(path: str) -> apsw.Connection:
    return connect.reader(path, immutable=True)


def _integrity(path: str) -> str:
    conn = _open_immutable(path)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _digests(path: str) -> dict[str, Any]:
    conn = _open_immutable(path)
    try:
        return table_digests(conn)
    finally:
        conn.close()


def check_file(path: str) -> tuple[str, dict[str, Any]]:
    """integrity_check and content digests of a restored main file (immutable: no WAL, no locks)."""
    return _integrity(path), _digests(path)


FETCH_THREADS = 3      # read + decompress + re-hash of chunks ahead of the writer (they release the GIL)
FETCH_AHEAD = 16       # chunks held in memory ahead of the writer, at most


def _fetch(repo: Repository, digest: str) -> bytes | RepositoryError:
    try:
        return repo.get_chunk(digest)
    except RepositoryError as exc:
        return exc


def _fetch_ahead(pool: ThreadPoolExecutor, repo: Repository,
                 chunks: tuple[Chunk, ...]) -> Iterator[tuple[Chunk, bytes | RepositoryError]]:
    """Each chunk with its bytes (or the error reading it), in order, fetched by the pool ahead of use."""
    queue: deque[Future] = deque()
    ahead = iter(chunks)
    for chunk in chunks:
        while len(queue) < FETCH_AHEAD:
            nxt = next(ahead, None)
            if nxt is None:
                break
            queue.append(pool.submit(_fetch, repo, nxt[0]))
        yield chunk, queue.popleft().result()


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _tmp_name(name: str) -> str:
    """A temp name nobody can guess ahead (a link planted there would be refused anyway: O_EXCL|O_NOFOLLOW)."""
    return f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def _make_dirs(dest: str) -> list[str]:
    """Create dest and missing parents, each 0700; return the ones created (deepest last)."""
    missing = []
    d = dest
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    created = []
    for d in reversed(missing):
        os.mkdir(d, 0o700)
        os.chmod(d, 0o700)      # whatever the umask
        created.append(d)
    return created


def _remove_dirs(created: list[str]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


def _space(exc: OSError, what: str, need: int, dest: str) -> BastionError | OSError:
    try:
        free = _free_bytes(dest)
    except OSError:
        free = 0
    return RestoreFailed(f"{what}: no space left on the device: the restore needs {need} bytes, {free} bytes are "
                         f"free on the filesystem of {dest}; nothing was restored",
                         path=what, hint="free space there, or restore into a directory on another filesystem "
                                         "(--to DIR)") if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc


def restore(repo: Repository, backup_id: str, dest: str, force: bool = False,
            progress: Callable[[int, int], None] | None = None,
            configured: dict[str, str] | None = None) -> RestoreResult:
    """Restore backup ``backup_id`` into directory ``dest``; only inside it, never over open files.

    ``configured`` maps the real paths of the local config's database files to their database
    names, so a refusal can say the files belong to a database the daemon protects."""
    names.backup_id(backup_id)
    m = repo.manifest(backup_id)     # every name and field checked: a repository is untrusted input
    files = m.files
    dest = os.path.abspath(dest)
    if os.path.islink(dest):
        raise UsageError(f"{dest} is a symbolic link; refused, nothing was restored",
                         hint="name the real directory (a link may have been planted to redirect the restore)")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(f"{dest} exists and is not a directory; nothing was restored")
    created = _make_dirs(dest)
    real = os.path.realpath(dest)
    try:
        dfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        _remove_dirs(created)
        raise
    targets = [os.path.join(real, f.name) for f in files]
    tmps: list[str] = []           # names inside dest
    fetch = ThreadPoolExecutor(max_workers=FETCH_THREADS)
    checks = ThreadPoolExecutor(max_workers=3)
    syncs: list[tuple[Future, int]] = []
    try:
        existing = []
        for t in targets:
            for p in (t, t + "-wal", t + "-shm", t + "-journal"):
                if os.path.islink(p):
                    raise UsageError(f"{p} is a symbolic link; refused, nothing was restored",
                                     hint="remove the link (it may have been planted to redirect the restore) "
                                          "and run the command again")
                if os.path.exists(p):
                    if not os.path.isfile(p):
                        raise UsageError(f"{p} exists and is not a regular file; refused, nothing was restored",
                                         hint="move it away, or restore into another directory")
                    existing.append(p)
            if os.path.realpath(t) != t:     # names are one component: this holds unless the tree moves under us
                raise UsageError(f"{t} does not resolve inside {real}; refused, nothing was restored")
        if existing and not force:
            raise UsageError(f"{existing[0]} already exists; nothing was restored",
                             hint="restore into an empty directory, or pass --force to replace the files (refused "
                                  "while any process has them open; the old files are kept aside)")
        total = sum(f.size for f in files)
        if total > _free_bytes(real):
            listed = ", ".join(f.name for f in files)
            raise RestoreFailed(f"{real}: not enough space to restore backup {backup_id} ({listed}): "
                                f"it needs {total} bytes, {_free_bytes(real)} bytes are free; nothing was restored",
                                path=real, hint="free space there, or restore into a directory on another "
                                                "filesystem (--to DIR)")
        done = 0
        t0 = time.monotonic()
        # Chunks are fetched, decompressed and re-hashed by threads ahead of the writer; once a file is
        # written, its fsync, integrity_check and content digests run side by side (and beside the writing
        # of the next file). Nothing gets a final name before every one of them has succeeded.
        pending = []
        for f, target in zip(files, targets):
            tmp = _tmp_name(f.name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
            except FileExistsError:
                raise RestoreFailed(f"{os.path.join(real, tmp)} already exists; refused, nothing was restored",
                                    hint="remove it (a leftover, or a link planted to redirect the restore)") from None
            tmps.append(tmp)
            whole = hashlib.sha256()
            try:
                os.fchmod(fd, 0o600)
                source = (format2.blocks(repo, f, fetch) if m.format == 2     # pages, each hash checked
                          else _fetch_ahead(fetch, repo, f.chunks))
                for (digest, size), data in source:
                    if isinstance(data, RepositoryError):
                        raise RestoreFailed(f"backup {backup_id}, file {f.name}: {data.message}; nothing was "
                                            "restored", hint="run `bastion verify --all` to see every damaged "
                                                             "backup; restore an older one",
                                            details={"file": f.name}) from None
                    if len(data) != size:
                        raise RestoreFailed(f"chunk {digest[:16]} of {f.name} has {len(data)} bytes, "
                                            f"the manifest says {size}", details={"file": f.name})
                    whole.update(data)
                    view = memoryview(data)
                    try:
                        while view:
                            view = view[os.write(fd, view):]
                    except OSError as exc:
                        raise _space(exc, target, total, real) from None
                    done += size
                    if progress:
                        progress(done, total)
            except BaseException:
                os.close(fd)
                raise
            synced = checks.submit(_fsync_close, fd)
            syncs.append((synced, fd))
            if f.sha256 is not None and whole.hexdigest() != f.sha256:
                synced.result()
                raise RestoreFailed(f"{f.name}: restored bytes do not match the manifest's SHA-256",
                                    details={"file": f.name})
            path = os.path.join(real, tmp)
            # format 2 has no table digests (kept off the backup's path): its pages' hashes were checked
            digests_fut = checks.submit(_digests, path) if f.tables is not None else None
            pending.append((f, target, synced, checks.submit(_integrity, path), digests_fut))
        results: list[FileCheck] = []
        for f, target, synced, integrity_fut, digests_fut in pending:
            try:
                synced.result()
            except OSError as exc:
                raise _space(exc, target, total, real) from None
            integrity = integrity_fut.result()
            digests = digests_of(digests_fut.result()) if digests_fut else {}
            if integrity != "ok":
                raise RestoreFailed(f"{f.name}: integrity_check failed on the restored file: {integrity[:500]}",
                                    details={"file": f.name})
            if f.tables is not None and digests != f.tables:
                bad = sorted(t for t in set(digests) | set(f.tables) if digests.get(t) != f.tables.get(t))
                raise RestoreFailed(f"{f.name}: content differs from the manifest in tables {', '.join(bad)}",
                                    details={"file": f.name})
            results.append({"name": f.name, "integrity": integrity, "tables": len(digests)})
        kept: dict[str, Any] = {}
        if created:
            # a directory this restore made: nobody else has files in it
            for tmp, f in zip(tmps, files):
                os.rename(tmp, f.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        else:
            # Proved exclusive with SQLite's own locks, held across the swap, old files and WAL kept aside;
            # in a child, which holds no SQLite connection here and finishes even if we are killed.
            try:
                swapped = replace_in_child([(os.path.join(real, tmp), t) for tmp, t in zip(tmps, targets)])
            except RecoveryRefused as exc:
                raise _refusal(exc, configured or {}, backup_id) from None
            kept = {t: swapped["files"][t]["previous_kept_as"] for t in targets}
        tmps = []
    except BaseException:
        # no thread may still write, sync or read a temp file when it is removed
        fetch.shutdown(wait=True, cancel_futures=True)
        checks.shutdown(wait=True, cancel_futures=True)
        for synced, fd in syncs:
            if synced.cancelled():   # never ran: its descriptor is still open
                os.close(fd)
        for tmp in tmps:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
        _remove_dirs(created)     # a failed restore leaves no directory it made
        raise
    finally:
        fetch.shutdown(wait=True, cancel_futures=True)
        checks.shutdown(wait=True, cancel_futures=True)
        os.close(dfd)
    secs = time.monotonic() - t0
    return {"backup": backup_id, "database": m.database, "instant": m.instant_text, "to": real,
            "files": [{"path": t, "previous_kept_as": kept.get(t), **c} for t, c in zip(targets, results)],
            "bytes": total, "seconds": round(secs, 3), "verdict": Outcome.OK}


def _refusal(exc: RecoveryRefused, configured: dict[str, str], backup_id: str) -> RecoveryRefused:
    """The lock probe's refusal, saying so when the file is a database of the local config."""
    db = configured.get(os.path.realpath(exc.path or ""))
    if not exc.details.get("pid"):     # not a holder (a link planted meanwhile): the helper's own words
        return RecoveryRefused(f"{exc.message}; nothing was restored", path=exc.path, hint=exc.hint)
    if db is None:
        return RecoveryRefused(f"{exc.message}; nothing was restored", path=exc.path, details=exc.details,
                               hint="stop the application (every process that opens the files) and run the "
                                    "restore again, or restore into another directory")
    return RecoveryRefused(f"{exc.message}; it is a file of database {db!r} in the config, which the Bastion "
                           "daemon protects; nothing was restored", path=exc.path, details=exc.details,
                           hint=f"to put the backup back in place of database {db!r}, stop the application and "
                                f"run `bastion restore {backup_id} --replace`; or restore into another directory")
