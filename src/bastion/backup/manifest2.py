"""The structure of a format-2 manifest (repository.manifest_problems hands format-2 manifests here).

Its own module: the repository module uses it, and the format-2 engine uses the repository."""

from __future__ import annotations

import math
from typing import Any

from ..errors import UsageError
from ..position import Instant
from .names import UnsafeName, file_name, file_names


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def manifest_problems(m: dict[str, Any], backup_id: str) -> list[dict[str, Any]]:
    """repository.manifest_problems for a format-2 manifest: [] when it is sound."""
    out: list[dict[str, Any]] = []

    def bad(problem: str, file: str | None = None) -> None:
        out.append({"file": file, "chunk": None, "problem": problem})

    if m.get("id") != backup_id:
        bad(f"names itself {m.get('id')!r}, not {backup_id!r} as its object name says")
    if not isinstance(m.get("database"), str) or not m["database"].strip():
        bad(f"has no database name ({m.get('database')!r})")
    try:
        Instant.from_json(m)
        if not isinstance(m.get("instant"), str) or not math.isfinite(float(m.get("instant_epoch", "x"))):
            raise ValueError
    except (UsageError, ValueError, TypeError, KeyError):
        bad(f"has no valid instant ({m.get('instant')!r}, {m.get('instant_epoch')!r})")
    files = m.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, dict) for f in files):
        bad("has no file list (or an entry that is not an object)")
        return out
    try:
        for f in files:
            file_name(f.get("name"))
        file_names([f.get("name") for f in files])
    except UnsafeName as exc:
        bad(exc.message)
        return out
    logical = 0
    for f in files:
        name = f["name"]
        size, ps, pages = f.get("size"), f.get("page_size"), f.get("pages")
        if not _count(size) or not _count(pages) or not _count(ps):
            bad(f"file {name}: size, page_size or pages is not a count ({size!r}, {ps!r}, {pages!r})", name)
            continue
        logical += size
        if size and not (512 <= ps <= 65536 and ps & (ps - 1) == 0):
            bad(f"file {name}: page_size {ps!r} is not a SQLite page size (a power of two, 512 to 65536)", name)
        elif size and pages != -(-size // ps):
            bad(f"file {name}: {pages} pages cannot hold {size} bytes of {ps}-byte pages", name)
        elif not size and pages:
            bad(f"file {name}: an empty file with {pages} pages", name)
        if (f.get("map") is None) != (pages == 0) or (pages and not _hex64(f.get("map"))):
            bad(f"file {name}: page map {f.get('map')!r} is not a 64-hex BLAKE3 (or null for no pages)", name)
        if not isinstance(f.get("path"), str) or not f["path"].startswith("/") or "\x00" in f["path"]:
            bad(f"file {name}: source path {f.get('path')!r} is not an absolute path", name)
    if m.get("logical_bytes") != logical:
        bad(f"logical_bytes {m.get('logical_bytes')!r} differs from the sum of its file sizes ({logical})")
    if m.get("parent") is not None and not isinstance(m.get("parent"), str):
        bad(f"parent {m.get('parent')!r} is not a backup id")
    return out
