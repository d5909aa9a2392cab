"""The backup repository: content-addressed chunks and manifests on a Store.

Layout under the repository root::

    bastion-repo.json              format version (checked on every open)
    chunks/ab/ab12...ef            zstd-compressed chunk, named by the SHA-256 of its raw bytes
    manifests/<backup id>.json     one per backup, written last: a backup exists once its manifest does
    keys/<slot id>.json            encrypted repositories only: the repository key, wrapped (keys.py)

An encrypted repository (the marker says so) reads and writes every other object
through a SealedStore (AES-256-GCM, the object's name as associated data) and
names chunks by HMAC-SHA256 under its name key instead of SHA-256 (``chunk_id``).

Chunks are written once and never modified; every read re-hashes and refuses
data that does not match its name.

The repository is untrusted input (anyone who can write to the bucket or the
directory can edit it): a manifest is used only as a ``manifest.Manifest``, which
is built only after its checks found nothing wrong with its structure, so a damaged
or hostile one is a named ``DamagedManifest``, never a KeyError or TypeError further on.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import zstandard

from ..errors import BastionError, UsageError
from ..errors import CorruptChunk, DamagedManifest, MissingChunk, NoRepository, RepositoryError, TamperedObject
from . import keys as keymod
from .crypto import RepoKeys
from .manifest import FORMAT, FORMATS, Manifest, damaged
from .names import backup_id as checked_id
from .store import ObjectMissing, Store, _pid_alive, open_store
from .store.sealed import SealedStore

MARKER = "bastion-repo.json"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Repository:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self.format = FORMAT
        self.keys: RepoKeys | None = None   # an encrypted repository's, once unlocked
        self._local = threading.local()   # zstd contexts are not thread-safe: one per upload thread

    def _seal(self, keys: RepoKeys) -> None:
        self.keys = keys
        self.store = SealedStore(self.store, keys)

    @classmethod
    def open(cls, url: str, create: bool = False, format: int = FORMAT, *, keys: RepoKeys | None = None) -> Repository:
        """The repository at ``url``. ``format``: what a repository created here is (one that exists
        keeps its own). An encrypted one is unlocked with ``keys`` (the backup reader child gets them
        from the daemon) or the secret keys.resolve finds (KeyRequired, WrongKey); ``create`` makes a
        missing one, encrypted when a secret is supplied."""
        if format not in FORMATS:
            raise UsageError(f"repository format {format!r} does not exist", hint="[backups] format = 1 or 2")
        repo = cls(open_store(url))
        try:
            raw = repo.store.read(MARKER)
        except ObjectMissing:
            if repo._has_content():
                # Backups without their marker: damage (or the wrong directory), never "empty".
                raise RepositoryError(f"{url} holds backups but its {MARKER} is missing: the repository is "
                                      "damaged", path=f"{url}/{MARKER}",
                                      hint=f'if this is a Bastion repository, write {{"format": {FORMAT}}} into '
                                           f"{MARKER}, then run `bastion verify --all`") from None
            if not create:
                raise NoRepository(f"{url} is not a Bastion backup repository (no {MARKER})",
                                 hint="check the URL; `bastion backup` creates the repository on first use") from None
            secret = keymod.resolve(url, prompt=False)
            if secret is not None:
                repo._seal(keymod.create(repo.store, secret, format))
            else:
                repo.store.write(MARKER, json.dumps({"format": format, "created": time.time()}).encode())
            repo.format = format
            return repo
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or "format" not in meta:
            raise RepositoryError(f"{url}/{MARKER} is damaged (not a JSON object with a format)",
                                  path=f"{url}/{MARKER}",
                                  hint=f'if this is a Bastion repository, write {{"format": {FORMAT}}} into it, '
                                       "then run `bastion verify --all`")
        if meta.get("format") not in FORMATS or not _int(meta.get("format")):
            raise UsageError(f"{url} has repository format {meta.get('format')!r}; this Bastion reads formats "
                             f"{', '.join(map(str, FORMATS))}",
                             hint="use the Bastion version that wrote the repository")
        repo.format = meta["format"]
        enc = keymod.encryption_of(meta, repo.url)
        if enc is not None:
            repo._seal(keys if keys and keys.repository_id == enc["repository_id"] else keymod.unlock(repo.store, enc))
        elif (given := keymod.explicit_source(url)) is not None:
            # a marker in clear where a key was configured: refuse rather than trust a repository an
            # attacker could have swapped for one in clear (see docs/design.md, Repository encryption)
            raise UsageError(f"{url} is not encrypted, but a secret is supplied for it ({given})",
                             hint="remove that setting or option for this repository; if it was created "
                                  "encrypted, its marker was replaced: do not trust its backups")
        return repo

    def chunk_id(self, data: bytes) -> str:
        """The name of a chunk holding ``data``: its SHA-256, or in an encrypted repository its
        HMAC-SHA256 under the name key (names then say nothing about the content)."""
        return self.keys.chunk_id(data) if self.keys else hashlib.sha256(data).hexdigest()

    def _has_content(self) -> bool:
        for prefix in ("manifests", "chunks", "packs", "index"):
            for _ in self.store.list(prefix):
                return True
        return False

    # -- chunks -------------------------------------------------------------
    @staticmethod
    def chunk_name(digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def chunk_digests(self) -> set[str]:
        return {name.rsplit("/", 1)[-1] for name in self.store.list("chunks")}

    def put_chunk(self, data: bytes, digest: str | None = None) -> tuple[str, int]:
        """Store ``data`` under its chunk_id; returns (digest, stored bytes)."""
        digest = digest or self.chunk_id(data)
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
        except TamperedObject as exc:
            raise CorruptChunk(f"chunk {digest[:16]} in {self.url} fails authentication: {exc.message}",
                               path=exc.path) from None
        try:
            data = zstandard.ZstdDecompressor().decompress(packed)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"chunk {digest[:16]} in {self.url} cannot be decompressed: {exc}") from None
        if self.chunk_id(data) != digest:
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
            except Exception:  # vanished or half-written: not a live lock
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
    def put_manifest(self, manifest: Manifest) -> None:
        self.store.write(f"manifests/{manifest.id}.json", json.dumps(manifest.to_json(), indent=1).encode())

    def manifest(self, backup_id: str) -> Manifest:
        """The manifest of ``backup_id``, structurally sound (Manifest.from_json) or DamagedManifest."""
        checked_id(backup_id)   # a name joined onto a path: never '../x' (UnsafeName)
        try:
            raw = self.store.read(f"manifests/{backup_id}.json")
        except ObjectMissing:
            raise UsageError(f"no backup {backup_id!r} in {self.url}",
                             hint="list backups with `bastion backups list`") from None
        except TamperedObject:
            raise damaged(backup_id, [{"file": None, "chunk": None, "problem": "fails authentication (edited, "
                                       "truncated or moved from another name)"}], self.url) from None
        return Manifest.from_bytes(raw, backup_id, where=self.url)

    # -- verification records: the latest quick and the latest full outcome of each backup ----------
    def verification(self, backup_id: str) -> dict[str, Any]:
        """{"quick": record|None, "full": record|None, "latest": record|None, "unreadable": str|None}.

        A record says what a verify found, not what the backup is: verify never trusts one
        (a forged "ok" changes nothing but this display until the next verify)."""
        out: dict[str, Any] = {"quick": None, "full": None, "latest": None, "unreadable": None}
        try:
            data = json.loads(self.store.read(f"verified/{backup_id}.json"))
        except ObjectMissing:
            return out
        except TamperedObject:
            out["unreadable"] = "fails authentication"
            return out
        except (ValueError, UnicodeDecodeError):
            out["unreadable"] = "not JSON"
            return out
        if isinstance(data, dict) and "mode" in data:      # written before both modes were kept
            data = {data.get("mode"): data}
        if not isinstance(data, dict):
            out["unreadable"] = f"a JSON {type(data).__name__}"
            return out
        for mode in ("quick", "full"):
            rec = data.get(mode)
            if rec is None:
                continue
            if (not isinstance(rec, dict) or not isinstance(rec.get("ok"), bool)
                    or not isinstance(rec.get("at"), str) or not isinstance(rec.get("problems", []), list)):
                out["unreadable"] = f"its {mode} entry is malformed"
                continue
            out[mode] = {**rec, "mode": mode}
        recs = [r for r in (out["quick"], out["full"]) if r]
        out["latest"] = max(recs, key=lambda r: r["at"]) if recs else None
        return out

    def record_verification(self, backup_id: str, mode: str, ok: bool, at: str,
                            problems: Sequence[Mapping[str, Any]], **extra: Any) -> None:
        """Keep this outcome as the latest of its mode (the other mode's latest stays)."""
        checked_id(backup_id)
        prev = self.verification(backup_id)
        data = {m: {k: v for k, v in prev[m].items() if k != "mode"} for m in ("quick", "full") if prev[m]}
        data[mode] = {"ok": ok, "at": at, "problems": problems, **extra}
        self.store.write(f"verified/{backup_id}.json", json.dumps(data, indent=1).encode())

    def delete_manifest(self, backup_id: str) -> None:
        self.store.delete(f"manifests/{backup_id}.json")
        self.store.delete(f"verified/{backup_id}.json")

    def backup_ids(self) -> list[str]:
        return sorted(n.rsplit("/", 1)[-1][:-5] for n in self.store.list("manifests") if n.endswith(".json"))

    def manifests(self) -> Iterator[Manifest | RepositoryError]:
        """Every sound manifest, and a RepositoryError (naming the backup) for each damaged one."""
        for bid in self.backup_ids():
            try:
                yield self.manifest(bid)
            except RepositoryError as exc:
                yield exc
            except BastionError as exc:   # an unsafe object name, or a manifest gone since the listing
                yield DamagedManifest(f"manifest {bid!r} in {self.url}: {exc.message}", details={
                    "backup": bid, "problems": [{"file": None, "chunk": None, "problem": exc.message}]})


def describe_verification(v: dict[str, Any]) -> str:
    """One line for listings: the latest outcome, plus a full verify's failure that no later full ok cleared."""
    latest = v.get("latest")
    if not latest:
        return "record unreadable" if v.get("unreadable") else "never"
    text = f"{latest['mode']} {'ok' if latest['ok'] else 'FAILED'} at {latest['at']}"
    full = v.get("full")
    if full and not full["ok"] and latest is not full:
        text += f" (full FAILED at {full['at']})"
    return text
