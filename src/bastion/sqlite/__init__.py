"""The one place that opens SQLite database files.

Everything here knows the pitfalls in DESIGN.md: POSIX locks belong to the
process, so nothing in the daemon ``open()``s a database file (we only
``stat`` it, and do raw file work in child processes); one SQLite library
(apsw) in the daemon; and a daemon connection never checkpoints on close.
"""

from .dbfile import DatabaseFile, wal_path, shm_path
from .pause import Retry, pause_writers, PausedWriters

__all__ = ["DatabaseFile", "PausedWriters", "Retry", "pause_writers", "shm_path", "wal_path"]
