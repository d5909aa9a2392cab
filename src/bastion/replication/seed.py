"""Seeding a backup: a copy of every file of a database at one instant.

The daemon puts the files in continuous operations (their main files stand still and
hold every committed change, capture's log included), and a child process copies the
main files into a staging directory: the daemon itself must never open(2) a file it
holds SQLite locks on (DESIGN.md, pitfalls); it runs through sqlite.child. The capture
position of each copy is then read from the copy (opened immutable): that is where
streaming resumes.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from .. import capture
from ..errors import NotConsistent
from ..fsutil import fsync_dir
from ..sqlite import child, connect


def _copy(pairs: list[list[str]], progress: Any) -> None:
    """In the child: each main file to ``dst`` (a temp name, fsync, rename, fsync of the directory)."""
    for src, dst in pairs:
        with open(src, "rb") as a, open(dst + ".part", "wb") as b:
            shutil.copyfileobj(a, b, 1 << 20)
            b.flush()
            os.fsync(b.fileno())
        os.rename(dst + ".part", dst)
        fsync_dir(os.path.dirname(dst))


def copy_in_child(pairs: list[tuple[str, str]]) -> None:
    child.run(_copy, [[a, b] for a, b in pairs], what="the seed copy", timeout=3600)


def staged_position(path: str) -> capture.Position:
    """Capture position held by a staged copy (immutable: no -wal/-shm, no locks)."""
    con = connect.reader(path, immutable=True)
    try:
        return capture.position(con)
    finally:
        con.close()


def take(contops: Any, files: list[Any], staging: str) -> list[dict[str, Any]]:
    """Copy ``files`` (DatabaseFile) at one instant into ``staging``; returns [{staged, position}]."""
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    pairs = [(f.path, os.path.join(staging, f"{i}.db")) for i, f in enumerate(files)]
    contops.start(files)
    try:
        copy_in_child(pairs)
    finally:
        end = contops.end(files)
    if not end["consistent"]:
        raise NotConsistent("seed copy abandoned: continuous operations was interrupted during the copy",
                            hint="it is retried on its own")
    out = []
    for _, dst in pairs:
        out.append({"staged": dst, "position": staged_position(dst)})
    return out

