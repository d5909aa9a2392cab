"""A backup's manifest: what it holds, as a checked value.

The manifest is ``manifests/<backup id>.json`` in the repository: the backup's database
name and instant, and per file its name, source path, size, page size, SHA-256, chunk
list and per-table content digests. The repository is untrusted input (anyone who can
write to the bucket or the directory can edit it), so :meth:`Manifest.from_json` is the
one way in: it runs every structural check (:func:`problems`) and raises
``DamagedManifest`` naming each problem, never a KeyError or TypeError further on. Past
it, every field has the type it says.

:meth:`Manifest.to_json` gives back the dict Bastion writes, key for key and in the same
order, so the JSON on disk is the same as before the manifest had a type: a repository
written by an older Bastion reads back the same, and an older Bastion reads a new one.
Keys that are informational only (``sqlite_version``, ``read_seconds``) or unknown are
kept verbatim in ``extra`` and written back where they were; unknown keys inside a file
entry or a table digest are not (no Bastion writes any).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import DamagedManifest, UsageError
from ..position import Instant
from .manifest2 import manifest_problems as format2_problems
from .names import UnsafeName, file_name, file_names

FORMAT = 1   # the format a new repository gets unless the config asks for another
FORMATS = (1, 2)   # what this Bastion reads and writes; 2: page-level packs (format2.py, manifest2.py)

HEX64 = re.compile(r"[0-9a-f]{64}")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")

# The order Bastion writes the keys in; to_json keeps it (unknown keys follow, as read).
_KEYS = ("format", "id", "database", "instant", "instant_epoch", "sqlite_version", "files", "logical_bytes",
         "stored_bytes_added", "chunks_total", "chunks_new", "read_seconds")
_TYPED = frozenset(_KEYS) - {"sqlite_version", "read_seconds"}


class Chunk(NamedTuple):
    """One chunk of a file, in order: its SHA-256 (the object's name) and its raw size."""
    digest: str
    size: int


@dataclass(frozen=True)
class TableDigest:
    """A table's row count and the SHA-256 of its rows in key order (backup.digest)."""
    rows: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "sha256": self.sha256}


def digests_of(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, TableDigest]:
    """Typed per-table digests from backup.digest's dicts (or a manifest's, once checked)."""
    return {t: TableDigest(d["rows"], d["sha256"]) for t, d in tables.items()}


@dataclass(frozen=True)
class ManifestFile:
    """One database file of a backup. Format 1 describes it by chunks, a whole-file SHA-256 and
    per-table digests; format 2 by its page count and the BLAKE3 of its page map (the rest is None/empty)."""
    path: str          # where it was: restore --replace puts it back there (never trusted for that alone)
    name: str          # its name inside the backup (a checked single component, unique)
    size: int
    page_size: int     # 0 for an empty file
    sha256: str | None = None                       # format 1
    chunks: tuple[Chunk, ...] = ()                  # format 1
    tables: Mapping[str, TableDigest] | None = None  # format 1 (format 2 keeps digests off the backup's path)
    pages: int | None = None                        # format 2
    map: str | None = None                          # format 2: None for a file of no pages

    def to_json(self) -> dict[str, Any]:
        head = {"path": self.path, "name": self.name, "size": self.size, "page_size": self.page_size}
        if self.pages is not None:
            return {**head, "pages": self.pages, "map": self.map}
        return {**head, "sha256": self.sha256, "chunks": [[c.digest, c.size] for c in self.chunks],
                "tables": {t: d.to_json() for t, d in (self.tables or {}).items()}}

    @classmethod
    def _of(cls, f: Mapping[str, Any], format: int) -> ManifestFile:   # only after problems() found nothing
        if format == 2:
            return cls(f["path"], f["name"], f["size"], f["page_size"], pages=f["pages"], map=f["map"])
        return cls(f["path"], f["name"], f["size"], f["page_size"], f["sha256"],
                   tuple(Chunk(d, n) for d, n in f["chunks"]), digests_of(f["tables"]))


