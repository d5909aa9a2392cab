"""Packs of repository format 2: many blobs per object, an index per pack, one index per repository.

Layout under the repository root (see docs/design.md, "Repository format 2")::

    packs/<id[:2]>/<id>     b"BPK2" + blobs back to back; <id> is random (names say nothing of content)
    index/<id>              the pack's index: b"BIX2" + zstd(header + one fixed record per blob)

A blob is a page (raw, zstd, or a zstd delta against another page) or a page map; it is
named by the BLAKE3 of the bytes it decodes to, so a page stored once is referenced by every
later backup that has it. A pack is written before its index and both before any manifest
that needs them: a crash leaves at worst a pack without an index (nothing references it;
prune removes it). Everything read back is untrusted: offsets, lengths and kinds are checked
against the pack before use, and every decoded blob is re-hashed.
"""

from __future__ import annotations

import secrets
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import blake3
import zstandard

from ..errors import CorruptPack, DamagedIndex, MissingChunk, MissingPack, RepositoryError  # noqa: F401 - the pack errors live in errors.py; imported from here too
from .store import ObjectMissing, Store

PACK_MAGIC = b"BPK2"
INDEX_MAGIC = b"BIX2"
PACK_TARGET = 16 << 20          # a pack is written once it holds this much
MAX_PAGE_BLOB = 65536 + 1024   # a page (at most 65536 bytes) as stored: raw, or zstd of it with its frame
MAX_MAP = 1 << 32               # a page map: 32 bytes a page (a 4 KiB-page file of 512 GiB has 128 MiB)
RAW, ZSTD, DELTA, MAP = 0, 1, 2, 3   # how a blob's bytes decode; MAP: a zstd page map
KINDS = (RAW, ZSTD, DELTA, MAP)
_REC = struct.Struct(">32sIIBI32s")  # hash, offset, length, kind, decoded length, delta base (zeros: none)
_HEAD = struct.Struct(">16sQ32s")    # pack id, pack size, BLAKE3 of the pack's bytes
NO_BASE = bytes(32)
_ID_HEX = frozenset("0123456789abcdef")


