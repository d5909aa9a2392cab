"""What a repository holds: format, objects, stored bytes, and how much dedup and compression save."""

from __future__ import annotations

from typing import NotRequired, TypedDict

from ..errors import BastionError, Outcome
from . import format2
from .repository import Repository


class RepositoryInfo(TypedDict):
    """`bastion repo info`. Format 1 counts chunks; format 2 packs, blobs and damaged indexes."""
    repository: str
    format: int
    backups: int
    stored_bytes: int
    logical_bytes: int
    dedup_ratio: float | None     # None: nothing stored
    chunks: NotRequired[int]      # format 1
    packs: NotRequired[int]       # format 2
    blobs: NotRequired[int]
    damaged_indexes: NotRequired[list[str]]
    encrypted: NotRequired[bool]  # these two: always set, last
    verdict: NotRequired[Outcome]


def repository_info(repo: Repository) -> RepositoryInfo:
    """Format 2: packs and blobs from the indexes. Format 1: chunks counted by listing, stored bytes
    as the backups recorded them (the chunks themselves are not read)."""
    out: RepositoryInfo
    if repo.format == 2:
        out = {**format2.info(repo)}     # its keys, in its order: the JSON is the same
    else:
        logical = stored = backups = 0
        for m in repo.manifests():
            if isinstance(m, BastionError):
                continue
            backups += 1
            logical += m.logical_bytes
            stored += (m.stored_bytes_added or 0)
        out = {"repository": repo.url, "format": 1, "backups": backups,
               "chunks": sum(1 for _ in repo.store.list("chunks")), "stored_bytes": stored,
               "logical_bytes": logical, "dedup_ratio": round(logical / stored, 2) if stored else None}
    out["encrypted"] = repo.keys is not None     # the cipher and key slots: `bastion repo key list`
    out["verdict"] = Outcome.FAILED if out.get("damaged_indexes") else Outcome.OK
    return out
