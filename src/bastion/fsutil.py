"""Durable file writes: write a temp name, fsync it, rename, fsync the directory (DESIGN.md).

Never use these on a database file inside the daemon (closing any descriptor of a file drops
this process's SQLite locks on it): they are for Bastion's own files (state records, leases,
chunks, manifests) and for child processes."""

from __future__ import annotations

import json
import os
from typing import Any


def fsync_dir(d: str) -> None:
    """Make renames and new names in ``d`` durable."""
    fd = os.open(d or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_json(path: str, data: Any, tmp: str | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON, all or nothing, durably (``tmp``: the temp name)."""
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
