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
directory can edit it): a manifest is used only after ``manifest_problems``
found nothing wrong with its structure, so a damaged or hostile one is a named
``DamagedManifest``, never a KeyError or TypeError further on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from typing import Any
from collections.abc import Iterator

import zstandard

from ..errors import BastionError, UsageError
from ..errors import CorruptChunk, DamagedManifest, MissingChunk, NoRepository, RepositoryError, TamperedObject
from ..position import Instant
from . import keys as keymod
from .crypto import RepoKeys
from .names import UnsafeName, backup_id as checked_id, file_name, file_names
from .store import ObjectMissing, Store, _pid_alive, open_store
from .store.sealed import SealedStore

FORMAT = 1
MARKER = "bastion-repo.json"


HEX64 = re.compile(r"[0-9a-f]{64}")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_problems(m: Any, backup_id: str) -> list[dict[str, Any]]:
    """Everything structurally wrong with manifest ``m`` of ``backup_id``: [] when it is sound.

    The one place that decides whether a manifest can be used; manifest() (hence verify,
    list, prune and restore) refuses any manifest this finds fault with. What it cannot
    see without the data (a wrong SHA-256 or table digest, chunks in the wrong order) is
    left to full verify and restore, which recompute them."""
    out: list[dict[str, Any]] = []

    def bad(problem: str, file: str | None = None, chunk: str | None = None) -> None:
        out.append({"file": file, "chunk": chunk, "problem": problem})

    if not isinstance(m, dict):
        bad(f"is a JSON {type(m).__name__}, not an object")
        return out
    if m.get("format") != FORMAT or not _int(m.get("format")):
        bad(f"has format {m.get('format')!r}; this Bastion writes and reads format {FORMAT}")
    if m.get("id") != backup_id:
        bad(f"names itself {m.get('id')!r}, not {backup_id!r} as its object name says")
    if not isinstance(m.get("database"), str) or not m["database"].strip():
        bad(f"has no database name ({m.get('database')!r})")
    text_ok = isinstance(m.get("instant"), str) and ISO.fullmatch(m["instant"]) is not None
    if not text_ok:
        bad(f"has no valid instant ({m.get('instant')!r})")
    epoch = m.get("instant_epoch")
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch) or epoch <= 0:
        bad(f"has no valid instant_epoch ({epoch!r})")
    elif text_ok:
        try:   # both well formed: they must name the same moment (list sorts by one, prune by the other)
            Instant.from_json(m)
        except UsageError as exc:
            bad(exc.message)
    files = m.get("files")
    if not isinstance(files, list) or not files:
        bad("has no files (an empty or missing file list restores nothing)" if not files
            else f"has a file list that is a {type(files).__name__}")
        return out
    if not all(isinstance(f, dict) for f in files):
        bad("has a file entry that is not an object")
        return out
    names = [f.get("name") for f in files]
    unsafe = False
    for n in names:
        try:
            file_name(n)
        except UnsafeName as exc:
            unsafe = True
            bad(exc.message, n if isinstance(n, str) else None)
    if not unsafe:
        try:
            file_names(names)
        except UnsafeName as exc:   # the same name twice (or twice but for letter case)
            folded = [n.casefold() for n in names]
            bad(exc.message, next(n for n in names if folded.count(n.casefold()) > 1))
    logical = 0
    chunks_total = 0
    for f in files:
        name = f.get("name") if isinstance(f.get("name"), str) else repr(f.get("name"))
        size = f.get("size")
        if not _int(size) or size < 0:
            bad(f"file {name}: size {size!r} is not a byte count", name)
            size = None
        chunks = f.get("chunks")
        if not isinstance(chunks, list):
            bad(f"file {name}: chunk list is a {type(chunks).__name__}, not a list", name)
            chunks = []
        total: int | None = 0      # None: a chunk entry is not a [hash, size]
        for i, c in enumerate(chunks):
            if (not isinstance(c, list) or len(c) != 2 or not isinstance(c[0], str) or not HEX64.fullmatch(c[0])
                    or not _int(c[1]) or c[1] <= 0):
                bad(f"file {name}: chunk entry #{i} {json.dumps(c)[:100]} is not [64-hex SHA-256, positive size]",
                    name, c[0] if isinstance(c, list) and c and isinstance(c[0], str) else None)
                total = None
                break
            total += c[1]
        chunks_total += len(chunks)
        if size is not None and total is not None and total != size:
            bad(f"file {name}: size {size} differs from the sum of its chunk sizes ({total})", name)
        if size is not None:
            logical += size
        if not isinstance(f.get("sha256"), str) or not HEX64.fullmatch(f["sha256"]):
            bad(f"file {name}: sha256 {f.get('sha256')!r} is not a 64-hex SHA-256", name)
        ps = f.get("page_size")
        empty = size == 0
        if not _int(ps) or not ((ps == 0 and empty) or (512 <= ps <= 65536 and ps & (ps - 1) == 0)):
            bad(f"file {name}: page_size {ps!r} is not a SQLite page size (a power of two, 512 to 65536)", name)
        elif size and size % ps:
            bad(f"file {name}: size {size} is not a whole number of {ps}-byte pages", name)
        tables = f.get("tables")
        if not isinstance(tables, dict):
            bad(f"file {name}: table digests are missing ({type(tables).__name__})", name)
        else:
            for t, d in tables.items():
                if (not isinstance(d, dict) or not _int(d.get("rows")) or d["rows"] < 0
                        or not isinstance(d.get("sha256"), str) or not HEX64.fullmatch(d["sha256"])):
                    bad(f"file {name}: digest of table {t!r} is malformed ({json.dumps(d)[:100]})", name)
        if not isinstance(f.get("path"), str) or not f["path"].startswith("/") or "\x00" in f["path"]:
            # restore --replace puts the file back there
            bad(f"file {name}: source path {f.get('path')!r} is not an absolute path", name)
    if not _int(m.get("logical_bytes")) or m["logical_bytes"] != logical:
        bad(f"logical_bytes {m.get('logical_bytes')!r} differs from the sum of its file sizes ({logical})")
    if "chunks_total" in m and m["chunks_total"] != chunks_total:
        bad(f"chunks_total {m['chunks_total']!r} differs from the number of chunks listed ({chunks_total})")
    for key in ("stored_bytes_added", "chunks_new"):
        if key in m and (not _int(m[key]) or m[key] < 0):
            bad(f"{key} {m[key]!r} is not a count")
    return out


