"""Checking backups, and recording what was found.

quick: each manifest's structure (manifest.problems), then every chunk the
       backups reference read back, decompressed, re-hashed and measured against the
       size the manifest gives it. Each distinct chunk is read once per run, however
       many backups share it; nothing is remembered between runs, so a quick ok means
       the chunks were sound when they were read, not when some earlier run read them.
full:  quick, then each backup restored into scratch space: the SHA-256 of every file,
       PRAGMA integrity_check and the per-table content digests. Only this sees what
       needs the data itself: a wrong SHA-256 or table digest, chunks in the wrong order,
       a chunk swapped for another sound chunk of the same size.

Problems are collected, not stopped at the first; each names the backup, the file and
the chunk. A damaged chunk is also traced to every other backup in the repository that
references it. Every outcome (ok or not, quick or full) is written to verified/<id>.json.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NotRequired, TypedDict
from collections.abc import Callable

from ..errors import BastionError, Outcome, RestoreFailed, UsageError
from ..state import iso
from . import format2
from .names import UnsafeName
from .manifest import Manifest
from .repository import DamagedManifest, Repository
from .restore import restore

READ_THREADS = 3   # chunk reads, zstd and SHA-256 release the GIL


class Problem(TypedDict):
    """One thing found wrong, named down to the file and chunk when it has one."""
    backup: str
    file: str | None
    chunk: str | None
    problem: str


class VerifiedBackup(TypedDict):
    """One backup's outcome. Keys are added as the checks go, in the order the JSON shows them."""
    backup: str
    database: str | None          # None: the manifest could not be read
    instant: str | None
    chunks_checked: int
    bad_chunks: int
    manifest: str                 # "ok" or "damaged"
    full: NotRequired[str]        # --full only: its outcome in words
    ok: NotRequired[bool]         # these two: always set, last
    problems: NotRequired[int]


class VerifyResult(TypedDict):
    """`bastion verify`: each backup's outcome and every problem (Backups._finish reads "ok")."""
    repository: str
    mode: str                     # "quick" or "full"
    backups: list[VerifiedBackup]
    problems: list[Problem]
    notes: list[str]
    ok: bool
    verdict: Outcome
    recorded: NotRequired[bool]   # absent when record=False
    message: NotRequired[str]     # the scheduler's one-line summary of the problems


def _read(repo: Repository, digest: str) -> int | str:
    """The chunk's raw length when it is sound, else what is wrong with it."""
    try:
        return len(repo.get_chunk(digest))
    except BastionError as exc:   # missing, corrupt, or the store would not give it to us
        return exc.message


def _file_of(exc: BastionError, m: Manifest) -> str | None:
    """Which file of ``m`` a restore error is about: the one RestoreFailed names (never read from
    the message's words), if ``m`` has it."""
    name = exc.file if isinstance(exc, RestoreFailed) else None
    return name if any(f.name == name for f in m.files) else None


