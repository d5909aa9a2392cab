"""Taking a backup: continuous operations around a child process that reads the files.

The application never stops: the daemon puts the files into continuous
operations (their main files stand still), a child reads them into the
repository, the daemon ends continuous operations, and only if the copy is
consistent writes the manifest (last, durably) and verifies the new backup.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, NotRequired, TypedDict

import apsw

from ..catalog import Catalog
from ..config import Config
from ..contops import ContinuousOperations, StartResult
from ..errors import BastionError, NotConsistent, Outcome, from_os_error
from ..position import Instant
from ..sqlite import DatabaseFile
from ..state import iso
from . import names
from .manifest import FORMAT, Manifest
from .repository import NoRepository, Repository, describe_verification
from .snapshot import snapshot_in_child
from .verify import Problem, verify


def default_repository(config: Config, database: str | None = None) -> str:
    """The database's own repository, else [backups] repository, else file://<data_dir>/backups."""
    db = config.databases.get(database or "")
    return (db and db.repository) or config.backups.repository or "file://" + os.path.join(config.data_dir, "backups")


def _names(files: list[DatabaseFile]) -> list[str]:
    """File names inside the backup: base names, made unique when two files share one."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        base = os.path.basename(f.path)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{n}-{base}")
    return out


class BackupLatest(TypedDict):
    """A database's newest backup and its latest recorded verification (`bastion status`)."""
    database: str
    repository: str
    backup: str | None
    instant: str | None
    verified: str | None          # describe_verification's line
    verification: dict[str, Any] | None
    error: str | None             # the repository could not be read


class BackupResult(TypedDict):
    """`bastion backup` of one database: the new backup, its figures, and its read-back check."""
    backup: str
    database: str
    repository: str
    instant: str
    logical_bytes: int
    stored_bytes_added: int | None
    chunks_total: int | None
    chunks_new: int | None
    seconds: float
    writers_paused_ms: float      # how long startbu held the writers
    verified: bool
    verify_seconds: float
    verdict: Outcome
    problems: NotRequired[list[Problem]]     # the written backup is not restorable: these, and words
    message: NotRequired[str]
    hint: NotRequired[str]
    temporaries_removed: NotRequired[int]    # set by take(), not by _finish()
    archive_base: NotRequired[Any]           # WAL archive on: where its segments start
    pruned: NotRequired[list[str]]           # a scheduled backup: the ids its prune removed


class BackupFailure(TypedDict):
    """One database of a several-database backup that raised."""
    database: str
    error: dict[str, Any]         # BastionError.to_dict()
    verdict: Outcome


class BackupBatch(TypedDict):
    """`bastion backup` of several databases (or --all): each result or error."""
    backups: list[BackupResult | BackupFailure]
    failed: int
    verdict: Outcome


class BackupRow(TypedDict):
    """One backup of `bastion backups list`."""
    id: str
    database: str
    instant: str
    logical_bytes: int
    stored_bytes_added: int
    files: list[str]
    verified: str
    verification: dict[str, Any]


class BackupList(TypedDict):
    repository: str
    backups: list[BackupRow]
    problems: list[str]           # damaged manifests, in words
    verdict: Outcome


