"""One protected SQLite file and the daemon's connections to it.

Three connections per file, each with one job, so that no step has to wait for
another's transaction to end:

* anchor: opened when the file is protected and kept open, so the last
  application to close the file does not delete its WAL; during continuous
  operations it holds the read transaction that pins the main file.
* gate: takes the write lock (``BEGIN IMMEDIATE``) to pause writers.
* checkpointer: runs checkpoints (roll-in).

All three are opened with checkpoint-on-close disabled: closing one of the
daemon's connections must never write to an application's database.
"""

from __future__ import annotations

import os
import random
import stat as _stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import apsw

from ..errors import FileProblem, StateConflict
from . import connect


def wal_path(path: str) -> str:
    return path + "-wal"


def shm_path(path: str) -> str:
    return path + "-shm"


@dataclass(frozen=True)
class FileStamp:
    """What stat says of a main file: any write through write(2) changes mtime and ctime."""
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, path: str) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def to_dict(self) -> dict[str, int]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns, "ino": self.ino}


@dataclass
class CheckpointResult:
    wal_frames: int
    checkpointed: int
    busy: bool = False

    @property
    def complete(self) -> bool:
        return not self.busy and self.checkpointed >= self.wal_frames


def _open(path: str) -> apsw.Connection:
    # The daemon never writes application data through these connections, but
    # if it ever did, it must not run an automatic checkpoint behind our back.
    return connect.app_file(path, nofollow=True, checkpointer=True, busy_ms=None)


def _open_ready(path: str) -> apsw.Connection:
    """A connection that has read the database once. Until it has, SQLite does not
    know the file is in WAL mode and wal_checkpoint() silently does nothing (-1, -1)."""
    conn = _open(path)
    conn.execute("PRAGMA schema_version").fetchall()
    return conn


