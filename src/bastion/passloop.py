"""A background thread that runs passes on a schedule: real-time backup's shipper, sync's syncer.

Schedules (schedule.Timing): ``continuous`` (a pass as soon as the last one sent
something, else every ``poll`` seconds), ``every N``, ``manual`` (only on :meth:`run_now`),
and blackout windows (checked by the pass itself). A pass that fails is retried with a
growing back-off; the configured ``on_failure`` command runs once per streak of failures.
The loop never dies: the last error is kept for status.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from .errors import BastionError, Outcome
from .state import iso

if TYPE_CHECKING:
    from .schedule import Timing

log = logging.getLogger("bastion.passloop")


class LoopFields(TypedDict):
    """LoopStatus as the status pages show it (spread into a shipper's and a syncer's status)."""
    state: str
    last_error: str | None
    last_error_at: str | None
    failures: int
    last_success_at: str | None


@dataclass(frozen=True)
class LoopStatus:
    """The part of a replicated or synced database's status that the loop keeps: its state,
    the failure streak and when it last failed and worked (epoch seconds; ISO in to_dict)."""

    state: str
    failures: int
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None

    def to_dict(self) -> LoopFields:
        """The keys `replicate status` and `sync status` have always shown."""
        return {"state": self.state, "last_error": self.last_error, "last_error_at": iso(self.last_error_at),
                "failures": self.failures, "last_success_at": iso(self.last_success_at)}


class PassLoop:
    """Subclasses implement :meth:`_cycle` (one pass; ``"more": True`` in its result runs the
    next one at once) and may override :meth:`_after_pass` and :meth:`_after_failure`."""

    poll = 0.05
    max_backoff = 30.0     # seconds between attempts after failures in a row (doubling from 0.5 s)

    def __init__(self, name: str, what: str, timing: Timing, on_failure: Any, failure_env: dict[str, str]) -> None:
        self.name = name
        self.what = what                   # "replication of NAME to PEER": for logs
        self.timing = timing
        self.on_failure = on_failure
        self.failure_env = failure_env
        self.state = "starting"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failures = 0                  # in the current streak
        self.last_success_at: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0
        self._served = 0
        self._last_result: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self.pass_lock = threading.Lock()  # held during a pass: a pause of the daemon takes it

    def loop_status(self) -> LoopStatus:
        # error and state before the count, as the loop writes them (see _loop)
        return LoopStatus(self.state, self.failures, self.last_error, self.last_error_at, self.last_success_at)

    # -- to implement ---------------------------------------------------------------------
    def _cycle(self) -> dict[str, Any]:
        raise NotImplementedError

    def _progress(self) -> None:
        """The peer answered, inside a pass that may go on for a while: the failure streak is over."""
        if self.failures:
            log.warning("%s works again after %d failures", self.what, self.failures)
            self.failures = 0
        self.last_success_at = time.time()

    def _after_pass(self) -> None:
        """Runs after every pass, failed or not, still under pass_lock."""

    def _after_failure(self) -> None:
        """Forget what a failure may have made stale (the peer's positions, installs)."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, thread_name: str) -> None:
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def run_now(self, timeout: float = 300.0) -> dict[str, Any]:
        """Run a pass now (any schedule) and return its result."""
        with self._cond:
            self._requested += 1
            want = self._requested
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._served < want:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise BastionError(f"{self.what}: no pass finished within {timeout:g} s",
                                       hint="see the status command for the last error")
                self._cond.wait(min(left, 1.0))
            return dict(self._last_result)

    def requested(self) -> bool:
        """Whether someone waits in :meth:`run_now` for the pass under way (it must be whole)."""
        with self._cond:
            return self._requested > self._served

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                serving = self._requested
            manual = serving > self._served
            if self.timing.mode == "manual" and not manual:
                self.state = "waiting (manual)"
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            delay = {"continuous": self.poll, "every": self.timing.every, "manual": 0}[self.timing.mode]
            try:
                with self.pass_lock:
                    try:
                        result = self._cycle()
                    finally:
                        self._after_pass()
                self._progress()
                result["verdict"] = Outcome.OK
                if result.get("more"):
                    delay = 0
            except Exception as exc:  # the loop never dies; status shows the error
                self._after_failure()
                # error and state before the count: a status read in between must not show a
                # failure count with the state of the pass before
                self.last_error = exc.message if isinstance(exc, BastionError) else f"{type(exc).__name__}: {exc}"
                self.last_error_at = time.time()
                self.state = "failing"
                self.failures += 1
                log.warning("%s failed (%d in a row): %s", self.what, self.failures, self.last_error)
                if self.failures == 1:
                    self._notify()
                delay = min(self.max_backoff, 0.25 * 2 ** min(self.failures, 8))
                result = {"database": self.name, "error": self.last_error, "verdict": Outcome.FAILED}
            with self._cond:
                self._last_result = result
                self._served = serving
                self._cond.notify_all()
            if delay:
                self._wake.wait(delay)
            self._wake.clear()

    def _notify(self) -> None:
        cmd = self.on_failure
        if not cmd:
            return
        env = {**self.failure_env, "BASTION_ERROR": self.last_error or ""}
        # in its own thread (the pass loop goes on): its output and exit code go to the daemon log
        from . import hooks
        threading.Thread(target=hooks.run, args=(cmd, f"on_failure command of {self.what}", env),
                         kwargs={"timeout": 120}, name="bastion-on-failure", daemon=True).start()
