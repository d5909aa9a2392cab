"""Repository format 2 outside the backup itself: restore's page source,
quick verify, prune's repack, and the repository summary (`bastion repo info`).

A format-2 manifest names, per file, its size, page size, page count and the hash of its
page map (a blob: the BLAKE3 of every page, in order). Everything it references is found
through the pack indexes (pack.RepoIndex); see pages.py for how a backup writes them.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypedDict

from ..errors import BastionError, DamagedManifest, RepositoryError
from .manifest2 import manifest_problems
from .pack import DELTA, MAP, CorruptPack, Entry, PackReader, PackWriter, RepoIndex
from .pack import index_name, pack_name, valid_id
from .pages import FORMAT, HASH, load_map

if TYPE_CHECKING:
    from .manifest import Manifest, ManifestFile
    from .repository import Repository

RUN_BYTES = 2 << 20      # adjacent blobs read in one go by restore, at most
RUN_AHEAD = 8            # runs decoded ahead of the writer, at most
REPACK_UNUSED = 0.1      # a pack with more than this share of unused bytes is rewritten by prune


# -- restore ------------------------------------------------------------------------------------

_READERS: weakref.WeakKeyDictionary[Repository, PackReader] = weakref.WeakKeyDictionary()


def reader_of(repo: Repository, fresh: bool = False) -> PackReader:
    """The repository's pack reader, its index loaded once per Repository object."""
    r = _READERS.get(repo)
    if r is None or fresh:
        # not strict: one damaged index must not stop the restore of a backup that needs none of its blobs
        r = _READERS[repo] = PackReader(repo.store, RepoIndex.load(repo.store, strict=False))
    return r


Block = tuple[tuple[str, int], "bytes | RepositoryError"]


def _decode_run(reader: PackReader, run: list[tuple[bytes, Entry | None]]) -> list[bytes | RepositoryError]:
    first = run[0][1]
    if first is None:       # in no index: get() says so (naming any damaged index)
        try:
            return [reader.get(run[0][0])]
        except RepositoryError as exc:
            return [exc]
    start = first.offset
    try:
        data = memoryview(reader.raw(first.pack, start, run[-1][1].offset + run[-1][1].length - start))  # type: ignore[union-attr]
    except RepositoryError as exc:
        return [exc] * len(run)
    out: list[bytes | RepositoryError] = []
    for h, e in run:
        assert e is not None
        try:
            out.append(reader.decode(h, e, data[e.offset - start:e.offset - start + e.length]))
        except RepositoryError as exc:
            out.append(exc)
    return out


def blocks(repo: Repository, f: ManifestFile, pool: ThreadPoolExecutor) -> Iterator[Block]:
    """The pages of manifest file ``f`` in order, as restore's chunk loop takes them: ((hash, length),
    bytes or the error reading it). Adjacent blobs are read in one go and decoded by ``pool`` ahead."""
    try:
        reader = reader_of(repo)
        try:
            hashes = load_map(reader, f)
        except RepositoryError:
            reader = reader_of(repo, fresh=True)    # written since this object loaded the index?
            hashes = load_map(reader, f)
    except RepositoryError as exc:
        yield (f.map or "", 0), exc
        return
    blobs = reader.index.blobs
    runs: list[list[tuple[bytes, Entry | None]]] = []
    for h in hashes:
        e = blobs.get(h)
        last = runs[-1][-1][1] if runs else None
        if (e is not None and last is not None and last.pack == e.pack and last.offset + last.length == e.offset
                and e.offset + e.length - runs[-1][0][1].offset <= RUN_BYTES):  # type: ignore[union-attr]
            runs[-1].append((h, e))
        else:
            runs.append([(h, e)])
    queue: deque[tuple[list[tuple[bytes, Entry | None]], Future[list[bytes | RepositoryError]]]] = deque()
    todo = iter(runs)
    total = 0
    while True:
        while len(queue) < RUN_AHEAD:
            run = next(todo, None)
            if run is None:
                break
            queue.append((run, pool.submit(_decode_run, reader, run)))
        if not queue:
            break
        run, fut = queue.popleft()
        for (h, e), data in zip(run, fut.result()):
            total += e.size if e is not None else 0
            yield (h.hex(), e.size if e is not None else 0), data
    if total != f.size:      # the pages are the backed-up ones (hashed); the manifest's size is not
        yield ("", 0), DamagedManifest(f"the pages of {f.name} make {total} bytes, the manifest says "
                                       f"{f.size}")


