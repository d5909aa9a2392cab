"""Change capture: control tables and triggers inside the application's own database.

Applications keep writing with any SQLite library and never load Bastion, so what
runs in their process is plain SQL over SQLite's built-ins (checked with SQLite
3.40, the system library here, under ``PRAGMA trusted_schema=OFF``). Everything
Bastion adds is named ``_bastion_*``; :func:`remove` takes all of it away.

Control tables
--------------
``_bastion_log``      every captured entry, in position order: ``seq`` (its rowid), ``hlc``,
                      ``op`` (1 insert, 2 update, 3 delete, 4 DDL, 5 re-seed marker, 0 the
                      install mark), ``tbl`` (which table shape) and ``c0, c1, ...``: the new
                      row's values (insert, update), then the old key (update, delete);
                      for DDL and markers, ``c0`` holds the SQL or the reason.
``_bastion_tables``   table shapes: name, value columns, key columns, column list, CREATE text.
                      A schema change gives a table a new shape id; rows logged under the old
                      id keep the name and columns they were logged with.
``_bastion_meta``     origin id, format, the schema last seen (objects + ``schema_version``).
``_bastion_applied``  on a copy: the last position applied, per origin.

Triggers
--------
Three ``AFTER`` row triggers per table, each one ``INSERT`` into ``_bastion_log`` in the
application's own transaction: a rollback (whole, to a savepoint, or of a failed
statement) takes the log row with it. The position is the rowid SQLite gives the new
row, last + 1: writers take turns (one write transaction per file at a time), so
positions are gap-free and follow commit order. The clock is read from the last log
row in the same statement, so one page (the log's last) is all capture adds to a
transaction; :func:`prune` always keeps that last row. (A first design, one log per
table plus a one-row clock table, dirtied three more pages per transaction; the bank
workload of bench/bench_capture.py then kept only 0.4-0.5 of its write rate.)

Encoding: none. The ``c`` columns have no declared type (no affinity), so ``NEW.x`` is
stored as the very value SQLite holds: same storage class, same bytes. Measured
before choosing, on SQLite 3.40 and 20,000 random doubles: ``quote()`` lost 7 (and
writes -0.0 as 0.0), ``json_array()`` lost 18,833 (15 digits), ``printf('%!.17g')``
lost 36; ``quote()`` and ``length()`` also stop text at its first NUL. Native values
are exact for every type (1 stays integer, 1.0 real, text with NULs or invalid UTF-8
stays text, a blob stays a blob) and cost the application nothing to encode. SQLite
turns NaN into NULL before any trigger sees it. Text that is not valid UTF-8 is read
back as :class:`RawText` (its bytes) and written with ``CAST(? AS TEXT)``.

Keys: a rowid table is keyed by its rowid (its INTEGER PRIMARY KEY column if it has
one, else whichever of ``rowid``/``_rowid_``/``oid`` no column shadows), and the rowid
travels with the row, so a copy has the same rowids and the same rowid-ordered
digests. A WITHOUT ROWID table is keyed by its PRIMARY KEY. Generated columns are
not captured (the copy computes them). Virtual tables cannot carry triggers: install
and refresh list them under ``uncaptured``.

Positions and clock
-------------------
``seq`` counts every entry of this database. ``hlc`` is a hybrid logical clock packed
in one integer, ``unix_ms << 16 | counter``; each entry takes ``max(last + 1, now << 16)``,
so it never goes back when the wall clock does, and two sites order by (hlc, origin).
``now`` is ``julianday('now')`` in ms (SQLite keeps the time as integer ms).

Applying
--------
:func:`apply` replays a batch on a copy in one ``BEGIN IMMEDIATE`` transaction, in
order: insert and update write the whole row with ``INSERT OR REPLACE`` (an update
that moved the key first deletes the old key), delete deletes by key. ``OR REPLACE``
also removes the rows the source removed silently by its own REPLACE conflict
resolution (no trigger fires for those). The applying connection runs with triggers
disabled (``SQLITE_DBCONFIG_ENABLE_TRIGGER``) and foreign keys off: nothing it writes
is captured as a local change, and the copy's application triggers and cascades do
not run a second time (their effects were captured at the source as rows).
``_bastion_applied`` moves in the same transaction: a batch sent twice changes
nothing, and a batch that does not follow the recorded position is refused.

Schema changes
--------------
DDL bumps ``PRAGMA schema_version``. :func:`read_changes` compares it, in the read
transaction it reads the log in, with the one recorded, and runs :func:`refresh`
first if it moved. Refresh compares the schema with the one recorded and logs, at the
next positions, the DDL a copy must run: new table (``CREATE TABLE``, then its rows as
inserts: no trigger saw them), new column (``ALTER TABLE ... ADD COLUMN`` cut out of
the new ``CREATE TABLE`` text, then every row logged before as a whole-row update: the
old triggers could not see the column), table or column renamed, table dropped, index,
view or trigger created, dropped or changed. What DDL cannot replay logs a re-seed
marker instead, and :func:`apply` stops there (:class:`ReseedNeeded`): a table rebuilt
(dropped and created again, e.g. to change its key), columns dropped or changed, a
UNIQUE index dropped (the copy would delete rows that break it), a ``VACUUM`` while
tables without INTEGER PRIMARY KEY are captured (it may renumber their rowids).
SQLite refuses ``ALTER TABLE DROP COLUMN`` on a column a trigger reads: an application
cannot drop a captured column while capture is installed. Seed copies with a page
copy (backup API, file copy under continuous operations), never ``VACUUM INTO``.
"""

from .apply import applied_position, apply, applying, set_applied
from .control import (APPLIED, FORMAT, HLC_SHIFT, LOG, META, NOT_CAPTURES, NOW_MS_SQL, OP_DDL, OP_DELETE, OP_INSERT,
                      OP_MARK, OP_RESEED, OP_UPDATE, PREFIX, TABLES, ApplyResult, Change, InstallResult, Position,
                      RawText, RefreshResult, ReseedNeeded, installed, meta, own_ddl, set_meta)
from .log import (from_wire, install, is_installed, origin_of, pending, position, prune, read_changes, read_entries,
                  refresh, remove, status, to_wire)
from .schema import Shape, follow_schema
from .sqltools import delete_sql, exists, quote, same_values, upsert_sql

__all__ = [
    # the change log and applying it (replication, failover)
    "APPLIED", "FORMAT", "HLC_SHIFT", "LOG", "META", "NOT_CAPTURES", "NOW_MS_SQL", "OP_DDL", "OP_DELETE",
    "OP_INSERT", "OP_MARK", "OP_RESEED", "OP_UPDATE", "PREFIX", "TABLES", "ApplyResult", "Change", "InstallResult",
    "Position", "RawText", "RefreshResult", "ReseedNeeded", "Shape", "applied_position", "applying", "apply",
    "from_wire", "install", "is_installed", "origin_of", "pending", "position", "prune", "read_changes", "refresh",
    "remove", "set_applied", "status", "to_wire",
    # what sync builds on: the meta record, entries read in the caller's transaction, the schema
    # follower, and SQL text helpers
    "delete_sql", "exists", "follow_schema", "installed", "meta", "own_ddl", "quote", "read_entries",
    "same_values", "set_meta", "upsert_sql",
]
