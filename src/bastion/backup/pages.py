"""Backing up database files page by page into format-2 packs (runs in the backup child).

Each byte is read once. Each page (page_size from the header) is hashed with BLAKE3; a page
whose hash the repository has already (unchanged since the parent backup, or the same bytes
anywhere else) costs its 32-byte hash in the file's page map and nothing more. A new page is
stored whole (zstd level 1, or raw when that does not shrink it) or, when the parent backup
had a page at that number, as a zstd delta against the parent's whole page (the parent's
page as a raw-content dictionary), whichever is smaller. Hashing and compression run on a
pool of two threads (BLAKE3 and zstd release the GIL); packs are written by PackWriter.

Per-table content digests are not computed here: a format-2 backup is checked by page hashes,
and `verify --full` runs integrity_check on a restored copy.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

import zstandard

from ..errors import BastionError, from_os_error
from .pack import DELTA, MAP, RAW, ZSTD, PackReader, PackWriter, RepoIndex, page_hash

if TYPE_CHECKING:
    from .manifest import Manifest, ManifestFile
    from .repository import Repository

FORMAT = 2
BATCH_PAGES = 256       # pages per unit of work handed to the pool (1 MiB of 4 KiB pages)
THREADS = 2
AHEAD = 4               # batches read ahead of the writer, at most (memory stays bounded)
HASH = 32


def header_page_size(header: bytes) -> int:
    """SQLite's page size from the first 100 bytes (offset 16, big-endian; 1 means 65536); 0 if not SQLite."""
    if len(header) < 18 or not header.startswith(b"SQLite format 3\x00"):
        return 0
    ps = int.from_bytes(header[16:18], "big")
    ps = 65536 if ps == 1 else ps
    return ps if 512 <= ps <= 65536 and ps & (ps - 1) == 0 else 0


def split_map(raw: bytes) -> list[bytes]:
    return [raw[i:i + HASH] for i in range(0, len(raw), HASH)]


def load_map(reader: PackReader, f: ManifestFile) -> list[bytes]:
    """The page hashes of manifest file entry ``f``, checked against its page count."""
    from .pack import CorruptPack
    if not f.pages:
        return []
    raw = reader.get(bytes.fromhex(f.map or ""))
    if len(raw) != f.pages * HASH:
        raise CorruptPack(f"page map of {f.name} holds {len(raw) // HASH} pages, the manifest says {f.pages}")
    return split_map(raw)


def parent_backup(repo: Repository, database: str | None) -> Manifest | None:
    """The newest sound format-2 backup of ``database``: what an incremental compares with."""
    if not database:
        return None
    for bid in reversed(repo.backup_ids()):
        try:
            m = repo.manifest(bid)
        except BastionError:
            continue
        if m.database == database and m.format == FORMAT:
            return m
    return None


class _Encoder:
    """Hash and, for pages the repository lacks, compress: one batch of pages per call, on the pool."""

    def __init__(self, index: RepoIndex, reader: PackReader) -> None:
        self.index, self.reader = index, reader
        self._local = threading.local()

    def _cctx(self) -> Any:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=1)
        return c

    def batch(self, data: bytes, ps: int, first: int, parent: list[bytes]) -> list[tuple[bytes, Any]]:
        out: list[tuple[bytes, Any]] = []
        view = memoryview(data)
        blobs = self.index.blobs
        for i in range(0, len(data), ps):
            page = view[i:i + ps]
            h = page_hash(page)
            if h in blobs:
                out.append((h, None))
                continue
            comp = self._cctx().compress(page)
            base: bytes | None = None
            kind, payload = (ZSTD, comp) if len(comp) < len(page) else (RAW, bytes(page))
            pg = first + i // ps
            key = self.index.keyframe(parent[pg]) if pg < len(parent) else None
            if key is not None and len(payload) > 64:
                old: bytes | None = None
                try:
                    old = self.reader.get(key)
                except BastionError:
                    pass            # a damaged parent page: this one is stored whole
                if old is not None:
                    dic = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                    delta = zstandard.ZstdCompressor(level=1, dict_data=dic).compress(page)
                    if len(delta) < len(payload):
                        kind, payload, base = DELTA, delta, key
            out.append((h, (kind, payload, len(page), base)))
        return out


