"""Exclusive access to database files, proved with the locks SQLite itself uses.

Runs in a child process (sqlite.child, through ``*_in_child``) because it opens
the files with open(2): in the daemon that would drop the daemon's own SQLite
locks (DESIGN.md, pitfalls). A connection of any process holds a shared lock on
the SHARED range of the database file while it reads, and a shared lock on the
DMS byte of the -shm file while it is open in WAL mode. Taking write locks on
both (without waiting) proves no other process has the file open, and keeps it
so: a new connection cannot get its shared lock until we let go.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from typing import Any

from ..errors import RecoveryRefused
from ..fsutil import fsync_dir
from . import child

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


def _holder(pid: int) -> str:
    """'process PID (its command line)', for the operator to find it."""
    if pid <= 0:
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    return f"process {pid}" + (f" ({cmd[:200]})" if cmd else "")


def _lock_all(paths: list[str], fds: list[int]) -> dict[str, Any] | None:
    """Lock every file as SQLite would for exclusive use; a refusal naming the holder, or None."""
    for path in paths:
        if not os.path.exists(path):
            continue
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        fds.append(fd)
        pid = _try_lock(fd, PENDING, 2 + SHARED_SIZE)
        if pid is None and os.path.exists(path + "-shm"):
            sfd = os.open(path + "-shm", os.O_RDWR | os.O_NOFOLLOW)
            fds.append(sfd)
            pid = _try_lock(sfd, SHM_LOCKS, SHM_LOCK_LEN)
        if pid is not None:
            return {"ok": False, "path": path, "pid": pid, "error": f"{path}: open in {_holder(pid)}",
                    "hint": "stop the application (every process that opens the file), run the command again, "
                            "then start the application"}
    return None


COMPANIONS = ("-wal", "-shm", "-journal")


def _aside_name(target: str, suffix: str) -> str:
    base = f"{target}.before-restore-{suffix}"
    name, n = base, 1
    while any(os.path.lexists(name + c) for c in ("",) + COMPANIONS):
        n += 1
        name = f"{base}.{n}"
    return name


def replace(pairs: list[tuple[str, str]], keep_mode: bool = False) -> dict[str, Any]:
    """Put each staged file in place of a database file, keeping the old one (and its WAL) aside.

    Exclusive access is proved on every target first and held until the last rename; the
    staged files are locked the same way before they get their final names, so no application
    sees the group half swapped. Per file: the old main file gets a second name (a hard link),
    its -wal and -journal are renamed beside it (a WAL is never deleted: it belongs to the old
    file and must never be replayed into the restored one), -shm goes (SQLite rebuilds it), and
    the restored file replaces the final name in one rename. A kill at any instant leaves under
    the final name the old file complete or the restored one; the old one is always kept."""
    fds: list[int] = []
    try:
        for staged, target in pairs:
            for p in (target,) + tuple(target + c for c in COMPANIONS):
                if os.path.islink(p):
                    return {"ok": False, "path": p, "error": f"{p} is a symbolic link; refused, nothing was changed",
                            "hint": "remove the link (it may have been planted to redirect the restore), "
                                    "then run the command again"}
            if os.path.realpath(os.path.dirname(staged)) != os.path.realpath(os.path.dirname(target)):
                return {"ok": False, "path": staged, "error": f"{staged} is not in the directory of {target}",
                        "hint": "internal error: nothing was changed"}
        refusal = _lock_all([target for _, target in pairs], fds)
        if refusal:
            return refusal
        for staged, _ in pairs:
            sfd = os.open(staged, os.O_RDWR | os.O_NOFOLLOW)
            fds.append(sfd)
            fcntl.lockf(sfd, fcntl.LOCK_EX | fcntl.LOCK_NB, 2 + SHARED_SIZE, PENDING, os.SEEK_SET)
        suffix = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out: dict[str, Any] = {}
        for staged, target in pairs:
            aside = _aside_name(target, suffix)
            kept = None
            old = os.stat(target) if os.path.exists(target) else None
            if old is not None:
                try:
                    os.link(target, aside)
                except OSError:           # no hard links here: a rename (the final name is absent until below)
                    os.rename(target, aside)
                kept = aside
            for c in ("-wal", "-journal"):
                if os.path.exists(target + c):
                    os.rename(target + c, aside + c)
                    kept = kept or aside + c
            if os.path.exists(target + "-shm"):
                os.unlink(target + "-shm")
            if keep_mode and old is not None:   # the application's own owner and mode, as before
                os.chmod(staged, stat.S_IMODE(old.st_mode))
                if os.geteuid() == 0:
                    os.chown(staged, old.st_uid, old.st_gid)
            os.replace(staged, target)
            fsync_dir(os.path.dirname(target))
            out[target] = {"previous_kept_as": kept}
        return {"ok": True, "files": out}
    finally:
        for fd in fds:
            os.close(fd)


def _granted(out: dict[str, Any]) -> dict[str, Any]:
    """In the child: a refusal (another process has a file open) as the RecoveryRefused the caller gets."""
    if not out["ok"]:
        raise RecoveryRefused(out["error"], path=out.get("path"), hint=out.get("hint"),
                              details={"pid": out["pid"]} if out.get("pid") else None)
    return out


def _replace_task(req: dict[str, Any], progress: Any) -> dict[str, Any]:
    return _granted(replace([(a, b) for a, b in req["pairs"]], bool(req.get("keep_mode"))))


def _discard_task(req: list[list[Any]], progress: Any) -> dict[str, Any]:
    return _granted(discard([(a, b) for a, b in req]))


# In a session of its own (detach) and with no time limit: once it has proved exclusive access
# the child finishes its renames even if the restore that started it is killed (kill -9 included).

def replace_in_child(pairs: list[tuple[str, str]], keep_mode: bool = False) -> dict[str, Any]:
    return child.run(_replace_task, {"pairs": [[a, b] for a, b in pairs], "keep_mode": keep_mode},
                     what="the exclusive-access helper (replace)", detach=True)


def discard_in_child(files: list[tuple[str, dict[str, int]]]) -> dict[str, Any]:
    return child.run(_discard_task, [[p, s] for p, s in files], what="the exclusive-access helper (discard)",
                     detach=True)