@dataclass(frozen=True)
class Manifest:
    """A backup's manifest, structurally sound. Build it with from_json (it checks), write it with to_json."""
    format: int
    id: str
    database: str
    instant: Instant
    instant_text: str    # the instant as the manifest writes it (listings show this text)
    files: tuple[ManifestFile, ...]
    logical_bytes: int
    stored_bytes_added: int | None = None    # None: not in the manifest (all three are optional)
    chunks_total: int | None = None
    chunks_new: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)   # sqlite_version, read_seconds, unknown keys

    def digests(self) -> set[str]:
        """Every chunk this backup references."""
        return {c.digest for f in self.files for c in f.chunks}

    def to_json(self) -> dict[str, Any]:
        """The dict Bastion writes for this manifest, key order included."""
        known: dict[str, Any] = {
            "format": self.format, "id": self.id, "database": self.database, "instant": self.instant_text,
            "instant_epoch": self.instant.epoch, "files": [f.to_json() for f in self.files],
            "logical_bytes": self.logical_bytes, "stored_bytes_added": self.stored_bytes_added,
            "chunks_total": self.chunks_total, "chunks_new": self.chunks_new}
        known.update(self.extra)
        out = {k: known[k] for k in _KEYS if k in known and not (k in _TYPED and known[k] is None)}
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    @classmethod
    def from_json(cls, obj: Any, backup_id: str, where: str | None = None) -> Manifest:
        """The manifest of ``backup_id`` (its object's name) from its decoded JSON, or DamagedManifest
        naming every problem :func:`problems` finds; ``where`` (the repository) goes into the message."""
        found = problems(obj, backup_id)
        if found:
            raise damaged(backup_id, found, where)
        return cls(obj["format"], obj["id"], obj["database"], Instant.from_json(obj), obj["instant"],
                   tuple(ManifestFile._of(f, obj["format"]) for f in obj["files"]), obj["logical_bytes"],
                   obj.get("stored_bytes_added"), obj.get("chunks_total"), obj.get("chunks_new"),
                   {k: v for k, v in obj.items() if k not in _TYPED})

    @classmethod
    def from_bytes(cls, raw: bytes, backup_id: str, where: str | None = None) -> Manifest:
        """From the manifest object's bytes: JSON that does not parse is damage too."""
        try:
            obj = json.loads(raw)
        except ValueError:
            raise damaged(backup_id, [{"file": None, "chunk": None,
                                       "problem": "is not valid JSON (truncated or overwritten)"}], where) from None
        return cls.from_json(obj, backup_id, where)