def check_file(path: str) -> None:
    """Raise FileProblem unless ``path`` is an existing, non-empty regular file (checked with stat only)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file", path=path,
                          hint="check the path; Bastion protects existing SQLite databases and never creates them"
                          ) from None
    except OSError as exc:
        raise FileProblem(f"{path}: cannot stat: {exc.strerror}", path=path) from None
    if not _stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{path}: not a regular file", path=path, hint="name the SQLite database file itself")
    if st.st_size == 0:
        raise FileProblem(f"{path}: the file is empty, not yet a SQLite database", path=path,
                          hint="let the application create its database first")


class DatabaseFile:
    """A SQLite file under the daemon's protection."""

    def __init__(self, path: str, database: str | None = None) -> None:
        self.path = path
        self.database = database
        self.lock = threading.RLock()
        self._anchor: apsw.Connection | None = None
        self._gate: apsw.Connection | None = None
        self._ckpt: apsw.Connection | None = None
        self.error: str | None = None
        self.page_size = 0
        self.holding_since: float | None = None
        self.gated_since: float | None = None
        self.identity: tuple[int, int] | None = None   # (st_dev, st_ino) of the file we hold open

    # -- protection -----------------------------------------------------
    @property
    def protected(self) -> bool:
        return self._anchor is not None

    def replaced(self) -> bool:
        """The path no longer names the file our connections hold open (an application or an
        administrator put another file in its place, or removed it)."""
        if self.identity is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    def protect(self, wal_timeout: float = 10.0) -> None:
        """Open the anchor and switch the file to WAL mode; idempotent. A file replaced on
        disk since it was protected is let go and the new one protected instead: otherwise
        the daemon would hold (and "protect") a file nobody uses any more."""
        with self.lock:
            if self._anchor is not None and self.replaced() and self.holding_since is None \
                    and self.gated_since is None:
                self.close()
            if self._anchor is not None:
                return
            try:
                check_file(self.path)
                conn = _open(self.path)
            except FileProblem as exc:
                self.error = exc.message
                raise
            except apsw.Error as exc:
                self.error = f"cannot open: {exc}"
                raise FileProblem(f"{self.path}: cannot open as SQLite: {exc}", path=self.path) from None
            try:
                conn.setbusytimeout(2000)
                try:
                    self.page_size = int(connect.one(conn, "PRAGMA page_size"))
                    conn.execute("PRAGMA schema_version").fetchall()
                except apsw.NotADBError:
                    raise FileProblem(f"{self.path}: not a SQLite database", path=self.path,
                                      hint="name the application's SQLite database file, not another file") from None
                except apsw.BusyError:
                    raise FileProblem(
                        f"{self.path}: cannot switch to WAL mode now: another connection holds an exclusive "
                        "lock in rollback-journal mode", path=self.path,
                        hint="retry when the application is idle, or have it open the database with "
                             "PRAGMA journal_mode=WAL once") from None
                mode = self._switch_to_wal(conn, wal_timeout)
                if mode != "wal":
                    raise FileProblem(
                        f"{self.path}: cannot switch to WAL mode now (journal mode stays {mode!r}): another "
                        f"connection kept it busy in rollback-journal mode for {wal_timeout:g} s", path=self.path,
                        hint="retry when the application is idle, or have it open the database with "
                             "PRAGMA journal_mode=WAL once")
                # Read once in WAL mode: only then does the anchor open the WAL and keep its
                # shared locks. Until it has, an application could switch the file back to a
                # rollback journal (seen: PRAGMA journal_mode=DELETE succeeded right after protect).
                conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            except BaseException as exc:
                conn.close()
                self.error = getattr(exc, "message", str(exc))
                raise
            conn.setbusytimeout(0)
            st = os.stat(self.path)
            self.identity = (st.st_dev, st.st_ino)
            self._anchor = conn
            self.error = None

    @staticmethod
    def _switch_to_wal(conn: apsw.Connection, timeout: float) -> str:
        """journal_mode=WAL needs an exclusive lock for an instant. Against a writer in
        rollback mode SQLite returns BUSY at once (its busy handler would deadlock), so
        retry in short, jittered steps until a gap between the application's transactions."""
        deadline = time.monotonic() + timeout
        mode = "unknown"
        conn.setbusytimeout(0)
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]).lower()
                if mode == "wal":
                    return mode
            except apsw.BusyError:
                mode = "delete"
            if time.monotonic() >= deadline:
                return mode
            time.sleep(random.uniform(0.0005, 0.003))

    def close(self) -> None:
        """Close every connection (never checkpoints: see _open)."""
        with self.lock:
            for name in ("_gate", "_ckpt", "_anchor"):
                conn = getattr(self, name)
                if conn is not None:
                    try:
                        conn.close(True)
                    except apsw.Error:
                        pass
                    setattr(self, name, None)
            self.holding_since = None
            self.gated_since = None

    def _need(self) -> apsw.Connection:
        if self._anchor is None:
            raise FileProblem(f"{self.path}: not protected" + (f" ({self.error})" if self.error else ""),
                              path=self.path)
        return self._anchor

    def journal_mode(self) -> str | None:
        with self.lock:
            if self._anchor is None:
                return None
            try:
                return str(self._anchor.execute("PRAGMA journal_mode").fetchall()[0][0]).lower()
            except apsw.Error:
                return None

    def wal_bytes(self) -> int:
        try:
            return os.stat(wal_path(self.path)).st_size
        except FileNotFoundError:
            return 0

    def stamp(self) -> FileStamp:
        return FileStamp.of(self.path)

    # -- checkpoints ------------------------------------------------------
    def checkpoint(self, mode: int = apsw.SQLITE_CHECKPOINT_PASSIVE, busy_ms: int = 0) -> CheckpointResult:
        with self.lock:
            self._need()
            if self._ckpt is None:
                self._ckpt = _open_ready(self.path)
            self._ckpt.setbusytimeout(busy_ms)
            try:
                nlog, nckpt = self._ckpt.wal_checkpoint(mode=mode)
            except apsw.BusyError:
                return CheckpointResult(-1, -1, busy=True)
            if nlog < 0:
                raise FileProblem(f"{self.path}: not in WAL mode any more, cannot checkpoint", path=self.path,
                                  hint="something switched the journal mode; restart the daemon to protect it again")
            return CheckpointResult(nlog, nckpt)

    def roll_in(self, timeout: float, truncate_busy_ms: int = 0) -> dict[str, Any]:
        """Checkpoint until every frame that is in the WAL now is in the main file.

        Applications may keep writing: we are done once the frames present at the
        start are backfilled (or the WAL restarted, which SQLite only does once
        everything was backfilled). Then try once to truncate the WAL."""
        start = time.monotonic()
        target = None
        delay = 0.002
        while True:
            res = self.checkpoint()
            if not res.busy:
                if target is None:
                    target = res.wal_frames
                if res.checkpointed >= min(target, res.wal_frames) or res.wal_frames < target:
                    break
            if time.monotonic() - start > timeout:
                return {"complete": False, "delta_bytes": self._frames_bytes(target or 0),
                        "seconds": time.monotonic() - start, "wal_truncated": False,
                        "reason": "a reader in another process kept an old snapshot open"}
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        delta = self._frames_bytes(target)
        done = time.monotonic() - start
        trunc = self.checkpoint(apsw.SQLITE_CHECKPOINT_TRUNCATE, busy_ms=truncate_busy_ms)
        return {"complete": True, "delta_bytes": delta, "seconds": done,
                "wal_truncated": not trunc.busy and trunc.wal_frames == 0}

    def held_delta_bytes(self) -> int | None:
        """During continuous operations: bytes of the delta (WAL frames written since startbu).
        A PASSIVE checkpoint cannot move anything while we hold the snapshot, so asking it
        for the frame count changes nothing. Outside a hold we do not ask (it would checkpoint)."""
        with self.lock:
            if self.holding_since is None:
                return None
            # Busy while an application's automatic checkpoint holds the checkpoint lock:
            # during a hold that attempt finds nothing to copy and ends within microseconds.
            for _ in range(50):
                res = self.checkpoint()
                if not res.busy:
                    return self._frames_bytes(res.wal_frames - res.checkpointed)
                time.sleep(0.001)
            return None

    def _frames_bytes(self, frames: int) -> int:
        """Bytes of the delta: WAL frames (page + 24-byte header) as SQLite counts them;
        the WAL file itself may be larger, as SQLite reuses it from the start."""
        return frames * (self.page_size + 24) if frames > 0 else 0

    # -- the read transaction that pins the main file -----------------------
    def hold(self) -> None:
        with self.lock:
            conn = self._need()
            if self.holding_since is not None:
                return
            conn.execute("BEGIN")
            # Reading page 1 starts the read transaction: from here on no
            # checkpoint of any process can write past this snapshot.
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            self.holding_since = time.time()

    def release(self) -> None:
        with self.lock:
            if self._anchor is None or self.holding_since is None:
                return
            try:
                self._anchor.execute("COMMIT")
            except apsw.Error:
                pass
            self.holding_since = None

    # -- the write lock that pauses writers ---------------------------------
    def gate_begin(self, busy_ms: int) -> None:
        with self.lock:
            self._need()
            if self.gated_since is not None:
                # One gate per file: a second BEGIN IMMEDIATE on it fails with an SQLError
                # (an internal error for the user), e.g. startbu while the file is frozen.
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.gated_since))
                raise StateConflict(f"{self.path}: writers are already held since {since} (frozen)",
                                    path=self.path, hint="run `bastion thaw` (or wait for the freeze to "
                                                         "time out) and retry; nothing was started")
            if self._gate is None:
                self._gate = _open_ready(self.path)
            # Poll every half millisecond rather than SQLite's default back-off, which
            # sleeps ever longer and can miss every gap between a busy writer's commits;
            # and retry ourselves, as SQLite skips the busy handler in some lock states.
            deadline = time.monotonic() + max(0, busy_ms) / 1000

            def busy(_: int) -> bool:
                time.sleep(0.0005)
                return time.monotonic() < deadline
            self._gate.set_busy_handler(busy)
            while True:
                try:
                    self._gate.execute("BEGIN IMMEDIATE")
                    break
                except apsw.BusyError:
                    if self._gate.in_transaction:
                        self._gate.execute("ROLLBACK")
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.0005)
            self.gated_since = time.time()

    def gate_end(self) -> None:
        with self.lock:
            if self._gate is None or self.gated_since is None:
                return
            try:
                self._gate.execute("ROLLBACK")
            except apsw.Error:
                pass
            self.gated_since = None

    def quick_check(self) -> str:
        """PRAGMA quick_check through the checkpointer connection ('ok' when sound)."""
        with self.lock:
            self._need()
            if self._ckpt is None:
                self._ckpt = _open_ready(self.path)
            rows = self._ckpt.execute("PRAGMA quick_check").fetchall()
            return "; ".join(str(r[0]) for r in rows)