def verify(repo: Repository, backup_ids: list[str] | None = None, full: bool = False,
           progress: Callable[[int, int], None] | None = None, record: bool = True) -> VerifyResult:
    """Verify ``backup_ids`` (default: every backup); ``record``: write each outcome to the repository."""
    every = not backup_ids
    ids = list(dict.fromkeys(backup_ids)) if backup_ids else repo.backup_ids()
    mode = "full" if full else "quick"
    found: dict[str, list[Problem]] = {bid: [] for bid in ids}
    recordable: list[str] = []        # backups whose manifest object exists (sound or not)
    manifests: dict[str, Manifest] = {}
    entries: dict[str, VerifiedBackup] = {}

    def problem(bid: str, text: str, file: str | None = None, chunk: str | None = None) -> None:
        found.setdefault(bid, []).append({"backup": bid, "file": file, "chunk": chunk, "problem": text})

    # 1. manifests: structure first, so nothing below trusts a field it has not checked
    for bid in ids:
        try:
            manifests[bid] = repo.manifest(bid)
            recordable.append(bid)
        except DamagedManifest as exc:
            recordable.append(bid)
            for p in exc.details.get("problems", []):
                problem(bid, f"manifest damaged: {p['problem']}", p.get("file"), p.get("chunk"))
        except (UsageError, UnsafeName) as exc:    # no such backup / not a backup id: nothing to record on
            problem(bid, exc.message)
        except BastionError as exc:
            problem(bid, exc.message)
        entries[bid] = {"backup": bid, "database": None, "instant": None, "chunks_checked": 0, "bad_chunks": 0,
                        "manifest": "ok" if bid in manifests else "damaged"}

    # 2. chunks: each distinct one read once, in parallel; then every reference checked against it
    refs: dict[str, list[tuple[str, str, int]]] = {}
    paged = {bid: m for bid, m in manifests.items() if m.format == 2}
    for p in format2.quick_problems(repo, paged):     # page maps, indexes, packs (full reads the pages)
        problem(p["backup"], p["problem"], p["file"], p["chunk"])
    for bid, m in paged.items():
        entries[bid].update({"database": m.database, "instant": m.instant_text,
                             "chunks_checked": sum(f.pages or 0 for f in m.files)})
    for bid, m in manifests.items():
        if bid in paged:
            continue
        for f in m.files:
            for digest, size in f.chunks:
                refs.setdefault(digest, []).append((bid, f.name, size))
        entries[bid].update({"database": m.database, "instant": m.instant_text,
                             "chunks_checked": sum(len(f.chunks) for f in m.files)})
    state: dict[str, int | str] = {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        digests = list(refs)
        for n, (digest, res) in enumerate(zip(digests, pool.map(lambda d: _read(repo, d), digests)), 1):
            state[digest] = res
            if progress:
                progress(n, len(digests))
    bad_chunks: dict[str, str] = {}
    for digest, uses in refs.items():
        seen: set[tuple[str, str]] = set()
        for bid, name, size in uses:
            if (bid, name) in seen:
                continue
            seen.add((bid, name))
            res = state[digest]
            if isinstance(res, str):
                bad_chunks[digest] = res
                problem(bid, res, name, digest)
            elif res != size:
                problem(bid, f"chunk {digest[:16]} holds {res} bytes, the manifest says {size}", name, digest)
    for bid in manifests:
        entries[bid]["bad_chunks"] = len({p["chunk"] for p in found[bid] if p["chunk"]})

    # 3. full: restore what quick found sound into scratch space (SHA-256, integrity_check, digests)
    if full:
        for bid, m in manifests.items():
            if found[bid]:
                entries[bid]["full"] = "not attempted: quick checks failed"
                continue
            scratch = tempfile.mkdtemp(prefix="bastion-verify-")
            try:
                restore(repo, bid, scratch)
                entries[bid]["full"] = ("integrity ok, every page hash matches" if bid in paged
                                        else "integrity ok, content digests match")
            except BastionError as exc:
                entries[bid]["full"] = exc.message
                problem(bid, exc.message, _file_of(exc, m))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    # 4. a damaged chunk breaks every backup that references it, not just the ones asked about
    breaks: dict[str, list[Problem]] = {}
    if bad_chunks and not every:
        for other in repo.manifests():
            if isinstance(other, BastionError) or other.id in found:
                continue
            for f in other.files:
                for digest in dict.fromkeys(d for d, _ in f.chunks if d in bad_chunks):
                    breaks.setdefault(other.id, []).append(
                        {"backup": other.id, "file": f.name, "chunk": digest,
                         "problem": f"{bad_chunks[digest]} (found while verifying {', '.join(ids)})"})

    notes = _notes(repo, manifests, ids) if every else []
    problems = [p for bid in found for p in found[bid]] + [p for ps in breaks.values() for p in ps]
    for bid, e in entries.items():
        e["ok"] = not found[bid]
        e["problems"] = len(found[bid])
    result: VerifyResult = {"repository": repo.url, "mode": mode, "backups": list(entries.values()),
                              "problems": problems, "notes": notes, "ok": not problems,
                              "verdict": Outcome.FAILED if problems else Outcome.OK}

    # 5. record: verify never trusts a record, but `backups list` and `status` show the latest
    if record:
        at = iso(time.time())
        try:
            for bid in recordable:
                was = repo.verification(bid)["unreadable"]
                if was:
                    result["notes"].append(f"the verification record of backup {bid} was damaged ({was}); "
                                           "replaced by this outcome")
                repo.record_verification(bid, mode, not found[bid], at, found[bid])
            for bid, ps in breaks.items():
                repo.record_verification(bid, "quick", False, at, ps, found_while_verifying=ids)
            result["recorded"] = True
        except (BastionError, OSError) as exc:
            result["recorded"] = False
            result["notes"].append(f"the outcome could not be recorded in the repository: {exc}")
            if result["verdict"] == Outcome.OK:
                result["verdict"] = Outcome.PARTIAL    # checked, but `backups list` will not show it
    return result


_CHUNK_NAME = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{64})")


def _notes(repo: Repository, manifests: dict[str, Manifest], ids: list[str]) -> list[str]:
    """What --all sees that breaks no backup: objects nothing references, stray records."""
    notes = format2.notes(repo) if repo.format == 2 else []
    referenced = {d for m in manifests.values() for d in m.digests()}
    unreferenced, odd = [], []
    for name in repo.store.list("chunks"):
        mt = _CHUNK_NAME.fullmatch(name.replace("\\", "/"))
        if not mt or mt.group(2)[:2] != mt.group(1):
            odd.append(name)
        elif mt.group(2) not in referenced:
            unreferenced.append(mt.group(2))
    if unreferenced:
        notes.append(f"{len(unreferenced)} chunk(s) no backup references (left by an interrupted backup or a "
                     f"deleted manifest; `bastion prune` removes them): {', '.join(d[:16] for d in unreferenced[:5])}"
                     + (" ..." if len(unreferenced) > 5 else ""))
    if odd:
        notes.append(f"{len(odd)} object(s) under chunks/ that are not named like a chunk: {', '.join(odd[:5])}")
    known = set(ids)
    for name in repo.store.list("verified"):
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        if base.endswith(".json") and base[:-5] not in known:
            notes.append(f"verification record {name} belongs to no backup")
    return notes
