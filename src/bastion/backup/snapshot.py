"""Reading database files into the repository, in a child process.

The daemon holds SQLite locks on the files it protects, and closing any file
descriptor on a file drops every POSIX lock the process holds on it
(DESIGN.md, pitfalls). So the bytes are read here, in a process of their own,
while the daemon keeps the files in continuous operations: the main files do
not change while we read them, and we open them through SQLite only as
``immutable`` (main file alone, no locks) for the content digests. The process is
sqlite.child's, like every other piece of raw file work.

A format-2 repository is written page by page instead (pages.py): no chunks, no content
digests on this path.
"""

from __future__ import annotations

import hashlib
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import Callable

from ..errors import from_os_error
from ..sqlite import child
from . import pages
from .digest import file_digests
from .crypto import RepoKeys
from .repository import Repository
from .store import StoreFull

DEFAULT_CHUNK = 256 * 1024


class _Reading:
    """OSErrors from the database side, named as such (a full or read-only repository is the
    store's StoreError, never confused with a database file that cannot be read)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, OSError):
            raise from_os_error(exc, "reading the database file for the backup") from None


def _cleanup(repo: Repository) -> int:
    """Temporaries of earlier backups that failed or were killed; only those no live writer owns."""
    n = 0
    for name in repo.store.removable_temporaries():
        repo.store.delete(name)
        n += 1
    return n


def snapshot(repo_url: str, files: list[dict[str, str]], chunk_size: int = DEFAULT_CHUNK,
             jobs: int = 4, progress: Callable[[int, int], None] | None = None,
             database: str | None = None, keys: dict[str, str] | None = None) -> dict[str, Any]:
    # keys: an encrypted repository's, unlocked by the daemon (RepoKeys.to_wire), so the child
    # needs neither the config nor the secret
    repo = Repository.open(repo_url, create=True, keys=RepoKeys.from_wire(keys) if keys else None)
    removed = _cleanup(repo)
    total = 0
    for f in files:
        with _Reading(f["path"]):
            total += os.stat(f["path"]).st_size
    stored = {"bytes": 0}     # raw bytes of new chunks stored so far: for the disk-full message
    try:
        if repo.format == 2:     # page-level packs; `stored` only counts format-1 chunks
            res = pages.snapshot(repo, files, database, progress, total)
        else:
            res = _copy(repo, files, chunk_size, jobs, progress, total, stored)
    except StoreFull as exc:
        got = stored["bytes"]
        raise StoreFull(f"{exc.message}; this backup of {total} bytes had stored {got} bytes of new data when "
                        f"the device filled, so up to {max(total - got, 0)} more bytes (before compression) "
                        "are needed", hint=exc.hint, details={"bytes_stored": got, "bytes_total": total}) from None
    res["temporaries_removed"] = removed
    # the reader's peak memory, kept in the manifest for benchmarks and capacity planning (Linux: KiB)
    res.setdefault("extra", {})["reader_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return res


def _copy(repo: Repository, files: list[dict[str, str]], chunk_size: int, jobs: int,
          progress: Callable[[int, int], None] | None, total: int, stored: dict[str, int]) -> dict[str, Any]:
    done = 0
    known = repo.chunk_digests()
    t0 = time.monotonic()
    added_bytes = 0
    new_chunks: list[str] = []
    out_files: list[dict[str, Any]] = []
    # Content digests read the files through SQLite while the chunk loop reads them raw: a thread of
    # their own overlaps them (about 3 s per GB here) with hashing, compression and the store's fsyncs.
    with ThreadPoolExecutor(max_workers=1) as aux:
        tables = [aux.submit(file_digests, spec["path"], True) for spec in files]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # At most this many chunks held in memory waiting for a store thread, whatever the file size.
            window = threading.BoundedSemaphore(jobs * 4)
            pending: list[Any] = []

            counting = threading.Lock()

            def put(data: bytes, digest: str) -> tuple[str, int]:
                try:
                    out = repo.put_chunk(data, digest)
                    with counting:
                        stored["bytes"] += len(data)
                    return out
                finally:
                    window.release()
            for spec, digests in zip(files, tables):
                path = spec["path"]
                whole = hashlib.sha256()
                chunks: list[list[Any]] = []
                size = 0
                with _Reading(path):
                    fh = open(path, "rb")  # noqa: SIM115 - closed by the `with fh` below
                with fh:
                    with _Reading(path):
                        header = fh.read(100)
                        fh.seek(0)
                    page_size = int.from_bytes(header[16:18], "big") if len(header) >= 18 else 0
                    page_size = 65536 if page_size == 1 else page_size
                    while True:
                        with _Reading(path):
                            data = fh.read(chunk_size)
                        if not data:
                            break
                        size += len(data)
                        done += len(data)
                        if progress:
                            progress(done, total)
                        whole.update(data)
                        digest = repo.chunk_id(data)   # keyed in an encrypted repository
                        chunks.append([digest, len(data)])
                        if digest not in known:
                            known.add(digest)
                            new_chunks.append(digest)
                            window.acquire()
                            pending.append(pool.submit(put, data, digest))
                            if len(pending) > jobs * 8:   # collect finished ones: errors surface early
                                still = []
                                for fut in pending:
                                    if fut.done():
                                        added_bytes += fut.result()[1]
                                    else:
                                        still.append(fut)
                                pending = still
                out_files.append({"path": path, "name": spec["name"], "size": size, "page_size": page_size,
                                  "sha256": whole.hexdigest(), "chunks": chunks, "tables": digests})
            for fut in pending:
                added_bytes += fut.result()[1]
        for f in out_files:
            f["tables"] = f["tables"].result()
    return {"files": out_files, "stored_bytes_added": added_bytes, "chunks_new": len(new_chunks),
            "new_chunks": new_chunks,
            "chunks_total": sum(len(f["chunks"]) for f in out_files), "seconds": time.monotonic() - t0}


def _task(req: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
    """In the child (sqlite.child): one snapshot, progress reported to the daemon."""
    return snapshot(req["repo"], req["files"], int(req.get("chunk_size", DEFAULT_CHUNK)), int(req.get("jobs", 4)),
                    progress, req.get("database"), req.get("keys"))


def snapshot_in_child(repo_url: str, files: list[dict[str, str]], chunk_size: int = DEFAULT_CHUNK,
                      jobs: int = 4, progress: Callable[[int, int], None] | None = None,
                      database: str | None = None, keys: RepoKeys | None = None) -> dict[str, Any]:
    """``database``: the backup's label; a format-2 backup is incremental over that one's newest.
    The keys travel on the child's stdin pipe, never in its argv or environment."""
    return child.run(_task, {"repo": repo_url, "files": files, "chunk_size": chunk_size, "jobs": jobs,
                             "database": database, "keys": keys.to_wire() if keys else None},
                     what="the backup reader", progress=progress)
