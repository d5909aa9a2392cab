"""The WAL archive: the daemon copies every committed WAL frame into the repository, continuously.

One :class:`FileArchiver` (a thread) per protected file of a database with ``archive = true``.
Why no frame can be lost (docs/design.md, "WAL archive and point-in-time restore"):

- SQLite overwrites WAL frames only when it *restarts* the WAL (new salts), and it restarts only
  once every frame is checkpointed and no reader holds a read mark other than 0. The archiver
  keeps a read transaction open (``R``) at all times, so frames it has not read yet survive.
- ``R`` is only ever (re)taken while the archiver holds the write lock (``BEGIN IMMEDIATE`` on its
  own connection, ``W``) after reading the WAL to its end: at that moment nothing is unread. If
  ``R`` lands on read mark 0 (everything checkpointed), SQLite may restart the WAL at the next
  write, but only then: with ``R`` on mark 0 no later frame can be checkpointed, so no second
  restart before ``R`` moves again. A new epoch is accepted as a continuation only if the archive
  had read exactly up to where ``R`` was taken; anything else starts a new generation.
- What is committed: SQLite's own end of the WAL (``mxFrame``, reported by a PASSIVE checkpoint call
  on the archiver's connection; SQLite advances it only after the frames are written), read
  between two reads of the WAL header that must agree; each frame's salts must match the header.
  The cumulative checksums travel in the frames; restore has SQLite check the chain.

The -wal file is read with ``os.pread`` in the daemon: POSIX locks are per process and inode, and
SQLite's WAL-mode locks live on the -shm and the main file, never on the -wal, so opening and
closing the -wal drops none of them (the main file and -shm are never opened here).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import apsw

from ..errors import BastionError
from ..position import Instant
from ..sqlite import connect
from . import segment as sg
from .repository import Repository

log = logging.getLogger("bastion.archive")

WATCH = 0.01               # seconds between looks at the WAL: the precision of commit times
CHECKPOINT_FRAMES = 1000   # the archiver lets SQLite restart the WAL past this many frames (its default)
MAX_BUFFER = 256 << 20     # frames held for a repository that refuses writes; past it, a new generation


def _checksum(data: bytes, big: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum, in Python: about 0.3 ms per 4 KiB frame here, so used only for the
    header and for the frames of a look during which another process held the checkpoint lock."""
    words = struct.unpack((">" if big else "<") + f"{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def header_ok(hdr: bytes) -> bool:
    h = sg.wal_header(hdr)
    if h["magic"] not in (0x377F0682, 0x377F0683):
        return False
    return _checksum(hdr[:24], h["magic"] & 1 == 1) == struct.unpack(">2I", hdr[24:32])


def new_generation() -> str:
    return f"{Instant.now().stamp}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Pending:
    """Frames read but not yet in the repository: one epoch's, from ``start``."""
    seq: int
    wal_header: bytes
    start: int
    frames: bytearray = field(default_factory=bytearray)
    commits: list[list[Any]] = field(default_factory=list)
    end: int = 0


class FileArchiver:
    def __init__(self, path: str, database: str, name: str, repo_url: str, interval: float = 1.0,
                 checkpoint_frames: int = CHECKPOINT_FRAMES, watch: float = WATCH, repo_format: int = 1) -> None:
        self.path, self.database, self.name = path, database, name
        self.repo_url = repo_url
        self.repo_format = repo_format   # of the repository if the archive creates it (before any backup)
        self.interval, self.checkpoint_frames, self.watch = interval, checkpoint_frames, watch
        self.prefix = sg.stream(database, name)
        self.lock = threading.RLock()
        self.generation = ""
        self.epoch: tuple[int, int, int] | None = None   # (seq, salt1, salt2) of the WAL being read
        # epochs of this generation counted by the archive: SQLite's checkpoint sequence in the WAL
        # header is each connection's own count, not the file's, so it cannot order epochs
        self.epoch_no = 0
        self.wal_hdr = b""
        self.page_size = 0
        self.next = 1                                       # next WAL frame to read
        # True while R was taken with nothing unread, so that any WAL restart SQLite can do while
        # it is held destroys only frames already read (module doc): an epoch change is then safe
        self.safe = False
        self.pending: list[_Pending] = []
        self.started_reason = ""
        self.last_segment: str | None = None
        self.last_flush = 0.0
        self.busy_since = 0.0                               # the checkpoint lock was busy since then
        self.polled_at = 0.0                                # the archive had every commit as of then
        self.last_error: str | None = None
        self.lags: list[float] = []          # seconds from a commit seen to its segment durable
        self.on_segment: Callable[[str, dict[str, Any]], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._r: apsw.Connection | None = None
        self._r2: apsw.Connection | None = None              # the next R, for a handover
        self._w: apsw.Connection | None = None
        self._c: apsw.Connection | None = None
        self.repo: Repository | None = None

    # -- life ------------------------------------------------------------------------------
    def open(self) -> None:
        with self.lock:
            self.repo = Repository.open(self.repo_url, create=True, format=self.repo_format)
            op = lambda: connect.app_file(self.path, nofollow=True, checkpointer=True, busy_ms=None)  # noqa: E731
            self._r, self._r2, self._w, self._c = op(), op(), op(), op()
            # until a connection has read the database, wal_checkpoint() silently does nothing (-1, -1)
            connect.one(self._c, "SELECT count(*) FROM sqlite_schema")
            self.page_size = int(connect.one(self._c, "PRAGMA page_size"))
            self._hold()
            self._resume_or_start()
            # R was taken before anything was read: until the first handover, only a same-epoch
            # WAL is trusted (safe is False: an epoch change starts a new generation).

    def start(self) -> None:
        self.open()
        self._thread = threading.Thread(target=self._loop, name=f"bastion-archive-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        with self.lock:
            if flush:
                try:
                    if self.poll() is not None:
                        self.flush()
                        self._record_stop()
                except Exception as exc:  # the daemon is stopping: said in the log
                    log.warning("%s: archive not flushed at stop: %s", self.path, exc)
            for c in (self._r, self._r2, self._w, self._c):
                if c is not None:
                    try:
                        c.close(True)
                    except apsw.Error:
                        pass
            self._r = self._r2 = self._w = self._c = None

    def _loop(self) -> None:
        last_advance = time.monotonic()
        while not self._stop.wait(self.watch):
            try:
                with self.lock:
                    self.handover()
                    # a segment once the oldest unarchived commit is 4/5 of the interval old: with the
                    # write itself, every commit is durable in the archive within the interval (the RPO)
                    oldest = self.pending[0].commits[0][2] if self.pending and self.pending[0].commits else None
                    if oldest is not None and time.time() - oldest >= 0.8 * self.interval:
                        self.flush()
                    if time.monotonic() - last_advance >= self.interval:
                        last_advance = time.monotonic()
                        self.advance()
                self.last_error = None
            except Exception as exc:  # the loop never dies; status shows the error
                self.last_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.warning("%s: archive: %s", self.path, self.last_error)
                self._stop.wait(1.0)

    # -- the read transaction R, the write lock W --------------------------------------------
    def _hold(self, con: apsw.Connection | None = None) -> None:
        con = con or self._r
        assert con is not None
        con.execute("BEGIN")
        con.execute("SELECT count(*) FROM sqlite_schema").fetchall()

    def handover(self) -> bool:
        """Read what was committed, moving R to the end without the write lock: the next R
        begins (its snapshot is at most the end read next), everything is read, then the old R
        ends. A WAL restart SQLite may do while the new R is held can only destroy frames up to
        its snapshot, all read. An application's RESTART/TRUNCATE checkpoint, which waits for
        readers while it holds the write lock, gets through at the next handover."""
        assert self._r2 is not None
        nxt = self._r2
        self._hold(nxt)
        if self.poll() is None:
            nxt.execute("COMMIT")       # not sure of what was read: keep the old hold
            return False
        self._release()
        self._r, self._r2 = nxt, self._r
        self.safe = True
        return True

    def _release(self) -> None:
        assert self._r is not None
        if self._r.in_transaction:
            self._r.execute("COMMIT")

    @contextmanager
    def _write_lock(self, wait: float = 0.1) -> Iterator[bool]:
        """W held for the block (True), or not obtained within ``wait`` (False): a writer or a freeze has it."""
        assert self._w is not None
        deadline = time.monotonic() + wait

        def busy(_n: int) -> bool:
            time.sleep(0.0005)
            return time.monotonic() < deadline
        self._w.set_busy_handler(busy)
        try:
            self._w.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            if self._w.in_transaction:
                self._w.execute("ROLLBACK")
            yield False
            return
        try:
            yield True
        finally:
            self._w.execute("ROLLBACK")

    def advance(self) -> bool:
        """Move R to the end of the WAL (under W) so checkpoints can progress; past
        ``checkpoint_frames`` also checkpoint everything, so SQLite restarts the WAL."""
        with self.lock:
            big = self.next - 1 >= self.checkpoint_frames
            if not self._move_r(checkpoint=False):
                return False
            if big:
                assert self._c is not None
                try:      # the long part outside W: everything up to R
                    self._c.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                except apsw.BusyError:
                    return True
                self._move_r(checkpoint=True)
            return True

    def _move_r(self, checkpoint: bool) -> bool:
        assert self._c is not None
        with self._write_lock() as got:
            if not got or not self._poll_complete():
                return False
            self._release()
            try:
                if checkpoint:
                    try:
                        self._c.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                    except apsw.BusyError:
                        pass
            finally:
                self._hold()
                self.safe = True
        return True

    def _poll_complete(self, tries: int = 20) -> bool:
        for _ in range(tries):
            if self.poll() is not None:
                return True
            time.sleep(0.001)
        return False

    # -- for continuous operations: everything read, R out of the way of its checkpoint --------
    def pause_position(self) -> dict[str, Any] | None:
        """Called with every writer paused (contops gates): read to the end, release R and say
        where the file stands: a backup taken now is this position of this generation."""
        self.lock.acquire()
        if not self._poll_complete(200):
            self.lock.release()
            return None
        self._release()
        return self.position()

    def resume_after_pause(self) -> None:
        """Still under the gates (nothing unread): take R again."""
        try:
            self._hold()
            self.safe = True
        finally:
            self.lock.release()

    def position(self) -> dict[str, Any]:
        seq = self.epoch_no if self.epoch else -1
        return {"generation": self.generation, "seq": seq, "frame": self.next - 1 if self.epoch else 0}

    # -- reading the WAL ---------------------------------------------------------------------
    def _read(self, offset: int, size: int) -> bytes:
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def poll(self) -> int | None:
        """Read the frames committed since the last poll into ``pending``: their number, or None
        when this look could not be sure of what it read (tried again at the next look)."""
        assert self._c is not None
        hdr = self._read(0, sg.WAL_HEADER)
        if len(hdr) < sg.WAL_HEADER:
            self.polled_at = time.time()
            return 0                      # no WAL yet, or truncated: nothing unread (see module doc)
        try:
            mx = self._c.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)[0]
        except apsw.BusyError:
            # Another process checkpoints. Usually an automatic checkpoint, over in milliseconds:
            # look again. If it lasts, maybe a RESTART/TRUNCATE that waits for our R to move while
            # it holds the write lock: find the end as SQLite's recovery does instead (slower).
            self.busy_since = self.busy_since or time.monotonic()
            if time.monotonic() - self.busy_since < self.watch:
                return None
            mx = -1
        else:
            self.busy_since = 0.0
        # The commits below were visible before this; and, as of it, nothing past mx was committed
        # (to the few microseconds since mx was read: commit times are precise to the watch anyway).
        seen = time.time()
        h = sg.wal_header(hdr)
        ident = (h["seq"], h["salt1"], h["salt2"])
        if ident != self.epoch:
            if not header_ok(hdr) or h["page_size"] != self.page_size:
                return None               # being written: look again
            self._enter_epoch(hdr, ident)
        if mx < 0:
            mx = self._scan_end(hdr)
        if mx < self.next:
            self.polled_at = seen
            return 0
        fsz = sg.FRAME_HEADER + self.page_size
        data = self._read(sg.WAL_HEADER + (self.next - 1) * fsz, (mx - self.next + 1) * fsz)
        if len(data) != (mx - self.next + 1) * fsz or self._read(0, sg.WAL_HEADER) != hdr:
            return None
        commits = []
        for i in range(mx - self.next + 1):
            pgno, size, s1, s2 = sg.frame_header(data, i * fsz)
            if (s1, s2) != ident[1:] or pgno == 0:
                return None               # not this epoch's frame: mx was another epoch's
            if size:
                commits.append([self.next + i, size, seen])
        if not commits or commits[-1][0] != mx:
            return None
        p = self.pending[-1] if self.pending and self.pending[-1].seq == self.epoch_no else None
        if p is None:
            p = _Pending(self.epoch_no, hdr, self.next)
            self.pending.append(p)
        p.frames += data
        p.commits += commits
        p.end = mx
        self.next = mx + 1
        self.polled_at = seen
        if sum(len(x.frames) for x in self.pending) > MAX_BUFFER:
            self._start_generation("the repository refused segments for too long; frames were dropped")
        return len(commits)

    def _scan_end(self, hdr: bytes) -> int:
        """The last commit frame of the unbroken checksum chain from our position (salts and
        checksums checked frame by frame, as SQLite's recovery does)."""
        big = sg.wal_header(hdr)["magic"] & 1 == 1
        fsz = sg.FRAME_HEADER + self.page_size
        if self.next == 1:
            s0, s1 = struct.unpack(">2I", hdr[24:32])
        else:
            prev = self._read(sg.WAL_HEADER + (self.next - 2) * fsz, sg.FRAME_HEADER)
            if len(prev) < sg.FRAME_HEADER:
                return self.next - 1
            s0, s1 = struct.unpack(">2I", prev[16:24])
        data = self._read(sg.WAL_HEADER + (self.next - 1) * fsz, 256 * fsz)     # the rest at the next look
        end = self.next - 1
        for i in range(len(data) // fsz):
            off = i * fsz
            pgno, size, a, b = sg.frame_header(data, off)
            if (a, b) != struct.unpack(">2I", hdr[16:24]) or pgno == 0:
                break
            s0, s1 = _checksum(data[off:off + 8], big, s0, s1)
            s0, s1 = _checksum(data[off + sg.FRAME_HEADER:off + fsz], big, s0, s1)
            if (s0, s1) != struct.unpack_from(">2I", data, off + 16):
                break
            if size:
                end = self.next + i
        return end

    def _enter_epoch(self, hdr: bytes, ident: tuple[int, int, int]) -> None:
        if self.epoch is None:
            self.epoch, self.wal_hdr, self.next = ident, hdr, 1
            return
        if self.safe:
            # SQLite restarted the WAL while R was held with nothing unread: the chain goes on
            self.epoch, self.wal_hdr, self.next = ident, hdr, 1
            self.epoch_no += 1
            return
        self._start_generation(f"the WAL was restarted (salt {self.epoch[1]:08x} -> {ident[1]:08x}) "
                               "at a point the archive could not prove it had read up to")
        self.epoch, self.wal_hdr, self.next = ident, hdr, 1

    def _start_generation(self, reason: str) -> None:
        try:
            self.flush()
        except BastionError:
            self.pending.clear()
        self.pending.clear()
        old = self.generation
        self.generation = new_generation()
        self.started_reason = reason
        self.safe = False
        # from frame 1 of the WAL as it is now (R keeps it from restarting): the first poll adopts it
        self.epoch, self.epoch_no, self.next = None, 0, 1
        log.info("%s: archive generation %s begins: %s", self.path, self.generation, reason)
        if old:
            log.warning("%s: archive generation %s ends, %s begins: %s; point-in-time restore after this "
                        "needs a new backup", self.path, old, self.generation, reason)

    def _main_stamp(self) -> list[int]:
        st = os.stat(self.path)     # stat opens no descriptor (DESIGN.md, pitfalls)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _record_stop(self) -> None:
        """At a clean stop, everything read and flushed: the main file's stamp. If the WAL is found
        empty at the next start and the main file unchanged, nothing was committed meanwhile (a
        frame can only leave the WAL through a checkpoint, which writes the main file)."""
        assert self.repo is not None
        if self.generation and self.epoch and not self.pending:
            doc = {"epoch_no": self.epoch_no, "next": self.next, "epoch": list(self.epoch),
                   "main": self._main_stamp()}
            self.repo.store.write(f"{self.prefix}/{self.generation}/stopped.json", json.dumps(doc).encode())

    def _resume_stopped(self, last: sg.SegRef) -> bool:
        assert self.repo is not None
        name = f"{self.prefix}/{last.generation}/stopped.json"
        try:
            doc = json.loads(self.repo.store.read(name))
            ok = (doc["epoch_no"] == last.seq and doc["next"] == last.end + 1 and doc["main"] == self._main_stamp())
        except (BastionError, ValueError, KeyError, TypeError):
            return False
        self.repo.store.delete(name)
        if ok:
            self.generation, self.epoch_no, self.next = last.generation, last.seq, last.end + 1
            self.epoch = (int(doc["epoch"][0]), int(doc["epoch"][1]), int(doc["epoch"][2]))
            self.started_reason = "continued after a clean stop of the daemon (the WAL was empty)"
        return ok

    def _resume_or_start(self) -> None:
        """At open: go on with the last generation if the WAL is still the epoch it ended in and
        still holds its last frame (nothing can have been lost), else begin a new one."""
        assert self.repo is not None
        refs = sorted(r for r in map(sg.parse_name, self.repo.store.list(self.prefix)) if r)
        hdr = self._read(0, sg.WAL_HEADER)
        if refs and len(hdr) < sg.WAL_HEADER and self._resume_stopped(refs[-1]):
            return
        if refs and len(hdr) == sg.WAL_HEADER and header_ok(hdr):
            last = refs[-1]
            try:
                seg = sg.decode(last.name, self.repo.store.read(last.name))
            except BastionError:
                seg = None
            h = sg.wal_header(hdr)
            fsz = sg.FRAME_HEADER + self.page_size
            if seg is not None and seg.wal_header == hdr:
                tail = seg.frames[-fsz:-fsz + sg.FRAME_HEADER]
                if self._read(sg.WAL_HEADER + (last.end - 1) * fsz, sg.FRAME_HEADER) == tail:
                    self.generation, self.epoch_no = last.generation, last.seq
                    self.epoch = (h["seq"], h["salt1"], h["salt2"])
                    self.wal_hdr, self.next = hdr, last.end + 1
                    self.started_reason = "continued after a restart of the daemon"
                    return
        self._start_generation("the archiver started" if not refs else
                               "the archiver started and could not prove the WAL still holds what followed "
                               "the last segment")

    # -- writing segments ------------------------------------------------------------------------
    def flush(self) -> list[str]:
        """Every pending epoch's frames as a segment, durably (the store's write), oldest first."""
        assert self.repo is not None
        written = []
        while self.pending:
            p = self.pending[0]
            if not p.commits:
                self.pending.pop(0)
                continue
            header = {"format": 1, "database": self.database, "file": self.name, "generation": self.generation,
                      "seq": p.seq,
                      "wal_seq": sg.wal_header(p.wal_header)["seq"], "start": p.start, "end": p.end,
                      "page_size": self.page_size,
                      "commits": p.commits,
                      "until": self.polled_at if len(self.pending) == 1 else p.commits[-1][2]}
            name = sg.segment_name(self.prefix, self.generation, p.seq, p.start, p.end)
            self.repo.store.write(name, sg.encode(header, p.wal_header, bytes(p.frames)))
            done = time.time()
            self.lags.append(done - p.commits[0][2])
            del self.lags[:-10000]
            self.pending.pop(0)
            self.last_segment, self.last_flush = name, done
            written.append(name)
            if self.on_segment:
                self.on_segment(name, header)
        return written

    def status(self) -> dict[str, Any]:
        return {"path": self.path, "file": self.name, "generation": self.generation,
                "position": self.position() if self.generation else None, "started": self.started_reason,
                "last_segment": self.last_segment, "last_flush": self.last_flush or None,
                "pending_frames": sum(len(p.frames) for p in self.pending) // (sg.FRAME_HEADER + self.page_size)
                if self.page_size else 0, "error": self.last_error}


class Archive:
    """The daemon's archivers: one per file of every database with ``archive`` on, started with
    the daemon; a file missing at start is tried again every 10 s. Also the retention pass."""

    RETRY = 10.0
    RETENTION_EVERY = 60.0

    def __init__(self, config: Any, catalog: Any) -> None:
        self.config = config
        self.catalog = catalog
        self.archivers: dict[str, FileArchiver] = {}       # path -> its archiver
        self.errors: dict[str, str] = {}
        self._lock = threading.RLock()
        self._held: set[str] = set()                         # paths paused for a swap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def settings(self, name: str) -> tuple[bool, float, float]:
        b, db = self.config.backups, self.config.databases[name]
        on = db.archive if db.archive is not None else b.archive
        return bool(on), db.archive_interval or b.archive_interval, db.archive_retention or b.archive_retention

    def wanted(self) -> dict[str, tuple[str, str, str, float]]:
        """path -> (database, file name in backups, repository URL, interval) for every archived file."""
        from .backups import _names, default_repository
        from ..sqlite import DatabaseFile
        out = {}
        for name, db in self.config.databases.items():
            on, interval, _ = self.settings(name)
            if on and not db.replica_of:
                files = [DatabaseFile(p, name) for p in db.files]
                for f, n in zip(files, _names(files)):
                    out[f.path] = (name, n, default_repository(self.config, name), interval)
        return out

    def start(self) -> None:
        if not self.wanted():
            return
        self._start_missing()
        self._thread = threading.Thread(target=self._loop, name="bastion-archive", daemon=True)
        self._thread.start()

    def _start_missing(self) -> None:
        with self._lock:
            for path, (db, name, url, interval) in self.wanted().items():
                if path in self.archivers or path in self._held:
                    continue
                f = self.catalog.files.get(path)
                if f is None or not f.protected:
                    self.errors[path] = "not protected yet"
                    continue
                a = FileArchiver(path, db, name, url, interval, repo_format=self.config.backups.format)
                try:
                    a.start()
                except Exception as exc:  # shown by status, tried again
                    a.stop(flush=False)
                    self.errors[path] = getattr(exc, "message", None) or str(exc)
                    continue
                self.errors.pop(path, None)
                self.archivers[path] = a

    def _loop(self) -> None:
        last_retention = 0.0
        while not self._stop.wait(self.RETRY):
            try:
                self._start_missing()
                if time.monotonic() - last_retention > self.RETENTION_EVERY:
                    last_retention = time.monotonic()
                    self.retention()
            except Exception:  # never dies
                log.exception("archive upkeep")

    def retention(self) -> list[dict[str, Any]]:
        from .pitr import prune_archive
        out = []
        for a in list(self.archivers.values()):
            assert a.repo is not None
            out.append(prune_archive(a.repo, a.database, a.name, self.settings(a.database)[2]))
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        with self._lock:
            for a in self.archivers.values():
                a.stop()
            self.archivers.clear()

    @contextmanager
    def paused(self, paths: list[str]) -> Iterator[None]:
        """The archivers of ``paths`` closed (flushed) for the block: a swap of the files needs
        nobody holding them. They start again after, in a new generation if the WAL moved on."""
        with self._lock:
            for p in paths:
                self._held.add(p)
                a = self.archivers.pop(p, None)
                if a is not None:
                    a.stop()
        try:
            yield
        finally:
            with self._lock:
                self._held.difference_update(paths)
            self._start_missing()

    # -- backups ------------------------------------------------------------------------------
    def pause_for_contops(self, paths: list[str]) -> tuple[dict[str, dict[str, Any]], Callable[[], None]]:
        """Under continuous operations' gates: each archiver reads to the end and lets go of its
        read transaction (else the checkpoint could not complete). Returns the positions and
        the function that takes the read transactions again (still under the gates)."""
        positions: dict[str, dict[str, Any]] = {}
        paused: list[FileArchiver] = []
        for p in paths:
            a = self.archivers.get(p)
            if a is None:
                continue
            pos = a.pause_position()
            if pos is not None:
                positions[p] = pos
                paused.append(a)

        def resume() -> None:
            for a in paused:
                a.resume_after_pause()
        return positions, resume

    def record_base(self, repo: Repository, database: str, backup_id: str, instant: float,
                    positions: dict[str, dict[str, Any]]) -> bool:
        """After the backup's manifest: flush the segments up to its positions, then record it as
        a base. False (and nothing recorded) unless every file of it is archived into ``repo``."""
        from .pitr import record_base
        named = {}
        for path, pos in positions.items():
            a = self.archivers.get(path)
            if a is None or a.repo is None or a.repo.url != repo.url or a.generation != pos["generation"]:
                return False
            with a.lock:
                a.flush()
            named[a.name] = pos
        want = [p for p, w in self.wanted().items() if w[0] == database]
        if not named or len(named) != len(want):
            return False
        record_base(repo, backup_id, database, instant, named)
        return True

    def status(self) -> list[dict[str, Any]]:
        out = [dict(a.status(), database=a.database) for a in self.archivers.values()]
        out += [{"path": p, "error": e} for p, e in self.errors.items() if p not in self.archivers]
        return out