class Backups:
    def __init__(self, config: Config, catalog: Catalog, contops: ContinuousOperations) -> None:
        self.config = config
        self.catalog = catalog
        self.contops = contops
        self.running: dict[str, dict[str, Any]] = {}   # label -> progress of a backup under way
        self._latest: dict[str, tuple[float, BackupLatest]] = {}   # database -> (when read, summary)
        self.archive: Any = None     # the WAL archive (backup.archive.Archive): backups become its bases

    LATEST_TTL = 10.0   # status is polled; a remote repository is not read more often than this

    def latest(self, database: str) -> BackupLatest:
        """The database's newest backup and its latest recorded verification, for `bastion status`."""
        now = time.monotonic()
        hit = self._latest.get(database)
        if hit and now - hit[0] < self.LATEST_TTL:
            return hit[1]
        url = default_repository(self.config, database)
        out: BackupLatest = {"database": database, "repository": url, "backup": None, "instant": None,
                             "verified": None, "verification": None, "error": None}
        try:
            repo = Repository.open(url)
            # ids start with the instant: read manifests newest first until one is this database's
            for bid in reversed(repo.backup_ids()):
                try:
                    m = repo.manifest(bid)
                except BastionError:
                    continue
                if m.database == database:
                    ver = repo.verification(bid)
                    out.update({"backup": bid, "instant": m.instant_text, "verified": describe_verification(ver),
                                "verification": ver["latest"]})
                    break
        except NoRepository:
            pass
        except BastionError as exc:
            out["error"] = exc.message
        except Exception as exc:  # status must answer whatever the repository does
            out["error"] = f"{url}: {exc}"
        self._latest[database] = (now, out)
        return out

    def take_each(self, names: list[str], all_: bool = False,
                  to: str | None = None) -> BackupResult | BackupBatch:
        """One backup per database named (or per configured database and protected file, for --all),
        each under its own name. One target: that backup's result (errors raise). Several: every
        result or error; ok if all succeeded, partial if some did, failed if none did."""
        groups = self._groups(names, all_)     # unknown names: a usage error before anything is done
        if len(groups) == 1 and not all_:
            label, files = groups[0]
            return self.take(label, files, to)
        results: list[BackupResult | BackupFailure] = []
        for label, files in groups:
            try:
                results.append(self.take(label, files, to))
            except BastionError as exc:
                results.append({"database": label, "error": exc.to_dict(), "verdict": Outcome.FAILED})
        failed = [r for r in results if r["verdict"] != Outcome.OK]
        verdict = Outcome.OK if not failed else (Outcome.FAILED if len(failed) == len(results) else Outcome.PARTIAL)
        return {"backups": results, "failed": len(failed), "verdict": verdict}

    def _groups(self, names: list[str], all_: bool) -> list[tuple[str, list[DatabaseFile]]]:
        from ..catalog import Targets
        if not all_:
            if not names:
                self.catalog.resolve(Targets.of([]))   # raises: name at least one database, or --all
            out: list[tuple[str, list[DatabaseFile]]] = []
            # Each configured database is its own backup; files named by path in one command are one
            # group taken at one instant (an invariant may span them, as in the demo's two files).
            paths = [n for n in dict.fromkeys(names) if n not in self.config.databases]
            for n in dict.fromkeys(names):
                if n in self.config.databases:
                    out.append((n, self.catalog.resolve(Targets.of([n]))))
            if paths:
                label = ",".join(os.path.basename(p.rstrip("/")) or p for p in paths)
                out.append((label, self.catalog.resolve(Targets.of(paths))))
            return out
        every = self.catalog.resolve(Targets.of([], True))
        groups: dict[str, list[DatabaseFile]] = {}
        for f in every:   # configured databases by name; a protected file of none under its path
            groups.setdefault(f.database or f.path, []).append(f)
        return list(groups.items())

    def take(self, label: str, files: list[DatabaseFile], to: str | None = None) -> BackupResult:
        try:
            return self._take(label, files, to)
        except OSError as exc:   # an OS error the store or contops did not name: still in words
            raise from_os_error(exc, f"backup of {label}") from None

    def _take(self, label: str, files: list[DatabaseFile], to: str | None = None) -> BackupResult:
        url = to or default_repository(self.config, label)
        # refuse an incompatible repository before starting; a new one is of the configured format
        repo = Repository.open(url, create=True, format=self.config.backups.format)
        lock = repo.lock("backup")
        try:
            repo.wait_for_no_prune()
            # stat() opens no descriptor, so it is safe here (DESIGN.md, pitfalls): the bar has a
            # total from the start; the reader's own figures replace it once it reports
            total = sum(os.stat(f.path).st_size for f in files if os.path.exists(f.path))
            progress = self.running[label] = {"database": label, "phase": "starting", "done": 0, "total": total,
                                              "started_at": iso(time.time())}
            start = self.contops.start(files)
            progress["phase"] = "copying"
            try:
                res = snapshot_in_child(url, [{"path": f.path, "name": n} for f, n in zip(files, _names(files))],
                                        progress=lambda d, t: progress.update(done=d, total=t), database=label,
                                        keys=repo.keys)
                progress["phase"] = "ending continuous operations"
            finally:
                end = self.contops.end(files)
            if not end["consistent"]:
                raise NotConsistent(f"backup of {label} abandoned: continuous operations was interrupted during "
                                    "the copy, so no manifest was written", hint="run the backup again")
            progress["phase"] = "verifying"
            out = self._finish(repo, label, start, res)
            out["temporaries_removed"] = res.get("temporaries_removed", 0)
            if self.archive is not None and start.get("archive") and out["verdict"] == Outcome.OK:
                out["archive_base"] = self.archive.record_base(repo, label, out["backup"],
                                                               start["started_at_epoch"], start["archive"])
            return out
        finally:
            self.running.pop(label, None)
            repo.unlock(lock)

    def _finish(self, repo: Repository, label: str, start: StartResult, res: dict[str, Any]) -> BackupResult:
        instant = Instant(start["started_at_epoch"])
        bid = f"{instant.stamp}-{uuid.uuid4().hex[:6]}"    # ids sort by the instant they start with
        manifest = Manifest.from_json({   # checked as it will be read: never write one we would refuse
            "format": res.get("format", FORMAT), "id": bid, "database": label, **instant.to_json(),
            "sqlite_version": apsw.sqlite_lib_version(), "files": res["files"],
            "logical_bytes": sum(f["size"] for f in res["files"]),
            "stored_bytes_added": res["stored_bytes_added"], "chunks_total": res["chunks_total"],
            "chunks_new": res["chunks_new"], "read_seconds": round(res["seconds"], 3), **res.get("extra", {}),
        }, bid)
        repo.put_manifest(manifest)   # the backup exists from here on
        # Read back every chunk the backup references, the ones it reused as well as the ones it
        # wrote: a chunk already in the repository is trusted by name only when the snapshot
        # dedups, and may have been damaged since it was written. verify() records the outcome.
        t0 = time.monotonic()
        check = verify(repo, [bid])
        out: BackupResult = {
            "backup": bid, "database": label, "repository": repo.url, "instant": manifest.instant_text,
            "logical_bytes": manifest.logical_bytes, "stored_bytes_added": manifest.stored_bytes_added,
            "chunks_total": manifest.chunks_total, "chunks_new": manifest.chunks_new,
            "seconds": round(res["seconds"], 3), "writers_paused_ms": start["writers_paused_ms"],
            "verified": check["ok"], "verify_seconds": round(time.monotonic() - t0, 3),
            "verdict": Outcome.OK if check["ok"] else Outcome.FAILED}
        if not check["ok"]:
            out["problems"] = check["problems"]
            broken = sorted({p["backup"] for p in check["problems"]})
            chunks = sorted({p["chunk"][:16] for p in check["problems"] if p["chunk"]})
            out["message"] = (f"backup {bid} was written but is NOT restorable: the repository's copy of "
                              + (f"chunk(s) {', '.join(chunks)}" if chunks else "it") + " is damaged; "
                              f"backups affected: {', '.join(broken)}")
            out["hint"] = ("delete the damaged chunk object(s) named above from the repository and run the backup "
                           "again: it uploads the content anew, which also repairs older backups that share it")
        self._latest.pop(label, None)   # status shows this backup at once
        return out


