"""Pruning: forget backups by a retention policy, then delete the chunks nothing references.

The policy is restic's: keep the last N backups, and the newest backup of each
of the last N hours/days/weeks/months that have one; per database. A backup
kept by any rule is kept. Chunk deletion is skipped while a backup is running
(see Repository locks) and only ever removes chunks no remaining manifest names.
A repository is untrusted input: a manifest prune cannot read entirely stops it
(nothing removed), and only names of Bastion's own shape are ever deleted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from ..errors import Outcome, UsageError
from . import format2
from .manifest import Manifest
from .repository import Repository, RepositoryError


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly))

    def to_dict(self) -> dict[str, int]:
        return {"last": self.last, "hourly": self.hourly, "daily": self.daily, "weekly": self.weekly,
                "monthly": self.monthly}


_BUCKETS = {
    "hourly": lambda t: time.strftime("%Y-%m-%dT%H", time.gmtime(t)),
    "daily": lambda t: time.strftime("%Y-%m-%d", time.gmtime(t)),
    "weekly": lambda t: time.strftime("%G-W%V", time.gmtime(t)),
    "monthly": lambda t: time.strftime("%Y-%m", time.gmtime(t)),
}


def select(manifests: list[Manifest], policy: Policy) -> dict[str, list[str]]:
    """Which backup ids to keep, each with the rules that keep it (newest first per database)."""
    keep: dict[str, list[str]] = {}
    by_db: dict[str, list[Manifest]] = {}
    for m in manifests:
        by_db.setdefault(m.database, []).append(m)
    for ms in by_db.values():
        ms.sort(key=lambda m: m.instant, reverse=True)
        for m in ms[:policy.last]:
            keep.setdefault(m.id, []).append("last")
        for rule, bucket in _BUCKETS.items():
            n = getattr(policy, rule)
            seen: list[str] = []
            for m in ms:
                b = bucket(m.instant.epoch)
                if b in seen:
                    continue
                if len(seen) >= n:
                    break
                seen.append(b)
                keep.setdefault(m.id, []).append(rule)
    return keep


_DIGEST = re.compile(r"[0-9a-f]{64}")


class KeptBackup(TypedDict):
    id: str
    database: str
    instant: str
    rules: list[str]              # the policy's rules that keep it


class RemovedBackup(TypedDict):
    id: str
    database: str
    instant: str


class PruneResult(TypedDict):
    """`bastion prune`. The backups first; what the chunk (format 1) or pack (format 2) cleanup did is
    added as it goes, so those keys are NotRequired to mypy although every return sets "verdict"."""
    repository: str
    policy: dict[str, int]
    dry_run: bool
    kept: list[KeptBackup]
    removed: list[RemovedBackup]
    chunks_removed: NotRequired[int]
    bytes_freed: NotRequired[int]
    chunk_cleanup: NotRequired[str]    # "done", "dry run", or why it was deferred
    packs_removed: NotRequired[int]    # format 2 (format2.Repack)
    packs_rewritten: NotRequired[int]
    temporaries_removed: NotRequired[int]
    verdict: NotRequired[Outcome]


def prune(repo: Repository, policy: Policy, database: str | None = None, dry_run: bool = False) -> PruneResult:
    if policy.empty():
        raise UsageError("prune needs a policy: at least one of --keep-last, --keep-hourly, --keep-daily, "
                         "--keep-weekly, --keep-monthly", hint="nothing was removed")
    manifests: list[Manifest] = []
    damaged: list[RepositoryError] = []
    for m in repo.manifests():     # a Manifest has the shape Bastion writes: its checks are Manifest.from_json's
        if isinstance(m, RepositoryError):
            damaged.append(m)
        else:
            manifests.append(m)
    if damaged:
        # A damaged manifest might reference chunks: deleting "unreferenced" chunks could finish it off.
        raise RepositoryError(f"{len(damaged)} manifest(s) in {repo.url} are damaged; prune removes nothing "
                              "until they are dealt with", hint="run `bastion verify --all` to see which")
    scope = [m for m in manifests if database is None or m.database == database]
    keep = select(scope, policy)
    forget = [m for m in scope if m.id not in keep]
    remaining = [m for m in manifests if m.id in keep or (database is not None and m.database != database)]
    referenced = {d for m in remaining for d in m.digests()}
    result: PruneResult = {
        "repository": repo.url, "policy": policy.to_dict(), "dry_run": dry_run,
        "kept": [{"id": m.id, "database": m.database, "instant": m.instant_text, "rules": keep[m.id]}
                 for m in scope if m.id in keep],
        "removed": [{"id": m.id, "database": m.database, "instant": m.instant_text} for m in forget],
    }
    if repo.format == 2:
        format2.check_prunable(repo, remaining)    # a damaged index or page map: nothing is removed
    lock = None if dry_run else repo.lock("prune")
    try:
        if not dry_run:
            for m in forget:
                repo.delete_manifest(m.id)
        if not dry_run and repo.live_locks("backup"):
            result.update({"chunks_removed": 0, "bytes_freed": 0,
                           "chunk_cleanup": "deferred: a backup is running; the next prune removes the chunks"})
            result["verdict"] = Outcome.OK
            return result
        if repo.format == 2:     # packs nobody uses go, packs mostly unused are rewritten
            result.update(format2.repack(repo, remaining, dry_run))
            temps = repo.store.removable_temporaries()
            if not dry_run:
                for t in temps:
                    repo.store.delete(t)
            result.update({"temporaries_removed": len(temps), "verdict": Outcome.OK})
            return result
        # only names Bastion writes: a stray or hostile file under chunks/ is neither counted nor touched
        unreferenced = sorted(d for d in repo.chunk_digests() - referenced if _DIGEST.fullmatch(d))
        freed = 0
        for d in unreferenced:
            try:
                freed += len(repo.store.read(repo.chunk_name(d)))
            except Exception:  # size is only reported
                pass
            if not dry_run:
                repo.delete_chunk(d)
        # only temporaries no live process can still be writing (store._tmp_removable)
        temps = repo.store.removable_temporaries()
        if not dry_run:
            for t in temps:
                repo.store.delete(t)
        result.update({"chunks_removed": len(unreferenced), "bytes_freed": freed,
                       "temporaries_removed": len(temps), "chunk_cleanup": "done" if not dry_run else "dry run"})
        result["verdict"] = Outcome.OK
        return result
    finally:
        if lock:
            repo.unlock(lock)
