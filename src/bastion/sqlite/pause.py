"""Pausing every writer of a group of files at one instant.

Writers are paused by taking each file's write lock (``BEGIN IMMEDIATE``). An
application that writes several files in one transaction holds one lock while
it waits for the next: so only the first lock is waited for; each further one
briefly, and on failure every lock taken is released and the whole set retried
in another order (ours may be the reverse of the application's) after a short,
jittered back-off, until the deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import logging

import apsw

from ..errors import BusyError
from .dbfile import DatabaseFile

log = logging.getLogger("bastion.pause")


class Retry(Exception):
    """Raised by a step run under the pause to ask for release, back off and retry."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass
class PausedWriters:
    files: list[DatabaseFile]
    since: float        # time.time() when the last lock was taken
    attempts: int
    wait_seconds: float  # how long it took to pause them

    def resume(self) -> float:
        """Release the write locks (reverse order); returns how long writers were held."""
        for f in reversed(self.files):
            f.gate_end()
        return time.time() - self.since


# Per group of files, the order that last took every lock: usually the applications' own
# order, so trying it first spares them the deadlock-and-retry dance (each retry stalls them).
_last_order: dict[tuple[str, ...], list[str]] = {}


def pause_writers(files: Sequence[DatabaseFile], timeout: float,
                  step: Callable[[], None] | None = None, first_lock: float = 1.0,
                  next_lock: float = 0.02) -> PausedWriters:
    """Take every file's write lock, run ``step`` under them, and return them held.

    The first lock may be waited for (``first_lock``): that is an ordinary writer
    queueing. Each further lock is waited for only ``next_lock``: a writer that
    holds it may be waiting for a lock we already have (a transaction over
    several files), so we let go quickly instead of deadlocking it."""
    base = sorted(files, key=lambda f: f.path)
    key = tuple(f.path for f in base)
    known = _last_order.get(key)
    if known:
        base = sorted(base, key=lambda f: known.index(f.path))
    started = time.monotonic()
    deadline = started + timeout
    attempt = 0
    backoff = 0.001
    while True:
        attempt += 1
        held: list[DatabaseFile] = []
        # We do not know in which order the application locks its files: if ours is
        # the opposite, each side holds what the other waits for. So the order
        # changes from one attempt to the next: sorted (or the last that worked),
        # reversed, then shuffled.
        if attempt == 1:
            ordered = base
        elif attempt == 2:
            ordered = base[::-1]
        else:
            ordered = random.sample(base, len(base))
        try:
            for f in ordered:
                remaining = max(0.0, deadline - time.monotonic())
                wait = first_lock if not held else next_lock
                try:
                    f.gate_begin(int(1000 * min(wait, remaining)))
                except apsw.BusyError:
                    raise Retry(f.path, "writer") from None
                held.append(f)
            # Writers are paused from here: the step's time counts in what resume() reports.
            locked_at = time.time()
            if step is not None:
                step()
            _last_order[key] = [f.path for f in held]
            return PausedWriters(held, locked_at, attempt, time.monotonic() - started)
        except Retry as exc:
            for f in reversed(held):
                f.gate_end()
            log.debug("pause attempt %d: %s: %s (held %d)", attempt, exc.path, exc.reason, len(held))
            if time.monotonic() >= deadline:
                if exc.reason == "writer":
                    raise BusyError(
                        f"{exc.path}: writers did not pause within {timeout:g} s ({attempt} attempts): "
                        "a transaction in another process kept its write lock",
                        path=exc.path,
                        hint="retry when the application is less busy, or raise [contops] gate_timeout") from None
                raise BusyError(
                    f"{exc.path}: {exc.reason} ({attempt} attempts in {timeout:g} s)", path=exc.path,
                    hint="end long-running read transactions in the application, or retry later") from None
            time.sleep(min(backoff * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, 0.25)
        except BaseException:
            for f in reversed(held):
                f.gate_end()
            raise
