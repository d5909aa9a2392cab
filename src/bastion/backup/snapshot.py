"""Reading database files into the repository, in a child process.

The daemon holds SQLite locks on the files it protects, and closing any file
descriptor on a file drops every POSIX lock the process holds on it
(DESIGN.md, pitfalls). So the bytes are read here, in a process of their own,
while the daemon keeps the files in continuous operations: the main files do
not change while we read them, and we open them through SQLite only as
``immutable`` (main file alone, no locks) for the content digests.

    python -m bastion.backup.snapshot < request.json > result.json
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import Callable

from ..errors import BastionError, from_os_error
from .digest import file_digests
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
             jobs: int = 4, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    repo = Repository.open(repo_url, create=True)
    removed = _cleanup(repo)
    total = 0
    for f in files:
        with _Reading(f["path"]):
            total += os.stat(f["path"]).st_size
    stored = {"bytes": 0}     # raw bytes of new chunks stored so far: for the disk-full message
    try:
        res = _copy(repo, files, chunk_size, jobs, progress, total, stored)
    except StoreFull as exc:
        got = stored["bytes"]
        raise StoreFull(f"{exc.message}; this backup of {total} bytes had stored {got} bytes of new data when "
                        f"the device filled, so up to {max(total - got, 0)} more bytes (before compression) "
                        "are needed", hint=exc.hint, details={"bytes_stored": got, "bytes_total": total}) from None
    res["temporaries_removed"] = removed
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
                        digest = hashlib.sha256(data).hexdigest()
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


def snapshot_in_child(repo_url: str, files: list[dict[str, str]], chunk_size: int = DEFAULT_CHUNK,
                      jobs: int = 4, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    request = json.dumps({"repo": repo_url, "files": files, "chunk_size": chunk_size, "jobs": jobs})
    proc = subprocess.Popen([sys.executable, "-m", "bastion.backup.snapshot"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout and proc.stderr
    proc.stdin.write(request)
    proc.stdin.close()
    other: list[str] = []

    def read_stderr() -> None:   # "progress DONE TOTAL" lines; anything else is kept for errors
        for line in proc.stderr:  # type: ignore[union-attr]  # asserted above, not carried into a closure
            parts = line.split()
            if len(parts) == 3 and parts[0] == "progress" and progress:
                progress(int(parts[1]), int(parts[2]))
            elif not line.startswith("progress "):
                other.append(line)
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join(5)
    if proc.returncode != 0:
        try:
            err = json.loads(stdout)["error"]
        except (ValueError, KeyError, TypeError):
            raise BastionError(f"the backup reader process failed (exit {proc.returncode}): "
                               f"{''.join(other).strip()[-2000:]}") from None
        raise BastionError.from_dict(err)
    return json.loads(stdout)


def _main() -> None:
    req = json.load(sys.stdin)
    last = [0.0]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 0.2 or done == total:
            last[0] = time.monotonic()
            print(f"progress {done} {total}", file=sys.stderr, flush=True)
    try:
        res = snapshot(req["repo"], req["files"], int(req.get("chunk_size", DEFAULT_CHUNK)),
                       int(req.get("jobs", 4)), report)
    except BastionError as exc:
        print(json.dumps({"error": exc.to_dict()}))
        sys.exit(2)
    except OSError as exc:      # not from a file read nor a store call: say it all the same
        print(json.dumps({"error": from_os_error(exc, "backup reader").to_dict()}))
        sys.exit(2)
    except Exception as exc:  # the daemon gets an error it can show, not a traceback
        print(json.dumps({"error": BastionError(f"the backup reader failed: {type(exc).__name__}: {exc}",
                                                hint="see the daemon's log; please report this").to_dict()}))
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    _main()