def _configured_targets(config: Config, catalog: Catalog, backup_id: str, m: Manifest) -> list[str]:
    """The local files a backup goes back over: the files of the config's database the manifest
    names, matched by name. Never the manifest's own paths: a repository is untrusted input."""
    from .restore import RestoreFailed
    label = m.database
    db = config.databases.get(label)
    if db is None:
        raise RestoreFailed(f"backup {backup_id} is of {label!r}, which is not a database of the config; "
                            "nothing was changed", hint="restore it into a directory with `bastion restore ID --to "
                                                        "DIR` and move the files yourself")
    got = names.file_names([f.name for f in m.files])
    want = _names([catalog.files.get(p) or DatabaseFile(p, db.name) for p in db.files])
    if len(got) != len(want):
        raise RestoreFailed(f"backup {backup_id} has {len(got)} file{'s' if len(got) != 1 else ''} "
                            f"({', '.join(got)}), database {label!r} in the config has {len(want)} "
                            f"file{'s' if len(want) != 1 else ''} ({', '.join(want)}); nothing was changed",
                            hint="restore it into a directory with --to DIR and move the files yourself")
    if sorted(got) != sorted(want):
        raise RestoreFailed(f"backup {backup_id} holds {', '.join(got)}; database {label!r} in the config has "
                            f"{', '.join(want)}; nothing was changed",
                            hint="restore it into a directory with --to DIR and move the files yourself")
    by_name = dict(zip(want, db.files))
    return [by_name[n] for n in got]


