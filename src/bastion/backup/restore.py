"""Restoring a backup into a directory: temp names, fsync, check, then rename.

Needs nothing but the repository: the manifest carries the file names, chunk
lists, sizes, hashes and content digests (disaster recovery on a fresh machine).
Never runs inside the daemon: it is a library call of the CLI (or a child).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable

import apsw

from ..errors import UsageError
from .digest import table_digests
from .repository import Repository, RepositoryError

TMP_SUFFIX = ".bastion-restore-tmp"


class RestoreFailed(RepositoryError):
    pass


def check_file(path: str) -> tuple[str, dict[str, Any]]:
    """integrity_check and content digests of a restored main file (immutable: no WAL, no locks)."""
    from urllib.parse import quote
    conn = apsw.Connection(f"file:{quote(path)}?mode=ro&immutable=1",
                           flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        integrity = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
        return integrity, table_digests(conn)
    finally:
        conn.close()


def _fsync_dir(d: str) -> None:
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
    try:
        for f, target in zip(m["files"], targets):
            tmp = target + TMP_SUFFIX
            tmps.append(tmp)
            whole = hashlib.sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for digest, size in f["chunks"]:
                    try:
                        data = repo.get_chunk(digest)
                    except RepositoryError as exc:
                        raise RestoreFailed(f"backup {backup_id}, file {f['name']}: {exc.message}; nothing was "
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
                os.fsync(fd)
            finally:
                os.close(fd)
            if whole.hexdigest() != f["sha256"]:
                raise RestoreFailed(f"{f['name']}: restored bytes do not match the manifest's SHA-256")
        checks = []
        for f, tmp in zip(m["files"], tmps):
            integrity, digests = check_file(tmp)
            if integrity != "ok":
                raise RestoreFailed(f"{f['name']}: integrity_check failed on the restored file: {integrity[:500]}")
            if digests != f["tables"]:
                bad = sorted(t for t in set(digests) | set(f["tables"]) if digests.get(t) != f["tables"].get(t))
                raise RestoreFailed(f"{f['name']}: content differs from the manifest in tables {', '.join(bad)}")
            checks.append({"name": f["name"], "integrity": integrity, "tables": len(digests)})
        for tmp, target in zip(tmps, targets):
            for stale in (target + "-wal", target + "-shm", target + "-journal"):
                # a WAL left beside a restored file would be replayed into it: never keep one
                if os.path.exists(stale):
                    os.remove(stale)
            os.replace(tmp, target)
        _fsync_dir(dest)
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    secs = time.monotonic() - t0
    return {"backup": backup_id, "database": m["database"], "instant": m["instant"], "to": dest,
            "files": [{"path": t, **c} for t, c in zip(targets, checks)], "bytes": total,
            "seconds": round(secs, 3), "exit_code": 0}
