"""The daemon's own state database: what must survive a daemon crash.

Continuous-operations and freeze sessions are written here (synchronous=FULL)
before the daemon answers, so a daemon that restarts after kill -9 knows which
copies were interrupted and can say so to the next endbu or thaw.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import uuid
from typing import Any, overload
from collections.abc import Iterable

import apsw
from .sqlite import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT) STRICT;
CREATE TABLE IF NOT EXISTS daemon_runs(
    id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, started_at REAL NOT NULL, stopped_at REAL) STRICT;
CREATE TABLE IF NOT EXISTS sessions(
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('contops', 'freeze')),
    started_at REAL NOT NULL,
    deadline REAL NOT NULL,
    daemon_run INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}') STRICT;
CREATE TABLE IF NOT EXISTS session_files(
    session_id TEXT NOT NULL REFERENCES sessions(id),
    path TEXT NOT NULL,
    database TEXT,
    status TEXT NOT NULL,
    stamp TEXT NOT NULL DEFAULT '{}',
    wal_bytes_start INTEGER NOT NULL DEFAULT 0,
    ended_at REAL,
    reason TEXT,
    result TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (session_id, path)) STRICT;
CREATE INDEX IF NOT EXISTS session_files_open ON session_files(path, status);
CREATE TABLE IF NOT EXISTS jobs(
    name TEXT PRIMARY KEY,
    next_run REAL,
    last_run REAL,
    last_ok REAL,
    last_error TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    last_result TEXT NOT NULL DEFAULT '{}') STRICT;
CREATE TABLE IF NOT EXISTS adhoc_files(path TEXT PRIMARY KEY, added_at REAL NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS drills(
    id INTEGER PRIMARY KEY, database TEXT NOT NULL, started_at REAL NOT NULL, ok INTEGER NOT NULL,
    result TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS alerts(
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL, since REAL NOT NULL,
    message TEXT NOT NULL, notified_at REAL) STRICT;
"""
FORMAT_VERSION = "1"

# File statuses. "open" ones still need an endbu/thaw/recover to be acknowledged.
ACTIVE = "active"            # holder/gate in place
ROLLING_IN = "rolling_in"    # endbu released the holder, roll-in under way
ENDED = "ended"              # endbu completed; copy consistent
INTERRUPTED = "interrupted"  # daemon stopped while active: copy not consistent
EXPIRED = "expired"          # max duration reached: ended by the daemon
TIMED_OUT = "timed_out"      # freeze hit its timeout and thawed on its own
THAWED = "thawed"
ACKNOWLEDGED = "acknowledged"  # an interrupted/expired/timed-out session reported to the user
DISCARDED = "discarded"        # recover --discard-changes put the file back at its startbu instant
OPEN_STATUSES = (ACTIVE, ROLLING_IN, INTERRUPTED, EXPIRED, TIMED_OUT)


