"""Exclusive access to database files, proved with the locks SQLite itself uses.

Runs in a child process (``python -m bastion.sqlite.exclusive``) because it opens
the files with open(2): in the daemon that would drop the daemon's own SQLite
locks (DESIGN.md, pitfalls). A connection of any process holds a shared lock on
the SHARED range of the database file while it reads, and a shared lock on the
DMS byte of the -shm file while it is open in WAL mode. Taking write locks on
both (without waiting) proves no other process has the file open, and keeps it
so: a new connection cannot get its shared lock until we let go.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

from ..errors import BastionError, RecoveryRefused

PENDING = 0x40000000      # then RESERVED at +1 and the SHARED range of 510 bytes at +2
SHARED_SIZE = 510
SHM_LOCKS = 120           # the WAL locks (8 bytes) and the DMS byte at 128
SHM_LOCK_LEN = 9


def _try_lock(fd: int, start: int, length: int) -> int | None:
    """Take a write lock without waiting; return the pid of a holder if it is taken."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        return None
    except OSError:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        try:
            res = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
            return struct.unpack("hhqqi", res)[4] or -1
        except OSError:
            return -1


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def discard(files: list[tuple[str, dict[str, int]]]) -> dict[str, Any]:
    """Lock every file exclusively, check it is still as at startbu, move its WAL aside."""
    fds: list[int] = []
    try:
        refusal = _lock_all([path for path, _ in files], fds)
        if refusal:
            return refusal
        for path, stamp in files:
            if _stamp(os.stat(path)) != stamp:
                return {"ok": False, "path": path, "error": f"{path}: the main file changed since startbu",
                        "hint": "run `bastion recover NAME` without --discard-changes"}
        out: dict[str, Any] = {}
        suffix = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for path, _ in files:
            wal = path + "-wal"
            kept = None
            discarded = 0
            if os.path.exists(wal):
                discarded = os.path.getsize(wal)
                kept = f"{wal}.discarded-{suffix}"
                os.rename(wal, kept)   # kept for the operator, never deleted by us
            if os.path.exists(path + "-shm"):
                os.unlink(path + "-shm")  # SQLite rebuilds it; it must not describe the old WAL
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            out[path] = {"discarded_wal_bytes": discarded, "wal_kept_as": kept}
        return {"ok": True, "files": out}
    finally:
        for fd in fds:
            os.close(fd)


def _lock_all(paths: list[str], fds: list[int]) -> dict[str, Any] | None:
    """Lock every file as SQLite would for exclusive use; a refusal naming the holder, or None."""
    for path in paths:
        if not os.path.exists(path):
            continue
        fd = os.open(path, os.O_RDWR)
        fds.append(fd)
        pid = _try_lock(fd, PENDING, 2 + SHARED_SIZE)
        if pid is None and os.path.exists(path + "-shm"):
            sfd = os.open(path + "-shm", os.O_RDWR)
            fds.append(sfd)
            pid = _try_lock(sfd, SHM_LOCKS, SHM_LOCK_LEN)
        if pid is not None:
            who = f"process {pid}" if pid > 0 else "another process"
            return {"ok": False, "path": path, "error": f"{path}: open in {who}",
                    "hint": "stop the application (every process that opens the file), run the command again, "
                            "then start the application"}
    return None


def replace(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Put each staged file in place of a database file, keeping the old one (and its WAL) aside."""
    fds: list[int] = []
    try:
        refusal = _lock_all([target for _, target in pairs], fds)
        if refusal:
            return refusal
        suffix = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out: dict[str, Any] = {}
        for staged, target in pairs:
            aside = None
            if os.path.exists(target):
                aside = f"{target}.before-restore-{suffix}"
                os.rename(target, aside)
                if os.path.exists(target + "-wal"):
                    os.rename(target + "-wal", aside + "-wal")
            if os.path.exists(target + "-shm"):
                os.unlink(target + "-shm")
            os.rename(staged, target)
            dfd = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            out[target] = {"previous_kept_as": aside}
        return {"ok": True, "files": out}
    finally:
        for fd in fds:
            os.close(fd)


def _child(op: str, payload: Any) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bastion.sqlite.exclusive", op], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BastionError(f"{op} helper failed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    if not out["ok"]:
        raise RecoveryRefused(out["error"], path=out.get("path"), hint=out.get("hint"))
    return out


def replace_in_child(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return _child("replace", [[a, b] for a, b in pairs])


def discard_in_child(files: list[tuple[str, dict[str, int]]]) -> dict[str, Any]:
    return _child("discard", [[p, s] for p, s in files])


def _main() -> None:
    op = sys.argv[1] if len(sys.argv) == 2 else ""
    if op not in ("discard", "replace"):
        sys.exit("usage: python -m bastion.sqlite.exclusive discard|replace < request.json")
    items = [(a, b) for a, b in json.load(sys.stdin)]
    print(json.dumps(discard(items) if op == "discard" else replace(items)))


if __name__ == "__main__":
    _main()
