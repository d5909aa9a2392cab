"""Names that come out of a repository: backup ids and file names, checked before use.

A repository is untrusted input: anyone who can write to the bucket, the SFTP
account or the shared directory can edit a manifest. Restore and verify join
these names onto local directories, so a name is accepted only in the shape
Bastion itself writes: one path component, printable, never ``.``/``..``, never
a name SQLite gives to a file's companions (``-wal``, ``-shm``, ``-journal``),
never one of Bastion's own temporary suffixes.
"""

from __future__ import annotations

import re

from ..errors import UnsafeName  # defined in errors.py

# What backups.py generates: 20261203T141507Z-1a2b3c. Older or hand-made ids may differ, so the
# rule is the safe alphabet, not the exact shape.
_BACKUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_COMPANIONS = ("-wal", "-shm", "-journal")
_OURS = (".bastion-restore-tmp", ".bastion-staged", ".tmp-")
MAX_NAME = 255


def backup_id(value: object) -> str:
    """``value`` if it is a safe backup id, else UnsafeName."""
    if not isinstance(value, str) or not _BACKUP_ID.fullmatch(value) or ".." in value:
        raise UnsafeName(f"backup id {value!r} is not a valid backup id (letters, digits, '_', '.', '-'; "
                         "at most 100 characters)",
                         hint="list backups with `bastion backups list`; a repository holding such an id "
                              "was edited by hand or damaged")
    return value


def file_name(value: object) -> str:
    """``value`` if it is a safe name for a restored file (one component, no companions), else UnsafeName."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "is empty or not text"
    elif value in (".", ".."):
        problem = "is a directory reference"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "contains a control character (or NUL)"
    elif len(value.encode("utf-8", "surrogatepass")) > MAX_NAME:
        problem = f"is longer than {MAX_NAME} bytes"
    elif value.endswith(_COMPANIONS):
        problem = "ends like a WAL, shared-memory or journal file"
    elif any(mark in value for mark in _OURS):
        problem = "contains one of Bastion's temporary-file marks"
    if problem:
        raise UnsafeName(f"file name {value!r} in a manifest {problem}; refused",
                         hint="the manifest was edited or damaged: run `bastion verify` on the backup, "
                              "and restore another one")
    assert isinstance(value, str)     # no problem found: it is text
    return value


def file_names(values: list[object]) -> list[str]:
    """Every name safe, and no two the same (nor the same but for letter case, for case-folding disks)."""
    out = [file_name(v) for v in values]
    seen: set[str] = set()
    for name in out:
        if name.casefold() in seen:
            raise UnsafeName(f"file name {name!r} appears twice in a manifest; refused",
                             hint="the manifest was edited or damaged: restore another backup")
        seen.add(name.casefold())
    return out
