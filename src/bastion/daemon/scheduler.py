"""Jobs the daemon runs on its own: scheduled backups (with retention) and full verifies.

Job state lives in the state database, so a restart neither forgets a failure
nor runs a job twice. A failed run is retried with a growing back-off (capped
by the schedule's own period) and shown by `bastion status` until one succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from collections.abc import Callable, Mapping

from ..config import Config
from ..errors import Outcome
from ..schedule import Schedule
from ..state import StateStore, iso

log = logging.getLogger("bastion.scheduler")


class Job:
    def __init__(self, name: str, schedule: Schedule, run: Callable[[], Mapping[str, Any]]) -> None:
        self.name = name
        self.schedule = schedule
        self.run = run


class Scheduler:
    def __init__(self, config: Config, state: StateStore) -> None:
        self.config = config
        self.state = state
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, schedule_text: str, run: Callable[[], Mapping[str, Any]]) -> None:
        self.jobs.append(Job(name, Schedule.parse(schedule_text), run))

    def start(self) -> None:
        now = time.time()
        for job in self.jobs:
            saved = self.state.job(job.name)
            if saved is None or saved["next_run"] is None:
                self.state.save_job(job.name, next_run=job.schedule.next_after(now))
        self._thread = threading.Thread(target=self._loop, name="bastion-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for job in self.jobs:
                saved = self.state.job(job.name) or {}
                if saved.get("next_run") is not None and saved["next_run"] <= time.time():
                    self.run_now(job)

    def run_now(self, job: Job) -> None:
        started = time.time()
        try:
            result = job.run()
            if result.get("verdict", Outcome.OK) != Outcome.OK:
                raise RuntimeError(result.get("message") or f"finished: {result['verdict']}")
        except Exception as exc:  # any failure is recorded and retried
            saved = self.state.job(job.name) or {}
            failures = int(saved.get("failures") or 0) + 1
            delay = min(5.0 * 2 ** (failures - 1), max(1.0, job.schedule.interval_hint))
            msg = getattr(exc, "message", None) or str(exc)
            log.error("%s failed (%d in a row), retrying in %.0f s: %s", job.name, failures, delay, msg)
            self.state.save_job(job.name, last_run=started, last_error=msg, failures=failures,
                                next_run=time.time() + delay)
            return
        self.state.save_job(job.name, last_run=started, last_ok=time.time(), last_error=None, failures=0,
                            last_result=result, next_run=job.schedule.next_after(time.time()))

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for job in self.jobs:
            s = self.state.job(job.name) or {}
            out.append({"job": job.name, "schedule": job.schedule.text, "next_run": iso(s.get("next_run")),
                        "last_run": iso(s.get("last_run")), "last_ok": iso(s.get("last_ok")),
                        "last_error": s.get("last_error"), "failures": s.get("failures", 0)})
        return out