class _Run:
    """One backup's state: the pool, the pack writer, the counters."""

    def __init__(self, repo: Repository, database: str | None, progress: Callable[[int, int], None] | None,
                 total: int) -> None:
        # a damaged index hides its blobs: pages found in none are stored again (verify names the index)
        self.index = RepoIndex.load(repo.store, strict=False)
        self.reader = PackReader(repo.store, self.index)
        self.parent = parent_backup(repo, database)
        self.parent_maps: dict[str, list[bytes]] = {}
        for pf in self.parent.files if self.parent else []:
            try:
                self.parent_maps[pf.name] = load_map(self.reader, pf)
            except BastionError:
                pass      # no deltas for that file; dedup by hash still applies
        self.writer = PackWriter(repo.store, self.index)
        self.enc = _Encoder(self.index, self.reader)
        self.pool = ThreadPoolExecutor(max_workers=THREADS)
        self.progress, self.total, self.done = progress, total, 0
        self.pages_new = self.pages_delta = 0

    def _drain(self, queue: deque[Future[list[tuple[bytes, Any]]]], hashes: list[bytes], n: int) -> None:
        while len(queue) > n:
            for h, blob in queue.popleft().result():
                hashes.append(h)
                if blob is not None and self.writer.add(h, *blob):
                    self.pages_new += 1
                    self.pages_delta += blob[0] == DELTA

    def file(self, spec: dict[str, str]) -> dict[str, Any]:
        path = spec["path"]
        hashes: list[bytes] = []
        size = 0
        try:
            with open(path, "rb") as fh:
                ps = header_page_size(fh.read(100)) or 4096     # not SQLite: 4 KiB units all the same
                fh.seek(0)
                pmap = self.parent_maps.get(spec["name"], [])
                queue: deque[Future[list[tuple[bytes, Any]]]] = deque()
                while data := fh.read(ps * BATCH_PAGES):
                    queue.append(self.pool.submit(self.enc.batch, data, ps, size // ps, pmap))
                    size += len(data)
                    self.done += len(data)
                    self._drain(queue, hashes, AHEAD)
                    if self.progress:
                        self.progress(self.done, max(self.total, self.done))
                self._drain(queue, hashes, 0)
        except OSError as exc:
            raise from_os_error(exc, "reading the database file for the backup") from None
        raw = b"".join(hashes)
        map_hex = None
        if raw:
            mh = page_hash(raw)
            self.writer.add(mh, MAP, zstandard.ZstdCompressor(level=3).compress(raw), len(raw))
            map_hex = mh.hex()
        return {"path": path, "name": spec["name"], "size": size, "page_size": ps if size else 0,
                "pages": len(hashes), "map": map_hex}


def snapshot(repo: Repository, files: list[dict[str, str]], database: str | None,
             progress: Callable[[int, int], None] | None = None, total: int = 0) -> dict[str, Any]:
    t0 = time.monotonic()
    run = _Run(repo, database, progress, total)
    try:
        out_files = [run.file(spec) for spec in files]
        run.writer.finish()       # every pack and index durable before the daemon writes the manifest
    except BaseException:
        run.pool.shutdown(wait=True, cancel_futures=True)
        run.writer.abandon()
        raise
    run.pool.shutdown(wait=True)
    return {"format": FORMAT, "files": out_files, "stored_bytes_added": run.writer.stored_bytes,
            "chunks_total": sum(f["pages"] for f in out_files), "chunks_new": run.writer.blobs_new,
            "new_chunks": [], "seconds": time.monotonic() - t0,
            "extra": {"parent": run.parent.id if run.parent else None, "pages_new": run.pages_new,
                      "pages_delta": run.pages_delta, "packs_new": len(run.writer.packs_written)}}
