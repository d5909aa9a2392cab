"""Continuous operations: the main files stand still while applications keep writing.

startbu pauses writers on every file of the group at one instant, opens a read
transaction on each (the *holder*), then checkpoints each file completely.
While the holder is open no checkpoint of any process can write into the main
file, so every change goes to the WAL (the delta) and any tool can copy the
main files: the copy is the database as of startbu. endbu ends the holders and
checkpoints (the roll-in). See docs/design.md for why this is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NotRequired, TypedDict

from .catalog import Catalog
from .config import Config
from .errors import Outcome, RecoveryRefused, StateConflict
from .sqlite import DatabaseFile, Retry, pause_writers
from .sqlite import exclusive
from . import state as st
from .state import StateStore, iso as _iso

log = logging.getLogger("bastion.contops")
KIND = "contops"


class StartedFile(TypedDict):
    path: str
    database: str | None
    main_bytes: int               # the main file, which stands still until endbu
    wal_bytes: int


class StartResult(TypedDict):
    """startbu: the session and the instant the copy will be of."""
    session: str
    started_at: str
    started_at_epoch: float
    expires_at: str
    max_duration_seconds: float
    writers_paused_ms: float
    attempts: int
    latency_ms: float
    files: list[StartedFile]
    warnings: list[str]           # earlier sessions that were interrupted or expired
    verdict: Outcome
    archive: dict[str, Any]       # the WAL archive's position per file (empty without one)


class EndedFile(TypedDict):
    """One file of endbu. Without --wait the roll-in has only "started": the figures are absent."""
    path: str
    database: str | None
    session: str
    consistent: bool
    reason: str | None            # why the copy is not consistent
    roll_in: str                  # "complete", "incomplete" or "started"
    started_at: NotRequired[str]
    delta_bytes: NotRequired[int]
    roll_in_seconds: NotRequired[float]
    wal_truncated: NotRequired[bool]
    roll_in_problem: NotRequired[str | None]
    message: NotRequired[str]     # not consistent: in words


class EndResult(TypedDict):
    files: list[EndedFile]
    consistent: bool
    verdict: Outcome
    delta_bytes: int


class RecoveredFile(TypedDict):
    """One file of recover: rolled in, or (--discard-changes) back to its startbu instant."""
    path: str
    action: str                   # "rolled in" or "discarded"
    session: str | None           # None: no session (a plain roll-in)
    delta_bytes: NotRequired[int]       # rolled in
    complete: NotRequired[bool]
    back_to: NotRequired[str]           # discarded, with the discard child's own keys
    quick_check: NotRequired[str]


class RecoverResult(TypedDict):
    files: list[RecoveredFile]
    verdict: Outcome


class ContinuousOperations:
    def __init__(self, config: Config, catalog: Catalog, state: StateStore) -> None:
        self.config = config
        self.catalog = catalog
        self.state = state
        self._mutex = threading.RLock()
        self.archive: Any = None      # the daemon's WAL archive (backup.archive.Archive), if any

    # -- startbu --------------------------------------------------------------
    def start(self, files: list[DatabaseFile], max_duration: float | None = None) -> StartResult:
        t0 = time.monotonic()
        with self._mutex:
            stale = self._check_startable(files)
            self.catalog.ensure_protected(files)
            held: list[DatabaseFile] = []
            positions: dict[str, dict[str, Any]] = {}

            def step() -> None:
                # Under the pause: pin the snapshot, then every frame must reach the main
                # file, else the copy would miss committed data. Writers are paused, so
                # both orders pin the same instant; pinning first leaves the holder on a
                # read mark at the last frame rather than on "WAL fully checkpointed" (slot 0).
                # On slot 0, every application commit's automatic checkpoint would sort
                # the whole delta before finding it cannot copy anything: throughput fell
                # 5-10x as the delta grew (bench/bench_contops.py).
                for f in files:
                    f.hold()
                    held.append(f)
                # the WAL archive reads to the end and lets its checkpoint hold go meanwhile
                got, resume = self.archive.pause_for_contops([f.path for f in files]) if self.archive \
                    else ({}, lambda: None)
                positions.clear()
                positions.update(got)
                try:
                    for f in files:
                        res = f.checkpoint()
                        if res.busy:
                            raise Retry(f.path, "another process was checkpointing")
                        if not res.complete:
                            raise Retry(f.path, "a reader in another process keeps a snapshot older than the "
                                                "last commit, so the delta could not be checkpointed")
                except Retry:
                    # the next attempt must pin a fresh snapshot
                    for f in held:
                        f.release()
                    held.clear()
                    raise
                finally:
                    resume()

            try:
                paused = pause_writers(files, self.config.gate_timeout, step)
            except BaseException:
                for f in held:
                    f.release()
                raise
            try:
                entries: list[dict[str, Any]] = [
                    {"path": f.path, "database": f.database, "stamp": f.stamp().to_dict(),
                     "wal_bytes_start": f.wal_bytes()} for f in files]
            finally:
                paused_for = paused.resume()
            started = paused.since
            limit = max_duration or self.config.contops_max_duration
            try:
                sid = self.state.create_session(KIND, started + limit, entries, started)
            except BaseException:
                for f in files:
                    f.release()
                raise
            warnings = self._acknowledge(stale)
        return {
            "session": sid, "started_at": _iso(started), "started_at_epoch": started,
            "expires_at": _iso(started + limit), "max_duration_seconds": limit,
            "writers_paused_ms": round(paused_for * 1000, 3), "attempts": paused.attempts,
            "latency_ms": round((time.monotonic() - t0) * 1000, 3),
            "files": [{"path": e["path"], "database": e["database"], "main_bytes": e["stamp"]["size"],
                       "wal_bytes": e["wal_bytes_start"]} for e in entries],
            "warnings": warnings, "verdict": Outcome.OK, "archive": positions,
        }

    def _check_startable(self, files: list[DatabaseFile]) -> list[dict[str, Any]]:
        """Refuse files in a live session; return the stale (interrupted/expired) ones."""
        rows = self.state.open_files(KIND, [f.path for f in files])
        for row in rows:
            if row["status"] in (st.ACTIVE, st.ROLLING_IN):
                what = "rolling in" if row["status"] == st.ROLLING_IN else "in continuous operations"
                raise StateConflict(
                    f"{row['path']}: already {what} since {_iso(row['started_at'])} (session {row['session_id']})",
                    path=row["path"], hint="run `bastion endbu` for it first; nothing was started")
        return rows

    def _acknowledge(self, stale: list[dict[str, Any]]) -> list[str]:
        """An interrupted or expired session nobody acknowledged: say so once the new one
        has started, so an unattended nightly backup does not fail forever after one crash."""
        warnings = []
        for row in stale:
            self.state.set_file(row["session_id"], row["path"], st.ACKNOWLEDGED)
            warnings.append(f"{row['path']}: the previous session {row['session_id']} was {row['status']} "
                            f"({row['reason']}); the copy taken then was not consistent")
        return warnings

    # -- endbu ----------------------------------------------------------------
    def end(self, files: list[DatabaseFile], wait: bool = True) -> EndResult:
        with self._mutex:
            rows = {r["path"]: r for r in self.state.open_files(KIND, [f.path for f in files])}
            for f in files:
                if f.path not in rows:
                    last = self.state.last_file(KIND, f.path)
                    extra = f" (last session {last['session_id']} {last['status']})" if last else ""
                    raise StateConflict(f"{f.path}: not in continuous operations{extra}", path=f.path,
                                        hint="run `bastion startbu` before the copy and `bastion endbu` after; "
                                             "nothing was ended")
            plan: list[tuple[DatabaseFile, dict[str, Any], bool, str | None]] = []
            for f in files:
                row = rows[f.path]
                if row["status"] == st.ACTIVE and f.replaced():
                    # the copy tool read whatever file now has this name, not the one we held
                    reason: str | None = "the file was replaced on disk during continuous operations"
                    self.state.set_file(row["session_id"], f.path, st.INTERRUPTED, reason=reason)
                    f.release()
                    plan.append((f, {**row, "status": st.INTERRUPTED}, False, reason))
                elif row["status"] == st.ACTIVE:
                    # Measured while still held: once released, the application's own
                    # automatic checkpoint may roll the delta in before ours looks at it.
                    row = {**row, "held_delta_bytes": f.held_delta_bytes()}
                    self.state.set_file(row["session_id"], f.path, st.ROLLING_IN)
                    f.release()
                    plan.append((f, row, True, None))
                elif row["status"] == st.ROLLING_IN:
                    plan.append((f, row, True, None))
                else:
                    plan.append((f, row, False, row["reason"]))
        results: list[EndedFile] = []
        if wait:
            for f, row, consistent, reason in plan:
                results.append(self._roll_in(f, row, consistent, reason))
        else:
            threading.Thread(target=lambda: [self._roll_in(*p) for p in plan], daemon=True,
                             name="bastion-rollin").start()
            results = [{"path": f.path, "database": f.database, "session": row["session_id"],
                        "consistent": consistent, "reason": reason, "roll_in": "started"}
                       for f, row, consistent, reason in plan]
        consistent_all = all(r["consistent"] for r in results)
        complete_all = all(r.get("roll_in") in ("complete", "started") for r in results)
        verdict = (Outcome.OK if consistent_all and complete_all else
                   Outcome.PARTIAL if consistent_all else Outcome.FAILED)
        return {"files": results, "consistent": consistent_all, "verdict": verdict,
                "delta_bytes": sum(r.get("delta_bytes", 0) for r in results)}

    def _roll_in(self, f: DatabaseFile, row: dict[str, Any], consistent: bool, reason: str | None) -> EndedFile:
        try:
            res = f.roll_in(self.config.rollin_timeout)
        except Exception as exc:  # the file may have vanished or become unreadable
            res = {"complete": False, "delta_bytes": 0, "seconds": 0.0, "reason": str(exc)}
        status = st.ENDED if consistent else st.ACKNOWLEDGED
        self.state.set_file(row["session_id"], f.path, status, result=res)
        out: EndedFile = {"path": f.path, "database": f.database, "session": row["session_id"],
               "started_at": _iso(row["started_at"]), "consistent": consistent, "reason": reason,
               "roll_in": "complete" if res["complete"] else "incomplete",
               "delta_bytes": res["delta_bytes"] if row.get("held_delta_bytes") is None else row["held_delta_bytes"],
               "roll_in_seconds": round(res["seconds"], 6),
               "wal_truncated": res.get("wal_truncated", False)}
        if not res["complete"]:
            out["roll_in_problem"] = res.get("reason")
        if not consistent:
            out["message"] = (f"continuous operations on {f.path} was {row['status']} "
                              f"({reason}): the copy taken since startbu at {_iso(row['started_at'])} "
                              "is not consistent")
        return out

    # -- the daemon's own upkeep ----------------------------------------------
    def expire(self, now: float | None = None) -> list[str]:
        """End sessions past their maximum duration (called by the daemon every second)."""
        now = now or time.time()
        expired = []
        with self._mutex:
            for row in self.state.open_files(KIND):
                if row["status"] == st.ACTIVE and row["deadline"] <= now:
                    f = self.catalog.files.get(row["path"])
                    reason = (f"maximum duration of {row['deadline'] - row['started_at']:g} s reached at "
                              f"{_iso(row['deadline'])}; ended by the daemon")
                    self.state.set_file(row["session_id"], row["path"], st.EXPIRED, reason=reason)
                    if f is not None:
                        f.release()
                        threading.Thread(target=f.roll_in, args=(self.config.rollin_timeout,),
                                         daemon=True).start()
                    log.warning("%s: continuous operations expired: %s", row["path"], reason)
                    expired.append(row["path"])
        return expired

    def finish_interrupted_roll_ins(self, rows: list[dict[str, Any]]) -> None:
        """At start-up: endbu had released the holders (so the copy was consistent)
        but the daemon stopped during roll-in. Complete the roll-in now."""
        for r in rows:
            f = self.catalog.files.get(r["path"])
            res: dict[str, Any] = {"complete": False, "reason": "file not protected"}
            if f is not None and f.protected:
                res = f.roll_in(self.config.rollin_timeout)
            self.state.set_file(r["session_id"], r["path"], st.ENDED,
                                reason="roll-in completed after a daemon restart", result=res)

    def mark_stopped(self) -> None:
        """Daemon shutting down: active sessions lose their holders now."""
        with self._mutex:
            for row in self.state.open_files(KIND):
                if row["status"] == st.ACTIVE:
                    self.state.set_file(row["session_id"], row["path"], st.INTERRUPTED,
                                        reason=f"the daemon was stopped at {_iso(time.time())}")

    def describe(self, path: str) -> dict[str, Any] | None:
        rows = self.state.open_files(KIND, [path])
        if not rows:
            return None
        r = rows[-1]
        return {"session": r["session_id"], "status": r["status"], "since": _iso(r["started_at"]),
                "expires_at": _iso(r["deadline"]), "reason": r["reason"]}

    # -- recovery ----------------------------------------------------------------
    def recover(self, files: list[DatabaseFile], discard: bool) -> RecoverResult:
        with self._mutex:
            rows = {r["path"]: r for r in self.state.open_files(KIND, [f.path for f in files])}
            if not discard:
                for f in files:
                    if f.path in rows and rows[f.path]["status"] in (st.ACTIVE, st.ROLLING_IN):
                        raise StateConflict(f"{f.path}: in continuous operations right now", path=f.path,
                                            hint="use `bastion endbu` to end it; nothing was recovered")
                self.catalog.ensure_protected(files)
                results: list[RecoveredFile] = []
                for f in files:
                    res = f.roll_in(self.config.rollin_timeout)
                    row = rows.get(f.path)
                    if row is not None:
                        self.state.set_file(row["session_id"], f.path, st.ACKNOWLEDGED, result=res)
                    results.append({"path": f.path, "action": "rolled in",
                                    "session": row["session_id"] if row else None,
                                    "delta_bytes": res["delta_bytes"], "complete": res["complete"]})
                ok = all(r["complete"] for r in results)
                return {"files": results, "verdict": Outcome.OK if ok else Outcome.PARTIAL}
            return self._discard(files, rows)

    def _discard(self, files: list[DatabaseFile], rows: dict[str, dict[str, Any]]) -> RecoverResult:
        for f in files:
            row = rows.get(f.path)
            if row is None or row["status"] not in (st.ACTIVE, st.INTERRUPTED):
                state = row["status"] if row else "not in continuous operations"
                raise RecoveryRefused(
                    f"{f.path}: nothing to discard ({state})", path=f.path,
                    hint="--discard-changes returns a file to its startbu instant; it needs an active or "
                         "interrupted continuous-operations session")
            now = f.stamp().to_dict()
            if now != row["stamp"]:
                raise RecoveryRefused(
                    f"{f.path}: the main file was written after startbu at {_iso(row['started_at'])} "
                    f"(a checkpoint ran), so the changes since then are already in it and cannot be discarded",
                    path=f.path, details={"stamp_at_startbu": row["stamp"], "stamp_now": now},
                    hint="run `bastion recover NAME` (without --discard-changes) to keep the changes")
            if f.gated_since is not None:
                # Closing our connections below would drop the freeze's write lock while
                # its session still says frozen: a snapshot taken then would be trusted.
                raise StateConflict(f"{f.path}: frozen since {_iso(f.gated_since)}; recover --discard-changes "
                                    "would end the freeze", path=f.path,
                                    hint="run `bastion thaw` first; nothing was recovered")
        # Our own connections go first (they never checkpoint on close); the child
        # proves nobody else has the files open and keeps them locked while it works.
        for f in files:
            f.close()
        try:
            out = exclusive.discard_in_child([(f.path, rows[f.path]["stamp"]) for f in files])
        except BaseException:
            # Closing our connections ended the holders: an active session can no longer
            # promise a consistent copy, so the next endbu must say so, not "consistent".
            for f in files:
                if rows[f.path]["status"] == st.ACTIVE:
                    self.state.set_file(rows[f.path]["session_id"], f.path, st.INTERRUPTED,
                                        reason=f"recover --discard-changes released the hold at "
                                               f"{_iso(time.time())} and was refused")
            raise
        finally:
            for f in files:
                try:
                    f.protect()
                except Exception as exc:  # reported by status
                    log.warning("%s: cannot protect again after recover: %s", f.path, exc)
        results: list[RecoveredFile] = []
        for f in files:
            row = rows[f.path]
            check = f.quick_check() if f.protected else "not protected"
            self.state.set_file(row["session_id"], f.path, st.DISCARDED,
                                reason="changes since startbu discarded by recover --discard-changes",
                                result=out["files"][f.path])
            results.append({"path": f.path, "action": "discarded", "session": row["session_id"],
                            "back_to": _iso(row["started_at"]), "quick_check": check, **out["files"][f.path]})
        return {"files": results, "verdict": Outcome.OK if all(r["quick_check"] == "ok" for r in results)
                else Outcome.FAILED}
