"""Seeding a backup: a copy of every file of a database at one instant.

The daemon puts the files in continuous operations (their main files stand still and
hold every committed change, capture's log included), and a child process copies the
main files into a staging directory: the daemon itself must never open(2) a file it
holds SQLite locks on (DESIGN.md, pitfalls). The capture position of each copy is
then read from the copy (opened immutable): that is where streaming resumes.

    python -m bastion.replication.seed < [[src, dst], ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any


from .. import capture
from ..fsutil import fsync_dir
from ..errors import BastionError, NotConsistent
from ..sqlite import connect


def copy_in_child(pairs: list[tuple[str, str]]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bastion.replication.seed"], input=json.dumps(pairs),
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BastionError(f"the seed copy process failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


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


def _main() -> None:
    for src, dst in json.load(sys.stdin):
        with open(src, "rb") as a, open(dst + ".part", "wb") as b:
            shutil.copyfileobj(a, b, 1 << 20)
            b.flush()
            os.fsync(b.fileno())
        os.rename(dst + ".part", dst)
        fsync_dir(os.path.dirname(dst))


if __name__ == "__main__":
    _main()
