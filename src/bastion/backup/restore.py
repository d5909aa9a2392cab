"""Restoring a backup into a directory: temp names, fsync, check, then rename.

Needs nothing but the repository: the manifest carries the file names, chunk
lists, sizes, hashes and content digests (disaster recovery on a fresh machine).
Never runs inside the daemon: it is a library call of the CLI (or a child).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import apsw

from ..errors import UsageError
from .digest import table_digests
from .repository import Repository, RepositoryError

TMP_SUFFIX = ".bastion-restore-tmp"


class RestoreFailed(RepositoryError):
    pass


def _open_immutable(path: str) -> apsw.Connection:
    from urllib.parse import quote
    return apsw.Connection(f"file:{quote(path)}?mode=ro&immutable=1",
                           flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


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
                 chunks: list[list[Any]]) -> Iterator[tuple[list[Any], bytes | RepositoryError]]:
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


def fsync_dir(d: str) -> None:
    """Make renames and new names in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(repo: Repository, backup_id: str, dest: str, force: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    m = repo.manifest(backup_id)
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    targets = [os.path.join(dest, f["name"]) for f in m["files"]]
    if not force:
        for t in targets:
            for p in (t, t + "-wal", t + "-shm", t + "-journal"):
                if os.path.exists(p):
                    raise UsageError(f"{p} already exists; nothing was restored",
                                     hint="restore into an empty directory, or pass --force to overwrite")
    total = sum(f["size"] for f in m["files"])
    done = 0
    t0 = time.monotonic()
    tmps: list[str] = []
    # Chunks are fetched, decompressed and re-hashed by threads ahead of the writer; once a file is
    # written, its fsync, integrity_check and content digests run side by side (and beside the writing
    # of the next file). Nothing is renamed into place before every one of them has succeeded.
    fetch = ThreadPoolExecutor(max_workers=FETCH_THREADS)
    checks = ThreadPoolExecutor(max_workers=3)
    syncs: list[tuple[Future, int]] = []
    try:
        pending = []
        for f, target in zip(m["files"], targets):
            tmp = target + TMP_SUFFIX
            tmps.append(tmp)
            whole = hashlib.sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for (digest, size), data in _fetch_ahead(fetch, repo, f["chunks"]):
                    if isinstance(data, RepositoryError):
                        raise RestoreFailed(f"backup {backup_id}, file {f['name']}: {data.message}; nothing was "
                                            "restored", hint="run `bastion verify --all` to see every damaged "
                                                             "backup; restore an older one") from None
                    if len(data) != size:
                        raise RestoreFailed(f"chunk {digest[:16]} of {f['name']} has {len(data)} bytes, "
                                            f"the manifest says {size}")
                    whole.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    done += size
                    if progress:
                        progress(done, total)
            except BaseException:
                os.close(fd)
                raise
            synced = checks.submit(_fsync_close, fd)
            syncs.append((synced, fd))
            if whole.hexdigest() != f["sha256"]:
                synced.result()
                raise RestoreFailed(f"{f['name']}: restored bytes do not match the manifest's SHA-256")
            pending.append((f, synced, checks.submit(_integrity, tmp), checks.submit(_digests, tmp)))
        results = []
        for f, synced, integrity_fut, digests_fut in pending:
            synced.result()
            integrity, digests = integrity_fut.result(), digests_fut.result()
            if integrity != "ok":
                raise RestoreFailed(f"{f['name']}: integrity_check failed on the restored file: {integrity[:500]}")
            if digests != f["tables"]:
                bad = sorted(t for t in set(digests) | set(f["tables"]) if digests.get(t) != f["tables"].get(t))
                raise RestoreFailed(f"{f['name']}: content differs from the manifest in tables {', '.join(bad)}")
            results.append({"name": f["name"], "integrity": integrity, "tables": len(digests)})
        for tmp, target in zip(tmps, targets):
            for stale in (target + "-wal", target + "-shm", target + "-journal"):
                # a WAL left beside a restored file would be replayed into it: never keep one
                if os.path.exists(stale):
                    os.remove(stale)
            os.replace(tmp, target)
        fsync_dir(dest)
    except BaseException:
        # no thread may still write, sync or read a temp file when it is removed
        fetch.shutdown(wait=True, cancel_futures=True)
        checks.shutdown(wait=True, cancel_futures=True)
        for synced, fd in syncs:
            if synced.cancelled():   # never ran: its descriptor is still open
                os.close(fd)
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    finally:
        fetch.shutdown(wait=True, cancel_futures=True)
        checks.shutdown(wait=True, cancel_futures=True)
    secs = time.monotonic() - t0
    return {"backup": backup_id, "database": m["database"], "instant": m["instant"], "to": dest,
            "files": [{"path": t, **c} for t, c in zip(targets, results)], "bytes": total,
            "seconds": round(secs, 3), "exit_code": 0}
