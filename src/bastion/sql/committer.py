"""Group commit: many transactions, one fsync.

Server connections commit with ``synchronous=NORMAL``: the WAL frames are written
but not synced. A committed transaction then waits here until an fsync of the WAL
that began after its commit has finished; the first waiter does the fsync for
everyone committed so far (leader/followers), so concurrent clients share fsyncs.
Isolation is untouched: each transaction committed on its own, in SQLite's order.

Only the -wal file is opened here. SQLite keeps no POSIX locks on it, so closing
our descriptor cannot drop a lock (DESIGN.md's pitfall is about the main file and
-shm). An fsync error is sticky: once the kernel has reported a write failure, no
later fsync can prove earlier data durable, so every waiter from then on fails.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..errors import BastionError


class GroupCommitter:
    """``busy``: whether a transaction holds the write lock now (it will commit soon). The
    leader waits up to ``gather`` seconds for such commits before its fsync, so that one
    fsync covers them rather than the next one (fewer fsyncs under load; none of this wait
    when no one else is writing)."""

    def __init__(self, paths: list[str], busy: Callable[[], bool] | None = None, gather: float = 0.002) -> None:
        self.wals = [p + "-wal" for p in paths]
        self.busy, self.gather = busy, gather
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._more = threading.Condition(lock)      # a commit came in (the gathering leader wakes)
        self._committed = 0
        self._synced = 0
        self._syncing = False
        self._error: str | None = None
        self.fsyncs = 0
        self.batches: dict[int, int] = {}   # commits made durable by one fsync -> how often (/metrics)

    def committed(self) -> int:
        """Called right after a COMMIT returned: the ticket to wait for."""
        with self._cond:
            self._committed += 1
            self._more.notify()
            return self._committed

    def wait_durable(self, ticket: int) -> None:
        with self._cond:
            while self._synced < ticket:
                if self._error:
                    break
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                if self.busy is not None:
                    until = time.monotonic() + self.gather
                    while self.busy() and (left := until - time.monotonic()) > 0:
                        self._more.wait(left)
                target = self._committed
                self._cond.release()
                try:
                    err = self._fsync()
                finally:
                    self._cond.acquire()
                    self._syncing = False
                if err:
                    self._error = err
                else:
                    n = target - self._synced
                    self.batches[n] = self.batches.get(n, 0) + 1
                    self._synced = max(self._synced, target)
                    self.fsyncs += 1
                self._cond.notify_all()
            if self._error:
                raise BastionError(f"commit not durable: {self._error}",
                                   hint="the disk reported a write error; check the machine and restart the daemon")

    def _fsync(self) -> str | None:
        for wal in self.wals:
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                continue        # no WAL: nothing written to that file since it was last reset
            try:
                os.fsync(fd)
            except OSError as exc:
                return f"fsync of {wal} failed: {exc.strerror}"
            finally:
                os.close(fd)
        return None
