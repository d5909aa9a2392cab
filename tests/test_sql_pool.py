"""The SQL server's connection pool under bursts (group commit answers commits in bursts)."""

from __future__ import annotations

import sqlite3
import time

from bastion.config import SQLSettings
from bastion.sql.service import POOL_IDLE, Database


def test_a_burst_keeps_its_connections_until_they_stay_idle(tmp_path):
    path = tmp_path / "p.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(x)")
    con.close()
    db = Database("p", [str(path)], "durable", True, SQLSettings(pool_size=2, threads=6))
    burst = [db.acquire(False) for _ in range(8)]       # more at once than pool_size
    for c in burst:
        db.release(c, False)
    # the next burst finds them open (up to one per worker thread), none reopened
    again = [db.acquire(False) for _ in range(6)]
    assert set(map(id, again)) <= set(map(id, burst))
    for c in again:
        db.release(c, False)
    db.trim(time.monotonic())                           # not idle long enough: all kept
    assert sum(1 for c in burst if _open(c)) == 6
    db.trim(time.monotonic() + POOL_IDLE + 1)          # idle too long: back to pool_size
    assert sum(1 for c in burst if _open(c)) == 2
    db.close_idle()
    assert not any(_open(c) for c in burst)


def _open(c) -> bool:
    try:
        c.execute("SELECT 1").fetchall()
        return True
    except Exception:
        return False
