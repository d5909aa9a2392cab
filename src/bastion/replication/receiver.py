"""The backup side: a copy of the primary's database, kept by applying its changes.

A replica is a configured database with ``replica_of`` = the primary's database name.
The copy is only ever written by :meth:`Receiver.apply` (capture.apply: one transaction
per batch per file, idempotent, refusing gaps) and replaced whole by a seed. Its own
capture is installed under a replica origin at seeding: capture.apply runs with triggers
off, so whatever that log holds afterwards was written by someone else on the copy, and
is reported as divergence. The SQL server refuses writes to it until it is promoted.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading
import time
from typing import Any, Literal, NotRequired, TypedDict, cast

import msgpack

from .. import capture
from ..fsutil import durable_json, fsync_dir
from ..errors import NotConsistent, Outcome, ReseedNeeded, StateConflict, UnknownTarget, UsageError
from ..position import Cut
from ..state import iso
from ..sqlite import connect

log = logging.getLogger("bastion.replication.receiver")
# What a copy keeps of the primary's control tables: its conflict log (an old primary's unshipped
# changes waiting for a decision must survive a seed and a failover).
KEEP = capture.NOT_CAPTURES
_SEED_ID = re.compile(r"^[0-9a-f]{8,64}$")


class _Applied(TypedDict):
    exists: bool
    applied: int | None                 # the primary's capture seq this copy has applied
    applied_at: NotRequired[str | None]
    local_changes: NotRequired[int | None]   # writes made on the copy itself, not by apply


class ReplicaFile(_Applied):
    path: str


class ReplicaStatus(TypedDict):
    """`replicate status` of a replica this daemon keeps (GET /v1/replication/status, as is)."""
    database: str
    role: Literal["replica"]
    replica_of: str | None
    promoted: bool
    primary_origin: str | None
    seeded_at: str | None
    last_apply_at: str | None
    divergence: int
    files: list[ReplicaFile]


def _crash() -> None:
    log.error("BASTION_CRASH_POINT=replica-cut-half-committed: dying between two commits of a cut")
    os.kill(os.getpid(), 9)


class Receiver:
    def __init__(self, daemon: Any, origin: str) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.origin = f"replica:{origin}"      # this copy's own capture origin (local writes)
        self.replicas = {n: d for n, d in self.config.databases.items() if d.replica_of}
        self._locks = {n: threading.Lock() for n in self.replicas}
        self.dir = os.path.join(self.config.data_dir, "replication")
        if self.replicas:
            os.makedirs(self.dir, exist_ok=True)
        self.state = {n: self._load(n) for n in self.replicas}
        self.last_apply: dict[str, float] = {}
        self._cuts: dict[str, dict[str, Any]] = {}    # the cut being received, per replica
        self.closed = False      # a cluster standby taking over: no more changes from the old primary
        # A cut a crash left half-committed is applied again now, before this daemon answers
        # anyone: the copy's files are at one instant again as soon as the daemon is back, not
        # only when the primary next asks for positions (which redoes it too, if this fails).
        for name in self.replicas:
            if not self.promoted(name) and os.path.exists(self._cut_path(name) + ".ready"):
                try:
                    self._redo(name)
                except Exception as exc:   # kept for the next try; the daemon still starts
                    log.warning("replica %s: the interrupted cut could not be applied again yet: %s", name, exc)

    # -- state (a small JSON file per replica, written durably) -------------------
    def _state_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.replica.json")

    def _load(self, name: str) -> dict[str, Any]:
        try:
            with open(self._state_path(name)) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {"promoted": False, "origin": None, "seeded_at": None}

    def _save(self, name: str) -> None:
        durable_json(self._state_path(name), self.state[name])

    def promoted(self, name: str) -> bool:
        return bool(self.state.get(name, {}).get("promoted"))

    def sql_guard(self, name: str, inner: Any) -> Any:
        """A commit guard for the SQL server: a replica is read-only until promoted."""
        def guard() -> None:
            if inner:
                inner()
            if not self.promoted(name):
                raise StateConflict(f"database {name} is a replica of {self.replicas[name].replica_of}: "
                                    "read-only until it is promoted",
                                    hint=f"on this server, `bastion replicate promote {name}` makes it writable")
        return guard

    # -- peer requests -------------------------------------------------------------
    def _local(self, primary_db: str, nfiles: int | None = None) -> str:
        names = [n for n, d in self.replicas.items() if d.replica_of == primary_db]
        if not names:
            raise UnknownTarget(f"this daemon has no replica of database {primary_db!r}",
                                hint=f"add [databases.NAME] files = [...] and replica_of = \"{primary_db}\" "
                                     "to the backup daemon's config")
        name = names[0]
        if self.closed:
            raise StateConflict(f"replica {name} is being promoted: it takes no more changes",
                                details={"promoted": True})
        if nfiles is not None and nfiles != len(self.replicas[name].files):
            raise UsageError(f"the primary's database {primary_db} has {nfiles} files, the replica {name} "
                             f"lists {len(self.replicas[name].files)}",
                             hint="list one copy path per primary file, in the same order")
        if self.promoted(name):
            raise StateConflict(f"replica {name} was promoted: it no longer takes changes from the primary",
                                details={"promoted": True},
                                hint="remove replicate_to on the old primary, or re-create the replica")
        return name

    def positions(self, primary_db: str, origin: str, nfiles: int) -> dict[str, Any]:
        name = self._local(primary_db, nfiles)
        with self._locks[name]:
            self._drop_partial(name)     # the primary starts its cut again from what is applied
            if self.state[name].get("origin") == origin:
                self._redo(name)
            st = self.state[name]
            files = []
            for path in self.replicas[name].files:
                seq = None
                if st.get("origin") == origin and os.path.exists(path):
                    seq = capture.applied_position(path, origin)
                files.append(seq)
            return {"database": name, "files": files}

    # A cut is every change of every file up to one commit boundary of the primary, sent in
    # chunks (one file each) and applied as one unit (capture.applying). Chunks before the
    # last are appended to NAME.cut; the last one makes it whole. A cut over several files is
    # first made durable (fsync, renamed NAME.cut.ready): SQLite commits WAL files one by one,
    # and after a crash between two of them the ready file is applied again (each file skips
    # what it already holds), before anything else touches the copy.
    def _cut_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.cut")

    def _drop_partial(self, name: str) -> None:
        cur = self._cuts.pop(name, None)
        if cur is not None:
            cur["fh"].close()
        try:
            os.remove(self._cut_path(name))
        except FileNotFoundError:
            pass

    def _redo(self, name: str) -> None:
        """Apply a cut that was made durable and not (wholly) applied: after a crash, first thing."""
        ready = self._cut_path(name) + ".ready"
        if os.path.exists(ready):
            origin = self.state[name].get("origin")
            log.warning("replica %s: applying again the cut of %s interrupted by a crash", name, origin)
            self._apply_file(name, ready, origin)
            os.remove(ready)       # only once applied: a failed redo is tried again, never dropped

    def _apply_file(self, name: str, path: str, origin: str | None) -> list[int | None]:
        files = self.replicas[name].files
        cons = []
        try:
            for f in files:
                cons.append(connect.app_file(f))     # the checkpointer is contops'
            crash = None
            if os.environ.get("BASTION_CRASH_POINT") == "replica-cut-half-committed":
                crash = _crash       # fault injection for the crash tests, never set in service
            with open(path, "rb") as fh, capture.applying(cons, origin or "", between_commits=crash) as apply:
                for rec in msgpack.Unpacker(fh, raw=False):
                    apply(int(rec["file"]), capture.from_wire(rec["batch"]))
            return [capture.applied_position(c, origin or "") for c in cons]
        finally:
            for c in cons:
                c.close()

    def apply(self, primary_db: str, origin: str, nfiles: int, cut: str, chunk: int, final: bool,
              index: int, batch: dict[str, Any]) -> dict[str, Any]:
        name = self._local(primary_db, nfiles)
        if not 0 <= index < nfiles:
            raise UsageError(f"file index {index} out of range")
        with self._locks[name]:
            if self.state[name].get("origin") != origin:
                raise ReseedNeeded(f"replica {name} was not seeded from {origin!r}", details={"reseed": True},
                                    hint="the primary seeds it on its own")
            self._redo(name)
            cur = self._cuts.get(name)
            if chunk == 0:
                self._drop_partial(name)
                cur = self._cuts[name] = {"id": cut, "next": 0, "files": set(),
                                          "fh": open(self._cut_path(name), "wb")}  # noqa: SIM115 - kept across chunks
            if cur is None or cur["id"] != cut or cur["next"] != chunk:
                self._drop_partial(name)
                raise StateConflict(f"replica {name}: chunk {chunk} of cut {cut} does not follow what was "
                                    "received", details={"restart": True},
                                    hint="the primary asks for the positions again and resends the cut")
            cur["fh"].write(msgpack.packb({"file": index, "batch": batch}, use_bin_type=True))
            cur["next"] += 1
            cur["files"].add(index)
            if not final:
                return {"database": name, "cut": cut, "staged": chunk}
            self._cuts.pop(name)
            fh, path = cur["fh"], self._cut_path(name)
            if len(cur["files"]) > 1:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                os.replace(path, path + ".ready")
                fsync_dir(self.dir)
                path += ".ready"
            else:
                fh.close()
            try:
                positions = self._apply_file(name, path, origin)
            finally:
                # Also on failure: an error here (a gap, a re-seed marker) would come back on
                # every redo; the primary resends from the positions each file holds.
                os.remove(path)
            self.last_apply[name] = time.time()
            return {"database": name, "cut": cut, "positions": positions}

    def _staged(self, name: str, index: int, seed_id: str) -> str:
        if not _SEED_ID.match(seed_id):
            raise UsageError(f"bad seed id {seed_id!r}")
        files = self.replicas[name].files
        if not 0 <= index < len(files):
            raise UsageError(f"file index {index} out of range")
        return f"{files[index]}.bastion-seed-{seed_id}"

    def seed_file_path(self, primary_db: str, nfiles: int, index: int, seed_id: str) -> str:
        name = self._local(primary_db, nfiles)
        path = self._staged(name, index, seed_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def seed_commit(self, primary_db: str, origin: str, seed_id: str, positions: list[Any]) -> dict[str, Any]:
        """Every staged file is here: re-mark its capture as this copy's, then swap all files in.

        ``positions``: the cut the copies were taken at, ``[{"seq", "hlc"}, ...]`` (checked first:
        a bad one changes nothing)."""
        cut = Cut.from_json(positions)
        name = self._local(primary_db, len(cut))
        db = self.replicas[name]
        with self._locks[name]:
            self._drop_partial(name)
            try:
                os.remove(self._cut_path(name) + ".ready")   # the seed replaces whatever it held
            except FileNotFoundError:
                pass
            staged = [self._staged(name, i, seed_id) for i in range(len(db.files))]
            for p in staged:
                if not os.path.isfile(p):
                    raise StateConflict(f"seed {seed_id}: {p} was not uploaded", hint="the primary retries the seed")
            for p, pos in zip(staged, cut):
                self._prepare(p, origin, pos.seq, pos.hlc)
            self._swap(name, list(zip(staged, db.files)))
            for target in db.files:     # uploads of seeds that never committed (peer died mid-seed)
                for left in glob.glob(glob.escape(target) + ".bastion-seed-*"):
                    os.remove(left)
            self.state[name] = {"promoted": False, "origin": origin, "seeded_at": time.time()}
            self._save(name)
            log.info("replica %s seeded from %s at %s", name, origin, cut)
            return {"database": name, "seeded": True, "positions": cut.to_json()}

    def _prepare(self, path: str, origin: str, seq: int, hlc: int) -> None:
        # The staged copy is not a protected file: opening it here is safe, and its WAL
        # must be rolled in before the rename (a -wal is never moved with it).
        con = connect.staged(path)
        try:
            ok = con.execute("PRAGMA quick_check").fetchall()[0][0]
            if ok != "ok":
                raise NotConsistent(f"seed copy {path} fails quick_check: {ok}", hint="the primary retries the seed")
            capture.remove(con, keep=KEEP)     # the primary's log and positions: not this copy's
            capture.install(con, self.origin)
            capture.set_applied(con, origin, seq, hlc)
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            con.close()
        for extra in (path + "-wal", path + "-shm"):
            if os.path.exists(extra):
                if extra.endswith("-wal") and os.path.getsize(extra) > 0:
                    raise NotConsistent(f"seed copy {path}: its WAL could not be rolled in")
                os.remove(extra)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _swap(self, name: str, pairs: list[tuple[str, str]]) -> None:
        from ..sqlite.exclusive import replace_in_child
        d = self.daemon
        targets = [t for _, t in pairs]
        files = [d.catalog.files[t] for t in targets if t in d.catalog.files]
        resume = d.sql.suspend(targets, f"seeding replica {name}")
        for f in files:
            f.lock.acquire()     # the sweeper must not re-protect a file between close and swap
        try:
            for f in files:
                f.close()
            swapped = replace_in_child(pairs)
            for t in targets:   # the old copy is replaced by design: do not keep it aside
                aside = swapped["files"][t]["previous_kept_as"] or ""
                for c in ("-wal", "-journal"):   # kept_as names a companion when there was no main file
                    aside = aside[:-len(c)] if aside.endswith(c) else aside
                for p in (aside, f"{aside}-wal", f"{aside}-journal") if aside else ():
                    if os.path.exists(p):
                        os.remove(p)
        finally:
            for f in files:
                try:
                    f.protect()
                except Exception:  # shown by status
                    pass
                f.lock.release()
            resume()

    # -- operator commands -----------------------------------------------------------
    def promote(self, name: str) -> dict[str, Any]:
        if name not in self.replicas:
            raise UnknownTarget(f"{name!r} is not a replica on this daemon",
                                hint="replicas: " + (", ".join(sorted(self.replicas)) or "none"))
        with self._locks[name]:
            if self.promoted(name):
                return {"database": name, "promoted": True, "already": True, "verdict": Outcome.OK}
            self._drop_partial(name)
            self._redo(name)          # a cut interrupted by a crash: every file at the same instant first
            removed = []
            for path in self.replicas[name].files:
                if os.path.exists(path) and capture.is_installed(path):
                    removed.append({"path": path, "removed": capture.remove(path, keep=KEEP)["removed"]})
            self.state[name] = {**self.state[name], "promoted": True, "promoted_at": time.time()}
            self._save(name)
            log.warning("replica %s promoted: it is now a normal writable database", name)
            return {"database": name, "promoted": True, "already": False, "capture_removed": removed,
                    "verdict": Outcome.OK}

    def status(self) -> list[ReplicaStatus]:
        out: list[ReplicaStatus] = []
        for name, db in sorted(self.replicas.items()):
            st = self.state[name]
            files = []
            for path in db.files:
                files.append(ReplicaFile(path=path, **self._file_status(path, st.get("origin"))))
            out.append({"database": name, "role": "replica", "replica_of": db.replica_of,
                        "promoted": bool(st.get("promoted")), "primary_origin": st.get("origin"),
                        "seeded_at": iso(st.get("seeded_at")), "last_apply_at": iso(self.last_apply.get(name)),
                        "divergence": sum(f.get("local_changes") or 0 for f in files), "files": files})
        return out

    @staticmethod
    def _file_status(path: str, origin: str | None) -> _Applied:
        if not os.path.exists(path):
            return {"exists": False, "applied": None}
        con = connect.reader(path, busy_ms=connect.REPORT_BUSY_MS)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
            out: _Applied = {"exists": True, "applied": None, "applied_at": None, "local_changes": None}
            if capture.APPLIED in names and origin:
                row = cast(list[tuple[int, float]],
                           con.execute(f"SELECT seq, at FROM {capture.APPLIED} WHERE origin = ?", (origin,)).fetchall())
                if row:
                    out["applied"], out["applied_at"] = row[0][0], iso(row[0][1])
            if capture.LOG in names:
                # entries in the copy's own log: writes made on the copy, not by apply
                out["local_changes"] = cast(int, con.execute(f"SELECT count(*) FROM {capture.LOG} WHERE op != 0")
                                            .fetchall()[0][0])
            return out
        finally:
            con.close()