# -- verify -------------------------------------------------------------------------------------

def quick_problems(repo: Repository, manifests: dict[str, Manifest]) -> list[dict[str, Any]]:
    """Structure of format-2 backups: every page map readable and sound, every page and delta base in
    an index, every pack they live in present. Reads the indexes and page maps, not the pages."""
    problems: list[dict[str, Any]] = []
    if not manifests:
        return problems
    index = RepoIndex.load(repo.store, strict=False)
    reader = PackReader(repo.store, index)
    present = {n.replace("\\", "/").rsplit("/", 1)[-1] for n in repo.store.list("packs")}
    blobs = index.blobs
    for bid, m in manifests.items():
        for f in m.files:
            if not f.pages:
                continue
            try:
                hashes = load_map(reader, f)
            except BastionError as exc:
                e = blobs.get(bytes.fromhex(f.map or ""))
                problems.append({"backup": bid, "file": f.name, "chunk": e.pack if e else None,
                                 "problem": f"page map unreadable: {exc.message}"})
                continue
            lost = 0
            packs_gone: set[str] = set()
            for h in set(hashes):
                e = blobs.get(h)
                if e is not None and e.kind == DELTA:
                    base = blobs.get(e.base or b"")
                    if base is None:
                        lost += 1
                    elif base.pack not in present:
                        packs_gone.add(base.pack)
                if e is None or e.kind == MAP:
                    lost += 1
                elif e.pack not in present:
                    packs_gone.add(e.pack)
            for pid in sorted(packs_gone):
                problems.append({"backup": bid, "file": f.name, "chunk": pid,
                                 "problem": f"pack {pid} is missing from {repo.url}"})
            if lost:
                damaged = f" (damaged index(es): {', '.join(sorted(index.damaged))})" if index.damaged else ""
                problems.append({"backup": bid, "file": f.name, "chunk": None,
                                 "problem": f"{lost} page(s) are in no pack index{damaged}"})
    return problems


def notes(repo: Repository) -> list[str]:
    """What `verify --all` sees in a format-2 repository that breaks no backup by itself."""
    index = RepoIndex.load(repo.store, strict=False)
    packs = {n.replace("\\", "/").rsplit("/", 1)[-1] for n in repo.store.list("packs")}
    out = []
    orphans = sorted(p for p in packs if valid_id(p) and p not in index.packs and p not in index.damaged)
    if orphans:
        out.append(f"{len(orphans)} pack(s) without an index (left by an interrupted backup or prune; "
                   f"`bastion prune` removes them): {', '.join(orphans[:5])}" + (" ..." if len(orphans) > 5 else ""))
    for pid, why in sorted(index.damaged.items()):
        out.append(f"pack index {pid} is damaged: {why}")
    return out


# -- prune: repack ------------------------------------------------------------------------------

def live_blobs(reader: PackReader, manifests: list[Manifest]) -> set[bytes]:
    """Every blob the backups need: page maps, their pages, and the bases of delta pages."""
    live: set[bytes] = set()
    for m in manifests:
        for f in m.files:
            if f.pages:
                live.add(bytes.fromhex(f.map or ""))
                live.update(load_map(reader, f))    # an unreadable map stops prune: its pages are unknown
    blobs = reader.index.blobs
    live.update([e.base for h in live if (e := blobs.get(h)) is not None and e.base is not None])
    return live