def page_hash(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def index_name(pack_id: str) -> str:
    return f"index/{pack_id}"


def valid_id(pack_id: object) -> bool:
    return isinstance(pack_id, str) and len(pack_id) == 32 and set(pack_id) <= _ID_HEX


class Entry(NamedTuple):
    """Where a blob is and how it decodes (a tuple: one per distinct page, so cheap to make and keep)."""
    pack: str
    offset: int
    length: int
    kind: int
    size: int            # decoded length
    base: bytes | None   # DELTA: the hash of the page it is a delta against


def encode_index(pack_id: str, pack_size: int, pack_digest: bytes, entries: list[tuple[bytes, Entry]]) -> bytes:
    body = _HEAD.pack(bytes.fromhex(pack_id), pack_size, pack_digest) + b"".join(
        _REC.pack(h, e.offset, e.length, e.kind, e.size, e.base or NO_BASE) for h, e in entries)
    return INDEX_MAGIC + zstandard.ZstdCompressor(level=3).compress(body)


def decode_index(pack_id: str, data: bytes) -> tuple[int, bytes, list[tuple[bytes, Entry]]]:
    """(pack size, pack BLAKE3, [(hash, entry)]) or DamagedIndex naming what is wrong."""
    def bad(why: str) -> DamagedIndex:
        return DamagedIndex(f"index of pack {pack_id} is damaged: {why}", path=index_name(pack_id),
                            hint="run `bastion verify --all`; `bastion prune` rewrites an index from its pack "
                                 "only if the pack is sound")
    if not data.startswith(INDEX_MAGIC):
        raise bad("it does not start with the index marker")
    try:
        body = zstandard.ZstdDecompressor().decompress(data[4:], max_output_size=64 << 20)
    except zstandard.ZstdError as exc:
        raise bad(f"cannot be decompressed ({exc})") from None
    if len(body) < _HEAD.size or (len(body) - _HEAD.size) % _REC.size:
        raise bad(f"{len(body)} bytes is not a header plus whole records")
    pid, size, digest = _HEAD.unpack_from(body)
    if pid.hex() != pack_id:
        raise bad(f"it names pack {pid.hex()}")
    out = []
    for h, off, length, kind, dsize, base in _REC.iter_unpack(memoryview(body)[_HEAD.size:]):
        if kind not in KINDS:
            raise bad(f"blob {h.hex()[:16]} has unknown kind {kind}")
        if off < len(PACK_MAGIC) or length <= 0 or off + length > size:
            raise bad(f"blob {h.hex()[:16]} at {off}+{length} lies outside the pack's {size} bytes")
        if kind == MAP:
            if dsize % 32 or not 0 < dsize < MAX_MAP:
                raise bad(f"page map {h.hex()[:16]} decodes to {dsize} bytes, not a whole number of page hashes")
        elif length > MAX_PAGE_BLOB or not 0 < dsize <= 65536 or (kind == RAW and dsize != length):
            raise bad(f"blob {h.hex()[:16]} of kind {kind} is {length} bytes decoding to {dsize}: not a page")
        if (kind == DELTA) != (base != NO_BASE):
            raise bad(f"blob {h.hex()[:16]} of kind {kind} has {'no' if kind == DELTA else 'a'} delta base")
        out.append((h, Entry(pack_id, off, length, kind, dsize, base if kind == DELTA else None)))
    return size, digest, out


class RepoIndex:
    """Every blob of the repository: hash -> Entry, loaded once (every index object read)."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, Entry] = {}
        self.packs: dict[str, tuple[int, bytes, int]] = {}    # id -> (size, BLAKE3, blob count)
        self.damaged: dict[str, str] = {}                     # index id -> what is wrong
        self.by_pack: dict[str, list[tuple[bytes, Entry]]] = {}

    @classmethod
    def load(cls, store: Store, strict: bool = True) -> RepoIndex:
        """``strict``: a damaged index is an error (a backup must not build on what it cannot read);
        otherwise it is listed in ``damaged`` (verify names it)."""
        idx = cls()
        for name in sorted(store.list("index")):
            pid = name.replace("\\", "/").rsplit("/", 1)[-1]
            if not valid_id(pid):
                continue
            try:
                idx.add(pid, *decode_index(pid, store.read(name)))
            except ObjectMissing:
                continue      # removed by a prune since the listing
            except DamagedIndex as exc:
                if strict:
                    raise
                idx.damaged[pid] = exc.message
        return idx

    def add(self, pack_id: str, size: int, digest: bytes, entries: list[tuple[bytes, Entry]]) -> None:
        self.packs[pack_id] = (size, digest, len(entries))
        self.by_pack[pack_id] = entries
        for h, e in entries:
            self.blobs.setdefault(h, e)     # a blob in two packs (a repack cut short): either serves

    def keyframe(self, h: bytes) -> bytes | None:
        """The whole page a delta against page ``h`` would be taken against (``h`` or its own base)."""
        e = self.blobs.get(h)
        if e is None or e.kind == MAP:
            return None
        return e.base if e.kind == DELTA else h


class PackWriter:
    """Collects blobs into packs; a full pack is written (pack, then index) on a thread of its own,
    at most one write in flight, so hashing and compression go on while the store fsyncs."""

    def __init__(self, store: Store, index: RepoIndex, target: int = PACK_TARGET) -> None:
        self.store, self.index, self.target = store, index, target
        self._parts: list[bytes] = [PACK_MAGIC]
        self._size = len(PACK_MAGIC)
        self._entries: list[tuple[bytes, Entry]] = []
        self._id = secrets.token_hex(16)
        self._io = ThreadPoolExecutor(max_workers=1)
        self._inflight: Future[int] | None = None
        self.stored_bytes = 0
        self.blobs_new = 0
        self.packs_written: list[str] = []

    def add(self, h: bytes, kind: int, payload: bytes, size: int, base: bytes | None = None) -> bool:
        """Add a blob unless one of that hash exists already; True if added."""
        if h in self.index.blobs:
            return False
        e = Entry(self._id, self._size, len(payload), kind, size, base)
        self.index.blobs[h] = e      # later pages dedup against it at once
        self._entries.append((h, e))
        self._parts.append(payload)
        self._size += len(payload)
        self.blobs_new += 1
        if self._size >= self.target:
            self._cut()
        return True

    def _cut(self) -> None:
        if len(self._entries) == 0:
            return
        data = b"".join(self._parts)
        pid, entries = self._id, self._entries
        self._parts, self._size, self._entries = [PACK_MAGIC], len(PACK_MAGIC), []
        self._id = secrets.token_hex(16)
        self._wait()
        self._inflight = self._io.submit(self._write, pid, data, entries)

    def _write(self, pid: str, data: bytes, entries: list[tuple[bytes, Entry]]) -> int:
        digest = page_hash(data)
        idx = encode_index(pid, len(data), digest, entries)
        self.store.write(pack_name(pid), data)       # the pack first: an index never names a missing pack
        self.store.write(index_name(pid), idx)
        self.index.packs[pid] = (len(data), digest, len(entries))
        self.packs_written.append(pid)
        return len(data) + len(idx)

    def _wait(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            self.stored_bytes += fut.result()

    def finish(self) -> None:
        """Write what is left and wait for every write: on return, every blob added is durable."""
        try:
            self._cut()
            self._wait()
        finally:
            self._io.shutdown(wait=True)

    def abandon(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)


class PackReader:
    """Blob bytes by hash: ranged reads where the store has them, else whole packs (a few kept)."""

    CACHE = 3

    def __init__(self, store: Store, index: RepoIndex) -> None:
        self.store, self.index = store, index
        self.ranged = type(store).read_range is not Store.read_range
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _pack(self, pid: str) -> bytes:
        with self._lock:
            if pid in self._cache:
                self._cache.move_to_end(pid)
                return self._cache[pid]
        try:
            data = self.store.read(pack_name(pid))
        except ObjectMissing:
            raise MissingPack(f"pack {pid} is missing from {self.store.url}", path=pack_name(pid)) from None
        with self._lock:
            self._cache[pid] = data
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return data

    def raw(self, pid: str, offset: int, length: int) -> bytes:
        """Bytes of pack ``pid``; short (truncated pack) is CorruptPack."""
        if self.ranged:
            try:
                data = self.store.read_range(pack_name(pid), offset, length)
            except ObjectMissing:
                raise MissingPack(f"pack {pid} is missing from {self.store.url}", path=pack_name(pid)) from None
        else:
            data = self._pack(pid)[offset:offset + length]
        if len(data) != length:
            raise CorruptPack(f"pack {pid} in {self.store.url} is truncated: {length} bytes at {offset} "
                              f"give {len(data)}", path=pack_name(pid),
                              hint="run `bastion verify --all` to see which backups it breaks")
        return data

    def _dctx(self) -> Any:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def decode(self, h: bytes, e: Entry, payload: bytes | memoryview) -> bytes:
        """The blob's bytes from its stored form, checked against its hash."""
        try:
            if e.kind == RAW:
                data = bytes(payload)
            elif e.kind in (ZSTD, MAP):
                data = self._dctx().decompress(payload, max_output_size=e.size)
            else:
                assert e.base is not None
                base = self.get(e.base, depth=1)
                dic = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                data = zstandard.ZstdDecompressor(dict_data=dic).decompress(payload, max_output_size=e.size)
        except zstandard.ZstdError as exc:
            raise CorruptPack(f"blob {h.hex()[:16]} in pack {e.pack} cannot be decompressed ({exc})",
                              path=pack_name(e.pack)) from None
        if len(data) != e.size or page_hash(data) != h:
            raise CorruptPack(f"blob {h.hex()[:16]} in pack {e.pack} of {self.store.url} does not match its "
                              "hash (the pack is damaged)", path=pack_name(e.pack),
                              hint="run `bastion verify --all` to see which backups it breaks")
        return data

    def get(self, h: bytes, depth: int = 0) -> bytes:
        e = self.index.blobs.get(h)
        if e is None:
            damaged = f" (damaged index(es): {', '.join(sorted(self.index.damaged))})" if self.index.damaged else ""
            raise MissingChunk(f"blob {h.hex()[:16]} is in no pack index of {self.store.url}{damaged}")
        if depth and e.kind == DELTA:      # deltas are only ever taken against whole pages
            raise CorruptPack(f"blob {h.hex()[:16]} is a delta used as the base of another delta",
                              path=pack_name(e.pack))
        return self.decode(h, e, self.raw(e.pack, e.offset, e.length))