@overload
def iso(t: float) -> str: ...
@overload
def iso(t: float | None) -> str | None: ...
def iso(t: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with milliseconds, as every Bastion output shows times."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def epoch(text: str | None) -> float | None:
    """The inverse of iso(): Bastion's ISO 8601 UTC times ('2024-05-01T10:00:00.123Z') -> epoch seconds;
    None for no time or text that is not one."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StateStore:
    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "state.db")
        self._lock = threading.RLock()
        self._db = connect.state_db(self.path)
        with self._db:
            self._db.execute(SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='format'").fetchall()
            if not row:
                self._db.execute("INSERT INTO meta VALUES('format', ?)", (FORMAT_VERSION,))
            elif row[0][0] != FORMAT_VERSION:
                from .errors import ConfigError
                raise ConfigError(f"{self.path}: state format {row[0][0]} is not supported by this Bastion "
                                  f"(format {FORMAT_VERSION})", hint="use the Bastion version that wrote it")
        self.run_id = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, tuple(args))
            try:
                names = [d[0] for d in cur.getdescription()]
            except apsw.ExecutionCompleteError:
                return []
            return [dict(zip(names, r)) for r in cur.fetchall()]

    # -- daemon runs --------------------------------------------------------
    def begin_run(self, pid: int) -> dict[str, Any]:
        """Record this daemon's start; sessions left open by a previous run are marked
        interrupted (their locks died with that process). Returns what was found."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute("UPDATE daemon_runs SET stopped_at=? WHERE stopped_at IS NULL", (now,))
            self._db.execute("INSERT INTO daemon_runs(pid, started_at) VALUES(?, ?)", (pid, now))
            self.run_id = self._db.last_insert_rowid()
            interrupted = self._rows(
                "SELECT sf.session_id, sf.path, s.kind FROM session_files sf JOIN sessions s ON s.id=sf.session_id "
                "WHERE sf.status=? AND s.daemon_run<>?", (ACTIVE, self.run_id))
            self._db.execute(
                "UPDATE session_files SET status=?, ended_at=?, reason=? WHERE status=? AND session_id IN "
                "(SELECT id FROM sessions WHERE daemon_run<>?)",
                (INTERRUPTED, now, "the daemon stopped while this session was open; detected at restart",
                 ACTIVE, self.run_id))
            rolling = self._rows("SELECT session_id, path FROM session_files WHERE status=?", (ROLLING_IN,))
        return {"interrupted": interrupted, "rolling_in": rolling}

    def end_run(self) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE daemon_runs SET stopped_at=? WHERE id=?", (time.time(), self.run_id))

    # -- sessions -----------------------------------------------------------
    def create_session(self, kind: str, deadline: float, files: list[dict[str, Any]],
                       started_at: float, detail: dict[str, Any] | None = None) -> str:
        sid = f"{kind[:1]}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started_at))}-{uuid.uuid4().hex[:6]}"
        with self._lock, self._db:
            self._db.execute("INSERT INTO sessions(id, kind, started_at, deadline, daemon_run, detail) "
                             "VALUES(?,?,?,?,?,?)",
                             (sid, kind, started_at, deadline, self.run_id, json.dumps(detail or {})))
            for f in files:
                self._db.execute(
                    "INSERT INTO session_files(session_id, path, database, status, stamp, wal_bytes_start) "
                    "VALUES(?,?,?,?,?,?)",
                    (sid, f["path"], f.get("database"), ACTIVE, json.dumps(f.get("stamp", {})),
                     int(f.get("wal_bytes_start", 0))))
        return sid

    def set_file(self, sid: str, path: str, status: str, reason: str | None = None,
                 result: dict[str, Any] | None = None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE session_files SET status=?, ended_at=?, reason=coalesce(?, reason), "
                "result=coalesce(?, result) WHERE session_id=? AND path=?",
                (status, time.time(), reason, json.dumps(result) if result is not None else None, sid, path))

    def open_files(self, kind: str, paths: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Session files of ``kind`` still waiting for endbu/thaw (any open status)."""
        marks = ",".join("?" * len(OPEN_STATUSES))
        rows = self._rows(
            f"SELECT sf.*, s.kind, s.started_at, s.deadline, s.daemon_run FROM session_files sf "
            f"JOIN sessions s ON s.id=sf.session_id WHERE s.kind=? AND sf.status IN ({marks}) "
            f"ORDER BY s.started_at", (kind, *OPEN_STATUSES))
        wanted = set(paths) if paths is not None else None
        out = []
        for r in rows:
            if wanted is not None and r["path"] not in wanted:
                continue
            r["stamp"] = json.loads(r["stamp"])
            r["result"] = json.loads(r["result"])
            out.append(r)
        return out

    def last_file(self, kind: str, path: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT sf.*, s.started_at, s.deadline FROM session_files sf JOIN sessions s ON s.id=sf.session_id "
            "WHERE s.kind=? AND sf.path=? ORDER BY s.started_at DESC LIMIT 1", (kind, path))
        if not rows:
            return None
        r = rows[0]
        r["stamp"] = json.loads(r["stamp"])
        r["result"] = json.loads(r["result"])
        return r

    def recent_files(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest session files of any kind, newest first: the dashboard's event history."""
        return self._rows(
            "SELECT sf.session_id, sf.path, sf.database, sf.status, sf.reason, sf.ended_at, s.kind, s.started_at "
            "FROM session_files sf JOIN sessions s ON s.id=sf.session_id "
            "ORDER BY coalesce(sf.ended_at, s.started_at) DESC LIMIT ?", (int(limit),))

    # -- scheduled jobs --------------------------------------------------------
    def job(self, name: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM jobs WHERE name=?", (name,))
        if not rows:
            return None
        rows[0]["last_result"] = json.loads(rows[0]["last_result"])
        return rows[0]

    def save_job(self, name: str, **fields: Any) -> None:
        if "last_result" in fields:
            fields["last_result"] = json.dumps(fields["last_result"])
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO jobs(name) VALUES(?)", (name,))
            for k, v in fields.items():
                self._db.execute(f"UPDATE jobs SET {k}=? WHERE name=?", (v, name))

    # -- files named by path rather than by a configured database -----------
    def add_adhoc(self, path: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO adhoc_files VALUES(?, ?)", (path, time.time()))

    def adhoc_files(self) -> list[str]:
        return [r["path"] for r in self._rows("SELECT path FROM adhoc_files ORDER BY path")]

    # -- recovery drills (bastion.drill) and open alerts (bastion.notify) ----------
    def save_drill(self, database: str, started_at: float, ok: bool, result: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO drills(database, started_at, ok, result) VALUES(?,?,?,?)",
                             (database, started_at, int(ok), json.dumps(result, default=str)))
            # keep the last 100 per database: enough for a trend, bounded
            self._db.execute("DELETE FROM drills WHERE database=? AND id NOT IN (SELECT id FROM drills "
                             "WHERE database=? ORDER BY id DESC LIMIT 100)", (database, database))

    def drills(self, database: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
        where, args = ("WHERE database=?", (database,)) if database else ("", ())
        rows = self._rows(f"SELECT result FROM drills {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [json.loads(r["result"]) for r in rows]

    def latest_drills(self) -> dict[str, dict[str, Any]]:
        rows = self._rows("SELECT database, result FROM drills WHERE id IN (SELECT max(id) FROM drills "
                          "GROUP BY database)")
        return {r["database"]: json.loads(r["result"]) for r in rows}

    def alerts(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self._rows("SELECT * FROM alerts")}

    def open_alert(self, key: str, kind: str, subject: str, message: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO alerts(key, kind, subject, since, message) VALUES(?,?,?,?,?)",
                             (key, kind, subject, time.time(), message))

    def alert_notified(self, key: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE alerts SET notified_at=? WHERE key=?", (time.time(), key))

    def close_alert(self, key: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM alerts WHERE key=?", (key,))
