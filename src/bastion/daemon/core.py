"""The daemon as a library object: the catalog, state, continuous operations and freeze.

The HTTP routes are thin wrappers around these methods, and tests may call
them directly.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, cast

import apsw

from .. import __version__
from ..catalog import Catalog, Targets
from ..config import Config
from ..backup import Repository, verify
from ..backup.backups import BackupBatch, BackupLatest, BackupResult, Backups
from ..backup.manifest import Manifest
from ..contops import ContinuousOperations, EndResult, RecoverResult, StartResult
from ..errors import Outcome
from ..freeze import Freezer, FreezeResult, ThawResult
from ..state import StateStore, iso
from .auth import ensure_token
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..replication.receiver import ReplicaStatus
    from ..replication.shipper import PrimaryStatus
    from ..sync.service import SyncerStatus
    from ..sql.service import SQLService

log = logging.getLogger("bastion.daemon")


_HINTS = {
    "missing": "the file does not exist: check the path in the config, or let the application create it; "
               "the daemon protects it within 10 s of it appearing",
    "replaced": "the path names another file than the one the daemon protected (removed or put in place since): "
                "the daemon lets the old one go and protects the new one within 10 s",
    "unprotected": "see the error; the daemon retries every 10 s",
}


def protection(f: Any) -> tuple[str, str | None]:
    """protected | missing | replaced | unprotected, and what to do about it. A file removed after
    it was protected is still held open (so f.protected is true): it is missing all the same."""
    if not os.path.exists(f.path):
        return "missing", _HINTS["missing"]
    if f.protected and f.replaced():
        return "replaced", _HINTS["replaced"]
    if f.protected:
        return "protected", None
    return "unprotected", _HINTS["unprotected"]


def summary(files: list[Any]) -> str:
    """For the start-up line: how many files are protected, and which are not, by state."""
    states: dict[str, list[str]] = {}
    for f in files:
        states.setdefault(protection(f)[0], []).append(f.path)
    text = f"{len(states.get('protected', []))} of {len(files)} file(s) protected"
    for state in ("missing", "replaced", "unprotected"):
        if states.get(state):
            text += f"; {state}: {', '.join(states[state])}"
    return text


class FileStatus(TypedDict):
    path: str
    exists: bool
    protected: bool
    state: str                  # protected | missing | replaced | unprotected (protection())
    hint: str | None
    error: str | None
    journal_mode: str | None
    wal_bytes: int
    delta_bytes: int | None     # WAL bytes the hold keeps out of the main file
    main_bytes: int
    contops: dict[str, Any] | None
    frozen: dict[str, Any] | None


class DatabaseStatus(TypedDict):
    name: str
    configured: bool            # false: protected files of no configured database, by path
    files: list[FileStatus]


class DaemonInfo(TypedDict):
    version: str
    pid: int
    listen: str
    config: str
    data_dir: str
    started_at: str
    sqlite_version: str
    interrupted_at_startup: list[dict[str, Any]]


class SQLStatus(TypedDict):
    databases: dict[str, Any]
    open_transactions: list[dict[str, Any]]


class DaemonStatus(TypedDict):
    """`bastion status --json` and GET /v1/status: this dict as is (docs/api.md lists the keys)."""
    daemon: DaemonInfo
    databases: list[DatabaseStatus]
    jobs: list[dict[str, Any]]
    backups: list[BackupLatest]
    sql: SQLStatus
    replication: list[PrimaryStatus | ReplicaStatus]
    sync: list[SyncerStatus]
    drills: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]
    archive: list[dict[str, Any]]     # the WAL archivers (backup.archive.Archive.status)


class Daemon:
    def __init__(self, config: Config, guard: Callable[[], None] | None = None,
                 renewed_after: Callable[[float], bool] | None = None) -> None:
        self.config = config
        self.guard = guard          # cluster node: raises unless this node may acknowledge writes
        self.renewed_after = renewed_after   # cluster node: lease renewed by a request begun after t?
        self.state: StateStore | None = None
        self.started_at = 0.0
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.token = ""
        self.startup: dict[str, Any] = {}

    # lifecycle: opened by open(), closed by close(); misuse is refused
    def open(self) -> None:
        if self.state is not None:
            raise RuntimeError("daemon already open")
        os.makedirs(self.config.data_dir, exist_ok=True)
        from ..backup import keys
        keys.configure(self.config)     # where encrypted repositories' secrets come from (never a prompt)
        self.token = ensure_token(self.config.token_file)
        self.state = StateStore(self.config.data_dir)
        found = self.state.begin_run(os.getpid())
        try:
            self._open_services(found)
        except BaseException:
            self._abort_open()      # a refused start keeps nothing open (server.py removes what it made)
            raise

    def state_store(self) -> StateStore:
        """The state store of an open daemon (operations need it; a closed daemon refuses them)."""
        if self.state is None:
            raise RuntimeError("daemon not open")
        return self.state

    def _open_services(self, found: dict[str, Any]) -> None:
        assert self.state is not None
        self.catalog = Catalog(self.config, self.state)
        problems = self.catalog.protect_all()
        self.contops = ContinuousOperations(self.config, self.catalog, self.state)
        self.freezer = Freezer(self.config, self.catalog, self.state)
        self.backups = Backups(self.config, self.catalog, self.contops)
        from ..backup.archive import Archive
        self.archive = Archive(self.config, self.catalog)     # issue 15: WAL archive between backups
        self.contops.archive = self.backups.archive = self.archive
        self.scheduler = Scheduler(self.config, self.state)
        self.sql = self._sql_service()
        from ..replication import Replication
        self.replication = Replication(self.config, self.catalog, self.contops, self.sql,   # issue 4
                                       self.renewed_after)
        from ..sync.service import Sync
        self.sync = Sync(self.config, self.catalog, self.contops, self.replication.peer_token)   # issue 5
        self._schedule_jobs()
        if found["rolling_in"]:
            # a reader may hold the roll-in back for minutes: never delay the start for it
            threading.Thread(target=self.contops.finish_interrupted_roll_ins, args=(found["rolling_in"],),
                             name="bastion-rollin-after-restart", daemon=True).start()
        for r in found["interrupted"]:
            log.warning("%s: %s session %s was interrupted by a daemon stop", r["path"], r["kind"], r["session_id"])
        self.startup = {"interrupted": found["interrupted"], "unprotected": problems}
        self.started_at = time.time()
        self._sweeper = threading.Thread(target=self._sweep, name="bastion-sweeper", daemon=True)
        self._sweeper.start()
        self.scheduler.start()
        self.archive.start()
        self.replication.start()
        self.sync.start()
        from ..notify import Notifier
        self.notifier = Notifier(self)           # issue 17: every detected failure, once per streak
        self.notifier.start()
        if self.config.cluster:                  # a cluster node opens its daemon when it takes the lease
            self.notifier.event("failover", self.config.cluster.node,
                                f"node {self.config.cluster.node} of cluster {self.config.cluster.name} "
                                "became active (took the lease)")

    def _sql_service(self) -> SQLService:
        from ..sql.service import Database, SQLService
        settings = self.config.sql
        dbs = {name: Database(name, list(d.files), d.durability, d.group_commit, settings, d.foreign_keys)
               for name, d in self.config.databases.items()}
        return SQLService(dbs, settings, guard=self.guard)

    def _schedule_jobs(self) -> None:
        b = self.config.backups
        for name, db in self.config.databases.items():
            sched = db.schedule or b.schedule
            if sched:
                self.scheduler.add(f"backup {name}", sched, functools.partial(self._scheduled_backup, name))
            if b.verify_schedule:
                self.scheduler.add(f"verify {name}", b.verify_schedule, functools.partial(self._scheduled_verify, name))
            if b.drill_schedule:
                self.scheduler.add(f"drill {name}", b.drill_schedule, functools.partial(self.drill, name))

    def _scheduled_backup(self, name: str) -> BackupResult:
        res = cast(BackupResult, self.backup([name]))     # one name: one result, never a batch
        if self.config.backups.keep and res["verdict"] == Outcome.OK:
            from ..backup.prune import Policy, prune
            policy = Policy(**self.config.backups.keep)
            pr = prune(Repository.open(res["repository"]), policy, database=name)
            res["pruned"] = [b["id"] for b in pr["removed"]]
        return res

    def _scheduled_verify(self, name: str) -> Mapping[str, Any]:
        """Full verify (restore, integrity_check, digests) of the database's newest backup."""
        from ..backup.backups import default_repository
        repo = Repository.open(default_repository(self.config, name), create=True)
        newest = [m for m in repo.manifests() if isinstance(m, Manifest) and m.database == name]
        if not newest:
            return {"verdict": Outcome.OK, "message": "no backup yet"}
        newest.sort(key=lambda m: m.instant)
        res = verify(repo, [newest[-1].id], full=True)
        if not res["ok"]:
            res["message"] = "; ".join(p["problem"] for p in res["problems"])
        return res

    def _abort_open(self) -> None:
        self._stop.set()
        if self._sweeper:
            self._sweeper.join(timeout=5)
        for name in ("notifier", "sync", "replication", "archive", "scheduler", "sql"):
            part = self.__dict__.get(name)
            if part is not None:
                try:
                    part.stop() if name != "sql" else part.close()
                except Exception:  # the start's own error is the one to report
                    log.exception("closing %s after a refused start", name)
        if "catalog" in self.__dict__:
            self.catalog.close()
        assert self.state is not None
        self.state.end_run()
        self.state.close()
        self.state = None

    def close(self) -> None:
        if self.state is None:
            return
        self._stop.set()
        self.notifier.stop()
        self.scheduler.stop()
        self.replication.stop()
        self.sync.stop()
        self.archive.stop()
        if self._sweeper:
            self._sweeper.join(timeout=5)
        self.sql.close()
        self.freezer.thaw_all_for_shutdown()
        self.contops.mark_stopped()
        self.catalog.close()
        self.state.end_run()
        self.state.close()
        self.state = None

    def _sweep(self) -> None:
        """Once a second: expire overlong sessions, retry files not yet protected."""
        last_retry = 0.0
        while not self._stop.wait(1.0):
            try:
                self.contops.expire()
                self.sql.sweep()
                if time.monotonic() - last_retry > 10:
                    last_retry = time.monotonic()
                    for f in list(self.catalog.files.values()):
                        if not f.protected or f.replaced():
                            try:
                                f.protect()
                            except Exception:  # kept in f.error, shown by status
                                pass
            except Exception:  # the sweeper must never die
                log.exception("sweeper")

    # -- operations (thin over the library) --------------------------------
    def resolve(self, names: list[str], all_: bool = False):
        return self.catalog.resolve(Targets.of(names, all_))

    def protect(self, names: list[str], all_: bool = False) -> dict[str, Any]:
        files = self.resolve(names, all_)
        self.catalog.ensure_protected(files)
        return {"files": [{"path": f.path, "database": f.database, "journal_mode": f.journal_mode()}
                          for f in files], "verdict": Outcome.OK}

    def startbu(self, names: list[str], all_: bool = False, max_duration: float | None = None) -> StartResult:
        return self.contops.start(self.resolve(names, all_), max_duration)

    def endbu(self, names: list[str], all_: bool = False, wait: bool = True) -> EndResult:
        files = self.resolve(names, all_)
        if all_:  # --all ends whatever is open, not every known file
            open_paths = {r["path"] for r in self.state_store().open_files("contops")}
            files = [f for f in files if f.path in open_paths] or files
        return self.contops.end(files, wait)

    def recover(self, names: list[str], all_: bool = False, discard: bool = False) -> RecoverResult:
        files = self.resolve(names, all_)
        if not discard:
            return self.contops.recover(files, discard)
        # The SQL server's pooled connections are ours too: the exclusive-access proof would
        # otherwise find the daemon itself holding the files and refuse every time.
        resume = self.sql.suspend([f.path for f in files], "recover --discard-changes")
        try:
            with self.replication.paused(), self.sync.paused(), \
                    self.archive.paused([f.path for f in files]):     # their connections too
                return self.contops.recover(files, discard)
        finally:
            resume()

    def freeze(self, names: list[str], all_: bool = False, timeout: float | None = None) -> FreezeResult:
        return self.freezer.freeze(self.resolve(names, all_), timeout)

    def thaw(self, names: list[str], all_: bool = False) -> ThawResult:
        files = self.resolve(names, all_)
        if all_:
            open_paths = {r["path"] for r in self.state_store().open_files("freeze")}
            files = [f for f in files if f.path in open_paths] or files
        return self.freezer.thaw(files)

    def backup(self, names: list[str], all_: bool = False, to: str | None = None) -> BackupResult | BackupBatch:
        return self.backups.take_each(names, all_, to)    # one backup per database, each under its name

    def restore_in_place(self, backup_id: str, url: str | None = None) -> dict[str, Any]:
        from ..backup.backups import restore_in_place
        with self.replication.paused(), self.sync.paused(), \
                self.archive.paused(list(self.catalog.files)):   # no connection of theirs open during the swap
            return restore_in_place(self.config, self.catalog, self.contops, backup_id, url, sql=self.sql)

    def drill(self, name: str, url: str | None = None) -> dict[str, Any]:
        from ..drill import run
        try:
            return run(self.config, self.state_store(), name, url)
        finally:
            self.backups._latest.pop(name, None)    # the drill recorded a verification: status shows it now

    def status(self) -> DaemonStatus:
        dbs: list[DatabaseStatus] = []
        for name, files in sorted(self.catalog.database_names().items()):
            out: list[FileStatus] = []
            for f in files:
                exists = os.path.exists(f.path)
                state, hint = protection(f)
                out.append({
                    "path": f.path, "exists": exists, "protected": state == "protected", "state": state,
                    "hint": hint, "error": f.error,
                    "journal_mode": f.journal_mode(), "wal_bytes": f.wal_bytes() if exists else 0,
                    "delta_bytes": f.held_delta_bytes() if exists else None,
                    "main_bytes": os.stat(f.path).st_size if exists else 0,
                    "contops": self.contops.describe(f.path), "frozen": self.freezer.describe(f.path),
                })
            dbs.append({"name": name, "configured": name in self.config.databases, "files": out})
        return {
            "daemon": {"version": __version__, "pid": os.getpid(), "listen": self.config.listen,
                       "config": self.config.source, "data_dir": self.config.data_dir,
                       "started_at": iso(self.started_at), "sqlite_version": apsw.sqlite_lib_version(),
                       "interrupted_at_startup": self.startup.get("interrupted", [])},
            "databases": dbs,
            "jobs": self.scheduler.describe(),
            "backups": [self.backups.latest(name) for name in sorted(self.config.databases)],
            "archive": self.archive.status(),
            "sql": {"databases": self.sql.stats(), "open_transactions": self.sql.open_transactions()},
            "replication": self.replication.status()["databases"],
            "sync": self.sync.status()["databases"],
            "drills": self.state_store().latest_drills(),
            "alerts": sorted(self.state_store().alerts().values(), key=lambda a: a["since"]),
        }
