"""WAL archive segments: immutable objects holding committed WAL frames, and their names.

A segment holds whole transactions of one WAL *epoch* (one WAL header: checkpoint sequence and
salts; SQLite starts a new epoch each time it restarts the WAL), frames ``start..end`` (1-based
WAL frame numbers), verbatim: the 24-byte frame headers keep SQLite's cumulative checksums, so
restore can have SQLite itself check the chain (see pitr.py). Object layout::

    b"BASTSEG1" | SHA-256 of the payload (32 bytes) | zstd(payload)
    payload = JSON header line + b"\\n" + WAL header (32 bytes) + frames

Names sort by position and say what they hold, so a listing alone gives the timeline::

    archive/<database>/<file>/<generation>/<seq 8 hex>-<start 8 hex>-<end 8 hex>.seg

A *generation* is one unbroken chain of epochs the archiver watched without losing a frame; a
new one starts when continuity cannot be proved (first start, a daemon restart after the WAL was
restarted, a gap). Restore needs a base backup taken in the same generation (bases.py records).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import zstandard

from ..errors import DamagedSegment
from . import names

MAGIC = b"BASTSEG1"
WAL_HEADER = 32
FRAME_HEADER = 24
PREFIX = "archive"
_SEG = re.compile(r"([0-9a-f]{8})-([0-9a-f]{8})-([0-9a-f]{8})\.seg")
_GEN = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def gen_name(value: str) -> str:
    if not _GEN.fullmatch(value):
        raise DamagedSegment(f"{value!r} is not a generation id of the archive", hint="the archive was edited")
    return value


def stream(database: str, file: str) -> str:
    """The object prefix of one file's archive (database and file names checked: untrusted input)."""
    return f"{PREFIX}/{names.file_name(database)}/{names.file_name(file)}"


def segment_name(prefix: str, generation: str, seq: int, start: int, end: int) -> str:
    return f"{prefix}/{generation}/{seq:08x}-{start:08x}-{end:08x}.seg"


@dataclass(frozen=True, order=True)
class SegRef:
    """A listed segment (from its name only)."""
    generation: str
    seq: int
    start: int
    end: int
    name: str


def parse_name(name: str) -> SegRef | None:
    parts = name.rsplit("/", 2)
    if len(parts) != 3 or not _GEN.fullmatch(parts[1]):
        return None
    m = _SEG.fullmatch(parts[2])
    if not m:
        return None
    return SegRef(parts[1], int(m[1], 16), int(m[2], 16), int(m[3], 16), name)


def wal_header(raw: bytes) -> dict[str, int]:
    magic, version, page_size, seq, salt1, salt2, _, _ = struct.unpack(">8I", raw[:WAL_HEADER])
    return {"magic": magic, "version": version, "page_size": page_size, "seq": seq, "salt1": salt1,
            "salt2": salt2}


def frame_header(raw: bytes, offset: int = 0) -> tuple[int, int, int, int]:
    """(page number, database size in pages after a commit or 0, salt1, salt2)."""
    pgno, size, s1, s2 = struct.unpack_from(">4I", raw, offset)
    return pgno, size, s1, s2


def encode(header: dict[str, Any], wal_hdr: bytes, frames: bytes) -> bytes:
    payload = json.dumps(header, separators=(",", ":")).encode() + b"\n" + wal_hdr + frames
    return MAGIC + hashlib.sha256(payload).digest() + zstandard.ZstdCompressor(level=1).compress(payload)


@dataclass
class Segment:
    header: dict[str, Any]
    wal_header: bytes
    frames: bytes               # (24 + page_size) bytes per frame

    @property
    def commits(self) -> list[list[Any]]:
        """[[frame, database pages, time seen], ...] in frame order."""
        return self.header["commits"]


def decode(name: str, data: bytes) -> Segment:
    """The segment, or DamagedSegment saying what is wrong with it."""
    def bad(what: str) -> DamagedSegment:
        return DamagedSegment(f"archive segment {name} is damaged: {what}", details={"segment": name},
                              hint="restore to an instant before it (see `bastion backups archive`), or take a "
                                   "new backup: the archive continues from there")
    if data[:8] != MAGIC or len(data) < 40:
        raise bad("it does not start like a segment")
    try:
        payload = zstandard.ZstdDecompressor().decompress(data[40:], max_output_size=1 << 31)
    except zstandard.ZstdError as exc:
        raise bad(f"cannot decompress ({exc})") from None
    if hashlib.sha256(payload).digest() != data[8:40]:
        raise bad("its content does not match its SHA-256")
    nl = payload.find(b"\n")
    try:
        header = json.loads(payload[:nl])
        ps, start, end = int(header["page_size"]), int(header["start"]), int(header["end"])
        commits = header["commits"]
    except (ValueError, KeyError, TypeError):
        raise bad("its header is not readable") from None
    ref = parse_name(name)
    frames = payload[nl + 1 + WAL_HEADER:]
    if ref is None or (ref.seq, ref.start, ref.end) != (header.get("seq"), start, end):
        raise bad("its header does not match its name")
    if len(frames) != (end - start + 1) * (FRAME_HEADER + ps) or not commits or commits[-1][0] != end:
        raise bad("its frames do not match its header")
    return Segment(header, payload[nl + 1:nl + 1 + WAL_HEADER], frames)
