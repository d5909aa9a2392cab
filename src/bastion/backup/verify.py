"""Checking backups: quick (every chunk read back and re-hashed) or full (restore, integrity, digests).

Runs in phases and collects typed problems instead of stopping at the first,
naming the backup and file each one affects.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable

from ..errors import BastionError
from .repository import Repository, RepositoryError
from .restore import restore


def verify(repo: Repository, backup_ids: list[str] | None = None, full: bool = False,
           progress: Callable[[int, int], None] | None = None, read_only: set[str] | None = None) -> dict[str, Any]:
    """``read_only``: when given, only these chunks are read back and re-hashed; the
    others are checked to exist (used right after a backup, for the chunks it wrote)."""
    ids = backup_ids if backup_ids else repo.backup_ids()
    problems: list[dict[str, Any]] = []
    results = []
    chunk_state: dict[str, str | None] = {}   # digest -> None when sound, else the problem
    manifests = {}
    for bid in ids:
        try:
            manifests[bid] = repo.manifest(bid)
        except BastionError as exc:
            problems.append({"backup": bid, "file": None, "problem": exc.message})
    todo = sum(len(f["chunks"]) for m in manifests.values() for f in m["files"])
    done = 0
    for bid, m in manifests.items():
        bad = 0
        for f in m["files"]:
            for digest, _ in f["chunks"]:
                if digest not in chunk_state:
                    try:
                        if read_only is None or digest in read_only:
                            repo.get_chunk(digest)
                        elif not repo.store.exists(repo.chunk_name(digest)):
                            raise RepositoryError(f"chunk {digest[:16]} is missing from {repo.url}")
                        chunk_state[digest] = None
                    except RepositoryError as exc:
                        chunk_state[digest] = exc.message
                done += 1
                if progress:
                    progress(done, todo)
                if chunk_state[digest] is not None:
                    bad += 1
                    problems.append({"backup": bid, "file": f["name"], "chunk": digest,
                                     "problem": chunk_state[digest]})
        entry: dict[str, Any] = {"backup": bid, "database": m["database"], "instant": m["instant"],
                                 "chunks_checked": sum(len(f["chunks"]) for f in m["files"]),
                                 "bad_chunks": bad, "ok": bad == 0}
        if full and bad == 0:
            scratch = tempfile.mkdtemp(prefix="bastion-verify-")
            try:
                restore(repo, bid, scratch)
                entry["full"] = "integrity ok, content digests match"
            except BastionError as exc:
                entry["ok"] = False
                entry["full"] = exc.message
                problems.append({"backup": bid, "file": None, "problem": exc.message})
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        results.append(entry)
    ok = not problems
    return {"repository": repo.url, "backups": results, "problems": problems, "ok": ok,
            "mode": "full" if full else "quick", "exit_code": 0 if ok else 2}