def damaged(backup_id: str, found: list[dict[str, Any]], where: str | None = None) -> DamagedManifest:
    first = found[0]["problem"]
    more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
    place = f" in {where}" if where else ""
    return DamagedManifest(f"the manifest of backup {backup_id}{place} is damaged: {first}{more}",
                           details={"backup": backup_id, "problems": found},
                           hint="run `bastion verify` on it to see every problem; restore another backup")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def problems(m: Any, backup_id: str) -> list[dict[str, Any]]:
    """Everything structurally wrong with manifest ``m`` of ``backup_id``: [] when it is sound.

    The one place that decides whether a manifest can be used; Manifest.from_json (hence
    verify, list, prune and restore) refuses any manifest this finds fault with. What it cannot
    see without the data (a wrong SHA-256 or table digest, chunks in the wrong order) is
    left to full verify and restore, which recompute them."""
    out: list[dict[str, Any]] = []

    def bad(problem: str, file: str | None = None, chunk: str | None = None) -> None:
        out.append({"file": file, "chunk": chunk, "problem": problem})

    if not isinstance(m, dict):
        bad(f"is a JSON {type(m).__name__}, not an object")
        return out
    if m.get("format") == 2 and _int(m.get("format")):
        return format2_problems(m, backup_id)
    if m.get("format") != FORMAT or not _int(m.get("format")):
        bad(f"has format {m.get('format')!r}; this Bastion writes and reads formats "
            f"{' and '.join(map(str, FORMATS))}")
    if m.get("id") != backup_id:
        bad(f"names itself {m.get('id')!r}, not {backup_id!r} as its object name says")
    if not isinstance(m.get("database"), str) or not m["database"].strip():
        bad(f"has no database name ({m.get('database')!r})")
    text_ok = isinstance(m.get("instant"), str) and ISO.fullmatch(m["instant"]) is not None
    if not text_ok:
        bad(f"has no valid instant ({m.get('instant')!r})")
    epoch = m.get("instant_epoch")
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch) or epoch <= 0:
        bad(f"has no valid instant_epoch ({epoch!r})")
    elif text_ok:
        try:   # both well formed: they must name the same moment (list sorts by one, prune by the other)
            Instant.from_json(m)
        except UsageError as exc:
            bad(exc.message)
    files = m.get("files")
    if not isinstance(files, list) or not files:
        bad("has no files (an empty or missing file list restores nothing)" if not files
            else f"has a file list that is a {type(files).__name__}")
        return out
    if not all(isinstance(f, dict) for f in files):
        bad("has a file entry that is not an object")
        return out
    names = [f.get("name") for f in files]
    unsafe = False
    for n in names:
        try:
            file_name(n)
        except UnsafeName as exc:
            unsafe = True
            bad(exc.message, n if isinstance(n, str) else None)
    if not unsafe:
        try:
            file_names(names)
        except UnsafeName as exc:   # the same name twice (or twice but for letter case)
            folded = [n.casefold() for n in names]
            bad(exc.message, next(n for n in names if folded.count(n.casefold()) > 1))
    logical = 0
    chunks_total = 0
    for f in files:
        name = f.get("name") if isinstance(f.get("name"), str) else repr(f.get("name"))
        size = f.get("size")
        if not _int(size) or size < 0:
            bad(f"file {name}: size {size!r} is not a byte count", name)
            size = None
        chunks = f.get("chunks")
        if not isinstance(chunks, list):
            bad(f"file {name}: chunk list is a {type(chunks).__name__}, not a list", name)
            chunks = []
        total: int | None = 0      # None: a chunk entry is not a [hash, size]
        for i, c in enumerate(chunks):
            if (not isinstance(c, list) or len(c) != 2 or not isinstance(c[0], str) or not HEX64.fullmatch(c[0])
                    or not _int(c[1]) or c[1] <= 0):
                bad(f"file {name}: chunk entry #{i} {json.dumps(c)[:100]} is not [64-hex SHA-256, positive size]",
                    name, c[0] if isinstance(c, list) and c and isinstance(c[0], str) else None)
                total = None
                break
            total += c[1]
        chunks_total += len(chunks)
        if size is not None and total is not None and total != size:
            bad(f"file {name}: size {size} differs from the sum of its chunk sizes ({total})", name)
        if size is not None:
            logical += size
        if not isinstance(f.get("sha256"), str) or not HEX64.fullmatch(f["sha256"]):
            bad(f"file {name}: sha256 {f.get('sha256')!r} is not a 64-hex SHA-256", name)
        ps = f.get("page_size")
        empty = size == 0
        if not _int(ps) or not ((ps == 0 and empty) or (512 <= ps <= 65536 and ps & (ps - 1) == 0)):
            bad(f"file {name}: page_size {ps!r} is not a SQLite page size (a power of two, 512 to 65536)", name)
        elif size and size % ps:
            bad(f"file {name}: size {size} is not a whole number of {ps}-byte pages", name)
        tables = f.get("tables")
        if not isinstance(tables, dict):
            bad(f"file {name}: table digests are missing ({type(tables).__name__})", name)
        else:
            for t, d in tables.items():
                if (not isinstance(d, dict) or not _int(d.get("rows")) or d["rows"] < 0
                        or not isinstance(d.get("sha256"), str) or not HEX64.fullmatch(d["sha256"])):
                    bad(f"file {name}: digest of table {t!r} is malformed ({json.dumps(d)[:100]})", name)
        if not isinstance(f.get("path"), str) or not f["path"].startswith("/") or "\x00" in f["path"]:
            # restore --replace puts the file back there
            bad(f"file {name}: source path {f.get('path')!r} is not an absolute path", name)
    if not _int(m.get("logical_bytes")) or m["logical_bytes"] != logical:
        bad(f"logical_bytes {m.get('logical_bytes')!r} differs from the sum of its file sizes ({logical})")
    if "chunks_total" in m and m["chunks_total"] != chunks_total:
        bad(f"chunks_total {m['chunks_total']!r} differs from the number of chunks listed ({chunks_total})")
    elif "chunks_total" in m and not _int(m["chunks_total"]):    # 3.0 or true: equal, but not what the type says
        bad(f"chunks_total {m['chunks_total']!r} is not a count")
    for key in ("stored_bytes_added", "chunks_new"):
        if key in m and (not _int(m[key]) or m[key] < 0):
            bad(f"{key} {m[key]!r} is not a count")
    return out