def restore_in_place(config: Config, catalog: Catalog, contops: ContinuousOperations, backup_id: str,
                     url: str | None = None, sql: Any = None) -> dict[str, Any]:
    """Put a backup back in place of the config's database files it came from.

    The backup is restored and checked beside the targets first; then, only if no
    other process has the files open (proved by SQLite's own locks, in a child that
    holds them across the swap), the current files and their WAL are kept aside and
    the restored ones take their place. Applications must be stopped for that
    instant; the error says so."""
    import secrets
    import shutil
    import tempfile
    from ..errors import StateConflict
    from ..sqlite.exclusive import replace_in_child
    from .restore import restore
    names.backup_id(backup_id)
    repo = Repository.open(url or default_repository(config))
    m = repo.manifest(backup_id)
    targets = _configured_targets(config, catalog, backup_id, m)
    busy = contops.state.open_files("contops", targets) + contops.state.open_files("freeze", targets)
    if busy:
        raise StateConflict(f"{busy[0]['path']}: in continuous operations or frozen", path=busy[0]["path"],
                            hint="end it (endbu/thaw) before restoring over the file; nothing was changed")
    # beside the targets (0700, a name nobody can guess), so the swap is a rename
    staging = tempfile.mkdtemp(prefix=".bastion-restore-", dir=os.path.dirname(targets[0]))
    pairs = []
    try:
        restored = restore(repo, backup_id, os.path.join(staging, "files"))
        for mf, target in zip(m.files, targets):
            staged = os.path.join(os.path.dirname(target),
                                  f".{os.path.basename(target)}.{secrets.token_hex(6)}.bastion-staged")
            shutil.move(os.path.join(staging, "files", mf.name), staged)
            pairs.append((staged, target))
        files = [catalog.files[t] for t in targets if t in catalog.files]
        # the SQL server's connections go too (refused if a transaction is open); back after the swap
        resume = sql.suspend(targets, f"restoring backup {backup_id} in place") if sql else (lambda: None)
        for f in files:
            f.lock.acquire()     # the sweeper must not re-protect a file between close and swap
        try:
            for f in files:
                f.close()       # never checkpoints on close; the child needs nobody holding the files
            swapped = replace_in_child(pairs, keep_mode=True)
        finally:
            resume()
            for f in files:
                try:
                    f.protect()
                except Exception:  # shown by status
                    pass
                finally:
                    f.lock.release()
        checks = {f.path: f.quick_check() for f in files}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for staged, _ in pairs:
            if os.path.exists(staged):
                os.remove(staged)
    out = [{"path": t, "previous_kept_as": swapped["files"][t]["previous_kept_as"],
            "quick_check": checks.get(t, "ok (not protected by this daemon)")} for t in targets]
    ok = all(c["quick_check"].startswith("ok") for c in out)
    return {"backup": backup_id, "instant": m.instant_text, "replaced": out, "verified_before_swap": restored["files"],
            "verdict": Outcome.OK if ok else Outcome.FAILED}


def list_backups(repo: Repository, database: str | None = None) -> BackupList:
    """Every backup with its latest recorded verification; damaged manifests as named problems."""
    rows: list[tuple[Instant, BackupRow]] = []
    problems: list[str] = []
    for m in repo.manifests():
        if isinstance(m, Exception):
            problems.append(str(m))
            continue
        if database and m.database != database:
            continue
        ver = repo.verification(m.id)
        rows.append((m.instant, {"id": m.id, "database": m.database, "instant": m.instant_text,
                     "logical_bytes": m.logical_bytes, "stored_bytes_added": m.stored_bytes_added or 0,
                     "files": [f.name for f in m.files], "verified": describe_verification(ver),
                     "verification": {k: ver[k] for k in ("latest", "quick", "full", "unreadable")}}))
    rows.sort(key=lambda r: r[0])
    return {"repository": repo.url, "backups": [r for _, r in rows], "problems": problems,
            "verdict": Outcome.FAILED if problems else Outcome.OK}
