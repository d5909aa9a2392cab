"""Freeze and thaw: the VSS-writer way of taking a consistent snapshot.

Freeze pauses writers on every file of the group (their write lock is held;
writers wait in their busy handler, readers go on) until thaw or until the
timeout, when the daemon thaws on its own and reports the freeze as failed.
The long work, a checkpoint, runs before the hold; under the hold only the
few frames written meanwhile are checkpointed, so the main files alone are
complete when possible (``main_file_complete``), and main file plus WAL always are.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NotRequired, TypedDict

from .catalog import Catalog
from .config import Config
from .errors import Outcome, StateConflict, UsageError
from .sqlite import DatabaseFile, pause_writers
from . import state as st
from .state import StateStore, iso as _iso

log = logging.getLogger("bastion.freeze")
KIND = "freeze"


class FrozenFile(TypedDict):
    path: str
    database: str | None
    main_file_complete: bool      # every committed frame is in the main file (False under contops)


class FreezeResult(TypedDict):
    freeze: str
    frozen_at: str
    frozen_at_epoch: float
    timeout_seconds: float
    thaw_by: str
    pause_ms: float
    files: list[FrozenFile]
    warnings: list[str]           # earlier freezes that timed out or were interrupted
    verdict: Outcome


class ThawedFile(TypedDict):
    """One file of thaw: its hold time, or (the freeze had failed) why a snapshot is not trusted."""
    path: str
    freeze: str
    consistent: bool
    hold_seconds: NotRequired[float]
    status: NotRequired[str]
    reason: NotRequired[str | None]
    message: NotRequired[str]


class ThawResult(TypedDict):
    files: list[ThawedFile]
    consistent: bool
    verdict: Outcome
    hold_seconds: float           # the longest hold


class Freezer:
    def __init__(self, config: Config, catalog: Catalog, state: StateStore) -> None:
        self.config = config
        self.catalog = catalog
        self.state = state
        self._mutex = threading.RLock()
        self._timers: dict[str, threading.Timer] = {}

    def freeze(self, files: list[DatabaseFile], timeout: float | None = None) -> FreezeResult:
        timeout = self.config.freeze_timeout if timeout is None else timeout
        if not 0 < timeout <= 3600:
            raise UsageError(f"--timeout must be between 0 and 3600 seconds, got {timeout:g}",
                             hint="a freeze holds every writer; keep it short")
        with self._mutex:
            warnings = []
            for row in self.state.open_files(KIND, [f.path for f in files]):
                if row["status"] == st.ACTIVE:
                    raise StateConflict(f"{row['path']}: already frozen since {_iso(row['started_at'])} "
                                        f"(freeze {row['session_id']})", path=row["path"],
                                        hint="run `bastion thaw` first; nothing was frozen")
                self.state.set_file(row["session_id"], row["path"], st.ACKNOWLEDGED)
                warnings.append(f"{row['path']}: the previous freeze {row['session_id']} was {row['status']} "
                                f"({row['reason']})")
            self.catalog.ensure_protected(files)
            for f in files:                      # the long work, before the hold
                if f.holding_since is None:
                    f.checkpoint()
            t_request = time.monotonic()
            paused = pause_writers(files, self.config.gate_timeout)
            try:
                complete = {}
                for f in files:                  # only what was written since: short
                    if f.holding_since is not None:
                        complete[f.path] = False  # continuous operations pins the main file
                    else:
                        complete[f.path] = f.checkpoint().complete
                sid = self.state.create_session(
                    KIND, paused.since + timeout,
                    [{"path": f.path, "database": f.database, "wal_bytes_start": f.wal_bytes()} for f in files],
                    paused.since, {"timeout": timeout})
            except BaseException:
                paused.resume()
                raise
            timer = threading.Timer(max(0.0, paused.since + timeout - time.time()), self._time_out, (sid,))
            timer.daemon = True
            self._timers[sid] = timer
            timer.start()
        return {"freeze": sid, "frozen_at": _iso(paused.since), "frozen_at_epoch": paused.since,
                "timeout_seconds": timeout, "thaw_by": _iso(paused.since + timeout),
                "pause_ms": round((time.monotonic() - t_request) * 1000, 3),
                "files": [{"path": f.path, "database": f.database, "main_file_complete": complete[f.path]}
                          for f in files],
                "warnings": warnings, "verdict": Outcome.OK}

    def thaw(self, files: list[DatabaseFile]) -> ThawResult:
        with self._mutex:
            rows = {r["path"]: r for r in self.state.open_files(KIND, [f.path for f in files])}
            for f in files:
                if f.path not in rows:
                    last = self.state.last_file(KIND, f.path)
                    extra = f" (last freeze {last['session_id']} {last['status']})" if last else ""
                    raise StateConflict(f"{f.path}: not frozen{extra}", path=f.path,
                                        hint="nothing was thawed")
            results: list[ThawedFile] = []
            now = time.time()
            # Every writer goes on at once: a state write (an fsync) between two files would
            # keep an application that writes both waiting that long after the first thaw.
            for f in files:
                if rows[f.path]["status"] == st.ACTIVE:
                    f.gate_end()
            for f in files:
                row = rows[f.path]
                if row["status"] == st.ACTIVE:
                    held = now - row["started_at"]
                    self.state.set_file(row["session_id"], f.path, st.THAWED, result={"hold_seconds": held})
                    results.append({"path": f.path, "freeze": row["session_id"], "consistent": True,
                                    "hold_seconds": round(held, 6)})
                else:
                    self.state.set_file(row["session_id"], f.path, st.ACKNOWLEDGED)
                    if row["status"] == st.TIMED_OUT:
                        when = f"a snapshot taken after {_iso(row['ended_at'])} may be inconsistent"
                    else:  # the daemon died at an unknown moment of the hold (ended_at is the restart)
                        when = (f"a snapshot taken under this freeze (since {_iso(row['started_at'])}) "
                                "cannot be trusted")
                    results.append({"path": f.path, "freeze": row["session_id"], "consistent": False,
                                    "status": row["status"], "reason": row["reason"],
                                    "message": f"the freeze of {f.path} failed: {row['reason']}; {when}"})
            still = {r["session_id"] for r in self.state.open_files(KIND) if r["status"] == st.ACTIVE}
            for sid in {r["freeze"] for r in results} - still:
                timer = self._timers.pop(sid, None)
                if timer:
                    timer.cancel()
            ok = all(r["consistent"] for r in results)
            return {"files": results, "consistent": ok, "verdict": Outcome.OK if ok else Outcome.FAILED,
                    "hold_seconds": max((r.get("hold_seconds", 0.0) for r in results), default=0.0)}

    def _time_out(self, sid: str) -> None:
        with self._mutex:
            self._timers.pop(sid, None)
            for row in self.state.open_files(KIND):
                if row["session_id"] == sid and row["status"] == st.ACTIVE:
                    f = self.catalog.files.get(row["path"])
                    if f is not None:
                        f.gate_end()
                    reason = (f"held for its timeout of {row['deadline'] - row['started_at']:g} s without a thaw; "
                              f"thawed automatically at {_iso(time.time())}")
                    self.state.set_file(sid, row["path"], st.TIMED_OUT, reason=reason)
                    log.warning("%s: freeze timed out: %s", row["path"], reason)

    def thaw_all_for_shutdown(self) -> None:
        with self._mutex:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            for row in self.state.open_files(KIND):
                if row["status"] == st.ACTIVE:
                    f = self.catalog.files.get(row["path"])
                    if f is not None:
                        f.gate_end()
                    self.state.set_file(row["session_id"], row["path"], st.INTERRUPTED,
                                        reason=f"the daemon was stopped at {_iso(time.time())} during the freeze")

    def describe(self, path: str) -> dict[str, Any] | None:
        rows = self.state.open_files(KIND, [path])
        if not rows:
            return None
        r = rows[-1]
        return {"freeze": r["session_id"], "status": r["status"], "since": _iso(r["started_at"]),
                "thaw_by": _iso(r["deadline"]), "reason": r["reason"]}