def check_prunable(repo: Repository, remaining: list[Manifest]) -> None:
    """Raise (before prune removes anything) if what the remaining backups need cannot be known."""
    live_blobs(PackReader(repo.store, RepoIndex.load(repo.store)), [m for m in remaining
                                                                     if m.format == FORMAT])


class Repack(TypedDict):
    """What prune's pack cleanup did (or would do, dry run); spread into prune.PruneResult."""
    packs_removed: int
    packs_rewritten: int
    bytes_freed: int
    chunks_removed: int
    chunk_cleanup: str            # "done" or "dry run"


def repack(repo: Repository, remaining: list[Manifest], dry_run: bool) -> Repack:
    """Delete packs no remaining backup uses, rewrite those mostly unused (restic-style). The caller
    holds the prune lock and has seen no backup lock, so no backup can be adding references.

    Order keeps the repository readable at every step: new packs and their indexes are written
    first; then old indexes are deleted, then old packs (a crash leaves duplicates or an index-less
    pack, which the next prune removes)."""
    index = RepoIndex.load(repo.store)      # strict: a damaged index could hide blobs a backup needs
    reader = PackReader(repo.store, index)
    live = live_blobs(reader, [m for m in remaining if m.format == FORMAT])
    drop: list[str] = []
    rewrite: list[str] = []
    freed = 0
    for pid, entries in index.by_pack.items():
        size = index.packs[pid][0]
        used = sum(e.length for h, e in entries if h in live and index.blobs[h] is e)
        if not used:
            drop.append(pid)
            freed += size
        elif size - used > REPACK_UNUSED * size:
            rewrite.append(pid)
            freed += size - used
    orphans = [n for n in repo.store.list("packs")
               if valid_id(pid := n.replace("\\", "/").rsplit("/", 1)[-1]) and pid not in index.packs]
    out: Repack = {"packs_removed": len(drop) + len(orphans), "packs_rewritten": len(rewrite), "bytes_freed": freed,
           "chunks_removed": sum(len(index.by_pack[p]) for p in drop), "chunk_cleanup": "dry run"}
    if dry_run:
        return out
    if rewrite:
        writer = PackWriter(repo.store, RepoIndex())
        try:
            for pid in rewrite:
                for h, e in index.by_pack[pid]:
                    if h in live and index.blobs[h] is e:
                        writer.add(h, e.kind, reader.raw(pid, e.offset, e.length), e.size, e.base)
            writer.finish()
        except BaseException:
            writer.abandon()
            raise
    for pid in drop + rewrite:
        repo.store.delete(index_name(pid))
    for pid in drop + rewrite:
        repo.store.delete(pack_name(pid))
    for name in orphans:
        repo.store.delete(name)
    out["chunk_cleanup"] = "done"
    return out


# -- summary ------------------------------------------------------------------------------------

class Format2Info(TypedDict):
    """The format-2 part of `bastion repo info` (info.RepositoryInfo, which adds the rest)."""
    repository: str
    format: int
    backups: int
    packs: int
    blobs: int
    stored_bytes: int
    logical_bytes: int
    dedup_ratio: float | None
    damaged_indexes: list[str]


def info(repo: Repository) -> Format2Info:
    """Format, packs, stored bytes and what the backups would take without dedup and compression."""
    index = RepoIndex.load(repo.store, strict=False)
    stored = sum(size for size, _, _ in index.packs.values())
    logical = 0
    backups = 0
    for m in repo.manifests():
        if isinstance(m, BastionError):
            continue
        backups += 1
        logical += m.logical_bytes
    return {"repository": repo.url, "format": FORMAT, "backups": backups, "packs": len(index.packs),
            "blobs": len(index.blobs), "stored_bytes": stored, "logical_bytes": logical,
            "dedup_ratio": round(logical / stored, 2) if stored else None,
            "damaged_indexes": sorted(index.damaged)}


__all__ = ["HASH", "CorruptPack", "blocks", "info", "manifest_problems", "quick_problems", "repack"]
