"""Group commit: many transactions, one fsync.

Server connections commit with ``synchronous=NORMAL``: the WAL frames are written
but not synced. A committed transaction takes a ticket (its place in commit order,
while it still holds the writer turn) and, once it has given back the writer turn
and its connection, waits until an fsync of the WAL that began after its commit has
finished. One syncer thread per database does those fsyncs back to back while anyone
waits: each covers every commit counted when it began, and the commits that land
during it are covered by the next one, which starts at once (no timer, no gathering
wait, never two fsyncs of one database at a time). So under load each fsync covers
what the server committed during the previous one, and the CPU keeps committing while
the disk syncs. A waiter is woken only by the fsync that covers it.
Isolation is untouched: each transaction committed on its own, in SQLite's order.

Only the -wal file is opened here, once per fsync (not per commit). SQLite keeps no
POSIX locks on it, so closing our descriptor cannot drop a lock (DESIGN.md's pitfall
is about the main file and -shm); reopening by name also follows the file if it was
replaced (a database restored in place), which a descriptor kept open would not.
An fsync error is sticky: once the kernel has reported a write failure, no later
fsync can prove earlier data durable, so every waiter from then on fails.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ..errors import BastionError

log = logging.getLogger("bastion.sql")

# fdatasync, as SQLite itself syncs its WAL: the data and the metadata needed to read it back
# (the size), without an inode timestamp update
_datasync = getattr(os, "fdatasync", os.fsync)


class GroupCommitter:
    IDLE_EXIT = 5.0     # seconds without a waiter before the syncer thread ends (the next wait starts one)

    def __init__(self, paths: list[str]) -> None:
        self.wals = [p + "-wal" for p in paths]
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)     # the syncer sleeps here while nobody waits
        self._committed = 0
        self._synced = 0
        self._waiters: list[tuple[int, Callable[[str | None], None]]] = []     # (ticket, when durable)
        self._syncer: threading.Thread | None = None
        self._error: str | None = None
        self.fsyncs = 0
        self.batches: dict[int, int] = {}   # commits made durable by one fsync -> how often (/metrics)

    def committed(self) -> int:
        """Called right after a COMMIT returned, writer turn still held: the ticket to wait for."""
        with self._lock:
            self._committed += 1
            return self._committed

    def wait_durable(self, ticket: int) -> None:
        """Return once an fsync that began after commit ``ticket`` has finished (raise if none can)."""
        gate = threading.Lock()
        gate.acquire()
        if not self.when_durable(ticket, lambda _: gate.release()):
            gate.acquire()      # released by the fsync that covers this ticket (or by a failure)
        self.check()

    def when_durable(self, ticket: int, done: Callable[[str | None], None]) -> bool:
        """Call ``done(None)`` once commit ``ticket`` is durable, ``done(why)`` if it cannot be;
        from the syncer thread, or at once in this one (then the answer is True)."""
        with self._lock:
            if self._synced < ticket and not self._error:
                self._waiters.append((ticket, done))
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_loop, name="bastion-group-commit",
                                                    daemon=True)
                    self._syncer.start()
                else:
                    self._work.notify()
                return False
            err = self._error
        done(err)
        return True

    def check(self) -> None:
        if self._error:
            raise self.failure(self._error)

    @staticmethod
    def failure(why: str) -> BastionError:
        return BastionError(f"commit not durable: {why}",
                            hint="the disk reported a write error; check the machine and restart the daemon")

    def _sync_loop(self) -> None:
        with self._lock:
            while True:
                if not any(t > self._synced for t, _ in self._waiters):
                    if not self._work.wait(self.IDLE_EXIT) and not self._waiters:
                        self._syncer = None
                        return
                    continue
                target = self._committed
                self._lock.release()
                try:
                    err = self._fsync()
                except Exception as exc:  # a dead syncer would leave every waiter hanging
                    err = f"{type(exc).__name__}: {exc}"
                finally:
                    self._lock.acquire()
                if err:
                    self._error = err
                    covered, self._waiters = self._waiters, []
                else:
                    n = target - self._synced
                    self.batches[n] = self.batches.get(n, 0) + 1
                    self._synced = target
                    self.fsyncs += 1
                    covered = [w for w in self._waiters if w[0] <= target]
                    self._waiters = [w for w in self._waiters if w[0] > target]
                self._lock.release()
                try:
                    for _, done in covered:
                        try:
                            done(err)
                        except Exception:  # one waiter's failure must not leave the others hanging
                            log.exception("group commit: acknowledging a commit failed")
                finally:
                    self._lock.acquire()

    def _fsync(self) -> str | None:
        for wal in self.wals:
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                continue        # no WAL: nothing written to that file since it was last reset
            except OSError as exc:
                return f"cannot open {wal} to fsync it: {exc.strerror}"
            try:
                _datasync(fd)
            except OSError as exc:
                return f"fsync of {wal} failed: {exc.strerror}"
            finally:
                os.close(fd)
        return None
