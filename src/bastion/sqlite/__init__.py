"""The one place that opens SQLite database files: :mod:`.connect` holds every opener (an
application's file, a reader or immutable snapshot, a staged copy, the daemon's state database)
and says why each sets what it sets; :mod:`.dbfile` keeps a protected file's connections,
:mod:`.pause` pauses writers, :mod:`.exclusive` proves exclusive access in a child process.

Everything here knows the pitfalls in DESIGN.md: POSIX locks belong to the
process, so nothing in the daemon ``open()``s a database file (we only
``stat`` it, and do raw file work in child processes); one SQLite library
(apsw) in the daemon; and a daemon connection never checkpoints on close.
"""

from .dbfile import DatabaseFile, wal_path, shm_path
from .pause import Retry, pause_writers, PausedWriters

__all__ = ["DatabaseFile", "PausedWriters", "Retry", "pause_writers", "shm_path", "wal_path"]
