"""The backup repository: content-addressed chunks and manifests on a Store.

Layout under the repository root::

    bastion-repo.json              format version (checked on every open)
    chunks/ab/ab12...ef            zstd-compressed chunk, named by the SHA-256 of its raw bytes
    manifests/<backup id>.json     one per backup, written last: a backup exists once its manifest does

Chunks are written once and never modified; every read re-hashes and refuses
data that does not match its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import zstandard

from ..errors import BastionError, UsageError
from .store import ObjectMissing, Store, open_store

FORMAT = 1
MARKER = "bastion-repo.json"


class RepositoryError(BastionError):
    pass


class NoRepository(UsageError):
    """The URL holds no repository (yet)."""


class CorruptChunk(RepositoryError):
    pass


class MissingChunk(RepositoryError):
    pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Repository:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self._local = threading.local()   # zstd contexts are not thread-safe: one per upload thread

    @classmethod
    def open(cls, url: str, create: bool = False) -> "Repository":
        repo = cls(open_store(url))
        try:
            meta = json.loads(repo.store.read(MARKER))
        except ObjectMissing:
            if not create:
                raise NoRepository(f"{url} is not a Bastion backup repository (no {MARKER})",
                                 hint="check the URL; `bastion backup` creates the repository on first use") from None
            repo.store.write(MARKER, json.dumps({"format": FORMAT, "created": time.time()}).encode())
            return repo
        except ValueError:
            raise RepositoryError(f"{url}/{MARKER} is damaged (not JSON)") from None
        if meta.get("format") != FORMAT:
            raise UsageError(f"{url} has repository format {meta.get('format')!r}; this Bastion reads format "
                             f"{FORMAT}", hint="use the Bastion version that wrote the repository")
        return repo

    # -- chunks -------------------------------------------------------------
    @staticmethod
    def chunk_name(digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def chunk_digests(self) -> set[str]:
        return {name.rsplit("/", 1)[-1] for name in self.store.list("chunks")}

    def put_chunk(self, data: bytes, digest: str | None = None) -> tuple[str, int]:
        """Store ``data`` under its SHA-256; returns (digest, stored bytes)."""
        digest = digest or hashlib.sha256(data).hexdigest()
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=3)
        packed = cctx.compress(data)
        self.store.write(self.chunk_name(digest), packed)
        return digest, len(packed)

    def get_chunk(self, digest: str) -> bytes:
        try:
            packed = self.store.read(self.chunk_name(digest))
        except ObjectMissing:
            raise MissingChunk(f"chunk {digest[:16]} is missing from {self.url}") from None
        try:
            data = zstandard.ZstdDecompressor().decompress(packed)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"chunk {digest[:16]} in {self.url} cannot be decompressed: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptChunk(f"chunk {digest[:16]} in {self.url} does not match its hash")
        return data

    def delete_chunk(self, digest: str) -> None:
        self.store.delete(self.chunk_name(digest))

    # -- locks: a running backup must never lose a chunk it counted on --------------
    # A backup writes a shared lock, then waits while a prune lock exists; prune writes
    # its lock, then skips chunk deletion if any backup lock exists. Each writes before
    # it checks, so at least one of them sees the other.
    def lock(self, kind: str) -> str:
        name = f"locks/{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.store.write(name, json.dumps({"kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
                                           "at": time.time()}).encode())
        return name

    def unlock(self, name: str) -> None:
        self.store.delete(name)

    def live_locks(self, kind: str, stale_after: float = 86400.0) -> list[str]:
        live = []
        for name in self.store.list("locks"):
            base = name.rsplit("/", 1)[-1]
            if not base.startswith(kind + "-"):
                continue
            try:
                info = json.loads(self.store.read(name))
            except Exception:  # noqa: BLE001 - vanished or half-written: not a live lock
                continue
            dead = info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))
            if dead or time.time() - float(info.get("at", 0)) > stale_after:
                self.store.delete(name)   # its owner is gone (e.g. killed): the lock is stale
                continue
            live.append(name)
        return live

    def wait_for_no_prune(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while self.live_locks("prune"):
            if time.monotonic() > deadline:
                raise RepositoryError(f"a prune of {self.url} held its lock for more than {timeout:g} s",
                                      hint="retry the backup when the prune has finished")
            time.sleep(0.2)

    # -- manifests ------------------------------------------------------------
    def put_manifest(self, manifest: dict[str, Any]) -> None:
        self.store.write(f"manifests/{manifest['id']}.json", json.dumps(manifest, indent=1).encode())

    def manifest(self, backup_id: str) -> dict[str, Any]:
        try:
            raw = self.store.read(f"manifests/{backup_id}.json")
        except ObjectMissing:
            raise UsageError(f"no backup {backup_id!r} in {self.url}",
                             hint="list backups with `bastion backups list`") from None
        try:
            m = json.loads(raw)
        except ValueError:
            raise RepositoryError(f"the manifest of backup {backup_id} in {self.url} is damaged (not valid JSON)",
                                  details={"backup": backup_id}) from None
        if not isinstance(m, dict) or m.get("id") != backup_id or not isinstance(m.get("files"), list):
            raise RepositoryError(f"the manifest of backup {backup_id} in {self.url} is damaged",
                                  details={"backup": backup_id})
        return m

    def delete_manifest(self, backup_id: str) -> None:
        self.store.delete(f"manifests/{backup_id}.json")
        self.store.delete(f"verified/{backup_id}.json")

    def backup_ids(self) -> list[str]:
        return sorted(n.rsplit("/", 1)[-1][:-5] for n in self.store.list("manifests") if n.endswith(".json"))

    def manifests(self) -> Iterator[dict[str, Any] | RepositoryError]:
        for bid in self.backup_ids():
            try:
                yield self.manifest(bid)
            except RepositoryError as exc:
                yield exc