class Repository:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self.keys: RepoKeys | None = None   # an encrypted repository's, once unlocked
        self._local = threading.local()   # zstd contexts are not thread-safe: one per upload thread

    def _seal(self, keys: RepoKeys) -> None:
        self.keys = keys
        self.store = SealedStore(self.store, keys)

    @classmethod
    def open(cls, url: str, create: bool = False, *, keys: RepoKeys | None = None) -> Repository:
        """The repository at ``url``. An encrypted one is unlocked with ``keys`` (the backup reader
        child gets them from the daemon) or the secret keys.resolve finds (KeyRequired, WrongKey);
        ``create`` makes a missing one, encrypted when a secret is supplied."""
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
                repo._seal(keymod.create(repo.store, secret))
                return repo
            repo.store.write(MARKER, json.dumps({"format": FORMAT, "created": time.time()}).encode())
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
        if meta.get("format") != FORMAT:
            raise UsageError(f"{url} has repository format {meta.get('format')!r}; this Bastion reads format "
                             f"{FORMAT}", hint="use the Bastion version that wrote the repository")
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
        for prefix in ("manifests", "chunks"):
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
    def put_manifest(self, manifest: dict[str, Any]) -> None:
        self.store.write(f"manifests/{manifest['id']}.json", json.dumps(manifest, indent=1).encode())

    def manifest(self, backup_id: str) -> dict[str, Any]:
        """The manifest of ``backup_id``, structurally sound (manifest_problems) or DamagedManifest."""
        checked_id(backup_id)   # a name joined onto a path: never '../x' (UnsafeName)
        try:
            raw = self.store.read(f"manifests/{backup_id}.json")
        except ObjectMissing:
            raise UsageError(f"no backup {backup_id!r} in {self.url}",
                             hint="list backups with `bastion backups list`") from None
        except TamperedObject:
            raw = None
        m: Any = None
        if raw is None:
            problems = [{"file": None, "chunk": None,
                         "problem": "fails authentication (edited, truncated or moved from another name)"}]
        else:
            try:
                m = json.loads(raw)
            except ValueError:
                problems = [{"file": None, "chunk": None, "problem": "is not valid JSON (truncated or overwritten)"}]
            else:
                problems = manifest_problems(m, backup_id)
        if problems:
            first = problems[0]["problem"]
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise DamagedManifest(f"the manifest of backup {backup_id} in {self.url} is damaged: {first}{more}",
                                  details={"backup": backup_id, "problems": problems},
                                  hint="run `bastion verify` on it to see every problem; restore another backup")
        return m

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
                            problems: list[dict[str, Any]], **extra: Any) -> None:
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

    def manifests(self) -> Iterator[dict[str, Any] | RepositoryError]:
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
