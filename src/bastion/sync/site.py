"""n-way sync of one SQLite file: the state a site keeps, and the operations on it.

Every file of a synced database is synced on its own (like replication). A site id
(``"paris"``) is also the capture origin of the file: change capture (capture.py) logs
every local change with a gap-free position and a hybrid logical clock value
(``hlc = unix_ms << 16 | counter``); sync turns that log into versions of rows that
sites exchange, and decides, when two sites changed the same row without seeing each
other's change, which version stays (policy.py). The losing version is recorded, never
dropped.

Control tables (named ``_bastion_sync_*`` / ``_bastion_conflicts``: capture.remove drops them)
-------------------------------------------------------------------------------------
``_bastion_sync_meta``    site id, format, ``ingested``: the last capture position read.
``_bastion_sync_rows``    per row ever changed since install (table, key = msgpack of the key
                          values): its current version (hlc, origin, deleted), ``vv``: the
                          highest hlc per origin of every version of that row seen here (a
                          version vector per row), and ``siblings``: versions that lost a
                          conflict here and that nothing seen here has superseded yet
                          (with their values). A row never changed has no entry.
``_bastion_sync_log``     every change known here, local and remote, in arrival order
                          (``lseq``): origin, ``oseq`` (that origin's gap-free number), hlc,
                          op, shape (-> ``_bastion_sync_shapes``: table, columns, key
                          columns), key, values (capture's values, msgpack, exact for every
                          type), base (the row's version at the origin when it was made)
                          and ``ctx`` (the row's ``vv`` at the origin then). Kept for
                          forwarding to other sites until every peer holds it.
``_bastion_sync_seen``    per origin: the highest oseq held here (contiguous), its hlc, and
                          how far the log of that origin was pruned.
``_bastion_sync_peers``   per peer site and origin: the highest oseq the peer is known to hold.
``_bastion_conflicts``    every conflict: when, table, key, policy, outcome, both versions
                          (hlc, origin, deleted or values), and how it was resolved.

Algorithm
---------
*Ingest* (inside every operation's write transaction) reads capture's log after
``ingested`` and appends each local row change to the sync log with the next local oseq:
its ctx is the row's ``vv`` here, so a local change supersedes every version this site
has seen of the row (the application wrote on top of what it saw). An update that moved
the key is a delete of the old key then an upsert of the new one. Capture's DDL entries
go out as ``ddl`` changes; a capture re-seed marker stops sync (the site needs a new
snapshot). Capture's log is then pruned up to what was ingested.

*Sending* (:func:`changes_for`) returns the log entries the peer lacks (oseq above its
vector for their origin) in arrival order. A site logs a change only after everything
it had seen when the change was made, so arrival order is causal, and a prefix of it
(``limit``) keeps each origin contiguous and every change after its causes.
:func:`changes_for_wire` returns the same as :func:`to_wire` puts it without decoding the
log's blobs: a batch carries each change's key, values, ctx, counters and refs packed as
its origin logged them, and the receiver logs them as they came.

*Applying* (:func:`apply`) runs one ``BEGIN IMMEDIATE`` transaction with triggers and
foreign keys off (nothing applied is captured again; the application's triggers and
cascades ran at the origin and came as rows). Per change: a duplicate (oseq already
seen) is skipped; a gap is refused. For a row change X:

- if the row's ``vv`` here already covers X (``vv[X.origin] >= X.hlc``), something seen
  here was made after X: X is superseded and the table keeps its row;
- else the *frontier* is X plus the current version and siblings that X's ctx does not
  cover (versions X's site had not seen). Frontier of one: X follows everything here,
  it is applied. Otherwise it is a conflict: the policy picks the winner among the
  frontier (for lww, the highest (hlc, origin)); the table gets the winner's values, the
  rest stay as siblings, and the conflict is recorded with both versions (nothing is
  recorded when both hold the same values).

Each site therefore holds, per row, the policy's winner among the versions that no other
version it has seen supersedes: the same set on every site once they have seen the same
changes, whatever the order, so sites converge for any policy that is an order (lww,
priority, update_delete). Comparing only the row's current version with the change's
base is not enough beyond lww: a site that never saw a losing version may build on the
winner, and the loser must then be weighed against that new version, not dropped.

A change that a later change of the batch replaces (the same row, the same origin, made
on top of it: its ctx covers it) is logged but not weighed: the set of versions nothing
supersedes, hence the row, ends the same, and a counter column carries the origin's whole
delta in the later change (only plain changes: see ``SiteState._replaced_in_batch``).

Every change received is logged and counted in ``seen`` (losers too: other sites must
get them). At the end of the batch, the clock of the file moves past the highest hlc
received (the HLC receive rule): the next local change orders after every change seen.
A site whose clock runs an hour ahead wins concurrent lww conflicts, but every change
made anywhere after seeing its changes orders after them.

*Resolving*: ``reapply`` writes the losing version again as a new local change (through
the triggers, so it is captured and syncs out and supersedes what this site has seen);
``dismiss`` marks the conflict resolved. A resolver's merged row is written the same way.

*Seeding* a new site: a page copy of a current site's file, then :func:`adopt` under a
new site id. The copy keeps the rows, versions, log and vector of the source (it holds
what the source held); capture entries the source had not read yet are first ingested
under the source's id, as the source will ingest them, so both number them alike.

*Pruning*: :func:`prune` drops log entries every listed peer is known to hold
(:func:`apply` records what the sending peer holds, :func:`record_peer` what a peer
reported). A peer asking for pruned changes gets a clear error, never a silent gap.
Ingest prunes capture's log up to what it read: a file that is also replicated one way
needs both readers' positions before capture's log is pruned (the daemon's concern).

Limits: keys are compared by value and type (a key that differs only by collation, such
as 'a' and 'A' under NOCASE, or 1 and 1.0, is another row to sync); UNIQUE constraints on
non-key columns are not reconciled (``INSERT OR REPLACE`` of a remote row deletes the
local row it collides with, which is not recorded); tombstones stay in the rows table.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import apsw

from .. import capture
from .. import conflicts as conflict_log
from ..errors import StateConflict, UsageError
from ..sqlite.connect import connection as _connection
from ..sqlite.connect import one
from ..sqlite.connect import transaction as _transaction
from .model import (ApplyResult, CONFLICTS, COUNTERS, FORMAT, KEY_STRATEGIES, LOG, META, OP_NAME, PEERS, SEEN,
                    TABLES_SQL, WIRE_FORMAT, SyncChange, installed, pack, pack_vv, unpack, unpack_refs, unpack_vv,
                    unwire)
from .policy import Policy, Version
from .state import LOG_COLS, SiteState


def install(target: apsw.Connection | str | os.PathLike[str], site: str) -> dict[str, Any]:
    """Install change capture (origin = ``site``) and the sync tables; idempotent for the same site.

    Changes committed from capture's install on are synced; rows already in the file are
    the common starting point (every site of a group starts from a copy of the same file)."""
    if not isinstance(site, str) or not site.strip():
        raise UsageError("the site id must be a non-empty string", hint="use the site's name, e.g. 'paris'")
    with _connection(target) as con:
        cap = capture.install(con, site)          # refuses a file captured under another origin
        with _transaction(con):
            if installed(con):
                have = one(con, f"SELECT value FROM {META} WHERE key = 'site'")
                if have != site:
                    raise StateConflict(f"sync is already installed here for site {have!r}, not {site!r}",
                                        hint="a copy of another site's file must be seeded as a new site")
                already = True
                _upgrade(con)
            else:
                for sql in TABLES_SQL:
                    # Our own DDL moves the schema cookie: let capture know it was ours, not a VACUUM.
                    capture.own_ddl(con, sql)
                con.executemany(f"INSERT INTO {META}(key, value) VALUES (?, ?)",
                                [("site", site), ("format", FORMAT), ("ingested", cap.position.seq),
                                 ("installed_at", time.time())])
                con.execute(f"INSERT INTO {SEEN}(origin, oseq, hlc) VALUES (?, 0, 0)", (site,))
                already = False
        return {"site": site, "already_installed": already, "tables": cap.tables, "uncaptured": cap.uncaptured,
                "capture_position": cap.position.seq}


def _upgrade(con: apsw.Connection) -> None:
    """Tables, columns and indexes a file synced by an earlier version lacks (colliding inserts,
    counters, foreign keys that follow a moved row)."""
    for sql in TABLES_SQL[-3:]:
        kind = "index" if sql.startswith("CREATE INDEX") else "table"
        name = sql.split("EXISTS ", 1)[1].split("(", 1)[0].split(" ", 1)[0]
        if not capture.exists(con, name, kind):
            capture.own_ddl(con, sql)
    have = [r[1] for r in con.execute(f"PRAGMA table_info({LOG})")]
    for col in ("counters", "refs"):
        if col not in have:
            capture.own_ddl(con, f"ALTER TABLE {LOG} ADD COLUMN {col} BLOB")


def _counter_spec(spec: Any) -> tuple[str, str]:
    if isinstance(spec, str) and "." in spec:
        t, _, c = spec.partition(".")
        if t and c:
            return t, c
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(x, str) and x for x in spec):
        return spec[0], spec[1]
    raise UsageError(f"counter column {spec!r} is not \"table.column\"", hint='e.g. counters = ["accounts.balance"]')


def configure(target: apsw.Connection | str | os.PathLike[str], counters: Sequence[Any] = (),
              keys: Mapping[str, str] | None = None, present_only: bool = False) -> dict[str, Any]:
    """Set the sync group's per-table settings in this file (every site of the group sets the same).

    ``counters``: columns (``"table.column"``) whose concurrent updates add up: each site's
    change counts as a delta on the total. The value each row holds now is the base every
    site counts from: configure counters while every site holds the same rows (when the
    group is set up). ``keys``: per table, ``"rekey"`` (concurrent inserts of one integer
    key are two rows: the later one moves to a key of its own at every site) or ``"shared"``
    (the key names the same row at every site: the policy decides). Default: rekey for
    rowid tables, shared for others. ``present_only``: settings of tables this file does not
    have are left out (a database of several files: each file takes its own tables')."""
    pairs = sorted({_counter_spec(c) for c in counters})
    rules = dict(keys or {})
    for t, rule in rules.items():
        if rule not in KEY_STRATEGIES:
            raise UsageError(f"keys: table {t!r} has strategy {rule!r}", hint=f"use one of {', '.join(KEY_STRATEGIES)}")
    with _connection(target) as con:
        ingest(con)
        with _transaction(con):
            s = SiteState(con)
            _upgrade(con)
            if present_only:
                pairs = [(t, c) for t, c in pairs if s.local_shape(t) is not None]
                rules = {t: r for t, r in rules.items() if s.local_shape(t) is not None}
            for t, rule in rules.items():
                shape = s.local_shape(t)
                if rule == "rekey" and shape is not None and (len(shape.key_columns) != 1 or shape.without_rowid):
                    raise UsageError(f"keys: table {t!r} cannot be rekeyed: its key is not a rowid",
                                     hint="rekey moves rows between integer keys; use \"shared\" for this table")
            had = {(t, c) for t, cs in s.counter_cols.items() for c in cs}
            added = []
            for t, c in pairs:
                shape = s.local_shape(t)
                if shape is None or c not in shape.columns:
                    raise UsageError(f"counter column {t}.{c}: no captured table {t!r} with a column {c!r} here",
                                     hint="name a column of a synced table: counters = [\"table.column\"]")
                if c in shape.key_columns:
                    raise UsageError(f"counter column {t}.{c} is (part of) the table's key",
                                     hint="a counter is a value column, e.g. a balance or a quantity")
                if (t, c) in had:
                    continue
                added.append(f"{t}.{c}")
                q = capture.quote
                keys_sql = ", ".join(map(q, shape.key_columns))
                for row in con.execute(f"SELECT {keys_sql}, {q(c)} FROM {q(t)}"):
                    key, v = tuple(row[:-1]), row[-1]
                    con.execute(f"INSERT OR IGNORE INTO {COUNTERS}(tbl, key, col, base, contrib) "
                                "VALUES (?, ?, ?, ?, ?)", (t, pack(key), c, v, pack_vv({})))
            for t, c in had - set(pairs):
                con.execute(f"DELETE FROM {COUNTERS} WHERE tbl = ? AND col = ?", (t, c))
            con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('counters', ?)", (json.dumps(pairs),))
            con.execute(f"INSERT OR REPLACE INTO {META}(key, value) VALUES ('keys', ?)",
                        (json.dumps(rules, sort_keys=True),))
        return {"counters": [f"{t}.{c}" for t, c in pairs], "added": added, "keys": rules}


def is_installed(target: apsw.Connection | str | os.PathLike[str]) -> bool:
    with _connection(target) as con:
        return installed(con)


def site_of(target: apsw.Connection | str | os.PathLike[str]) -> str | None:
    with _connection(target) as con:
        return one(con, f"SELECT value FROM {META} WHERE key = 'site'") if installed(con) else None


def _needs_ingest(con: apsw.Connection) -> bool:
    """Whether capture logged anything sync has not read (a read: no write lock for a poll)."""
    with _transaction(con, write=False):
        if not installed(con):
            raise StateConflict("sync is not installed in this database",
                                hint="install it first (sync.install(target, site))")
        if one(con, "PRAGMA schema_version") != capture.meta(con, "schema_version"):
            return True
        last = one(con, f"SELECT max(seq) FROM {capture.LOG}")
        return last is not None and last > int(one(con, f"SELECT value FROM {META} WHERE key = 'ingested'"))


def _prune_capture(con: apsw.Connection, site: SiteState) -> None:
    """Capture's log is read: the sync log holds those changes now."""
    if site.ingested_now:
        capture.prune(con, site.ingested)


def ingest(target: apsw.Connection | str | os.PathLike[str]) -> int:
    """Read capture's new entries into the sync log now; returns how many."""
    with _connection(target) as con:
        if not _needs_ingest(con):
            return 0
        with _transaction(con):
            s = SiteState(con)
            n = s.ingest()
        _prune_capture(con, s)
        return n


def vector(target: apsw.Connection | str | os.PathLike[str]) -> dict[str, int]:
    """Per origin, the highest change number held here (local changes read first)."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            return {o: n for o, n in con.execute(f"SELECT origin, oseq FROM {SEEN} WHERE oseq > 0")}


def changes_for(target: apsw.Connection | str | os.PathLike[str], their_vector: Mapping[str, int],
                limit: int = 1000) -> list[SyncChange]:
    """The changes a peer with ``their_vector`` lacks, at most ``limit``, in the order to apply them."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            s = SiteState(con)
            return [s.decode(row) for row in _lacking(con, s, their_vector, limit)]


def changes_for_wire(target: apsw.Connection | str | os.PathLike[str], their_vector: Mapping[str, int],
                     limit: int = 1000) -> dict[str, Any]:
    """:func:`changes_for` as :func:`to_wire` puts it, without decoding the log's blobs."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            s = SiteState(con)
            shapes: dict[int, int] = {}
            rows = []
            for origin, oseq, hlc, op, sid, keyb, vals, bh, bo, ctx, sql, counters, refs in \
                    _lacking(con, s, their_vector, limit):
                idx = None if sid is None else shapes.setdefault(sid, len(shapes))
                rows.append([origin, oseq, hlc, OP_NAME[op], idx, keyb, vals, None if bh is None else [bh, bo], ctx,
                             sql, counters, refs])
            return {"format": WIRE_FORMAT, "changes": rows,
                    "shapes": [[t, list(cs), list(ks)] for t, cs, ks in (s.shape(sid) for sid in shapes)]}


def _lacking(con: apsw.Connection, s: SiteState, their_vector: Mapping[str, int], limit: int) -> list[Any]:
    """The log rows a peer with ``their_vector`` lacks, at most ``limit``, in the order to apply them."""
    if limit <= 0:
        return []
    their = {str(o): int(n) for o, n in (their_vector or {}).items()}
    start = None
    for origin, (oseq, _hlc, pruned) in s.seen.items():
        have = their.get(origin, 0)
        if have >= oseq:
            continue
        if have < pruned:
            raise StateConflict(f"the peer needs changes of {origin!r} from {have + 1} on, but this site "
                                f"pruned them (up to {pruned}): it was not listed as a peer here",
                                hint="sync it from another site that still has them, or seed it again",
                                details={"origin": origin, "needed": have + 1, "pruned": pruned})
        first = one(con, f"SELECT min(lseq) FROM {LOG} WHERE origin = ? AND oseq > ?", (origin, have))
        if first is not None and (start is None or first < start):
            start = first
    if start is None:
        return []
    out: list[Any] = []
    for row in con.execute(f"SELECT {LOG_COLS} FROM {LOG} WHERE lseq >= ? ORDER BY lseq", (start,)):
        if row[1] > their.get(row[0], 0):
            out.append(row)
            if len(out) >= limit:
                break
    return out


def apply(target: apsw.Connection | str | os.PathLike[str], changes: Iterable[SyncChange],
          policy: Policy | str | Mapping[str, Any] | None = None, peer: str | None = None) -> ApplyResult:
    """Apply a peer's batch (as :func:`changes_for` returned it) in one transaction.

    Duplicates are skipped, so a batch sent twice changes nothing; a batch that skips
    changes of an origin is refused whole. ``peer``: the site that sent it (it holds at
    least what it sent, which :func:`prune` uses)."""
    pol = Policy.of(policy)
    batch = list(changes)
    with _connection(target) as con:
        with _transaction(con, quiet=True):
            s = SiteState(con)
            res = s.apply(batch, pol, peer)
        _prune_capture(con, s)
        return res


def record_peer(target: apsw.Connection | str | os.PathLike[str], peer: str, vector: Mapping[str, int]) -> None:
    """Record that ``peer`` holds at least ``vector`` (e.g. the vector it sent, or ours after a push)."""
    with _connection(target) as con, _transaction(con):
        SiteState(con).record_peer(peer, vector)


def prune(target: apsw.Connection | str | os.PathLike[str], peers: Sequence[str] | None = None) -> int:
    """Drop log entries every peer holds; returns how many.

    ``peers``: the sites this one exchanges changes with (default: every peer recorded).
    A peer listed but never recorded holds nothing, so nothing is pruned. Each site only
    needs its direct peers: in a hub topology a spoke keeps what the hub lacks."""
    with _connection(target) as con, _transaction(con):
        s = SiteState(con)
        group = list(peers) if peers is not None else \
            [p for (p,) in con.execute(f"SELECT DISTINCT peer FROM {PEERS}")]
        group = [p for p in group if p != s.site]
        if not group:
            return 0
        held: dict[str, dict[str, int]] = {p: {} for p in group}
        for p, o, n in con.execute(f"SELECT peer, origin, oseq FROM {PEERS}"):
            if p in held:
                held[p][o] = n
        dropped = 0
        for origin, st in s.seen.items():
            upto = min(min(held[p].get(origin, 0) for p in group), st[0])
            if upto <= st[2]:
                continue
            con.execute(f"DELETE FROM {LOG} WHERE origin = ? AND oseq <= ?", (origin, upto))
            dropped += con.changes()
            st[2] = upto
            s.dirty.add(origin)
        s.flush_seen()
        return dropped


def conflicts(target: apsw.Connection | str | os.PathLike[str], unresolved: bool = True,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Recorded conflicts, oldest first (only those not resolved yet, by default)."""
    with _connection(target) as con, _transaction(con, write=False):
        SiteState(con)
        where = "WHERE resolved_at IS NULL" if unresolved else ""
        lim = f"LIMIT {int(limit)}" if limit is not None else ""
        return [conflict_log.as_dict(r) for r in con.execute(f"SELECT {conflict_log.COLUMNS} FROM {CONFLICTS} "
                                                             f"{where} ORDER BY id {lim}")]


def conflict(target: apsw.Connection | str | os.PathLike[str], conflict_id: int) -> dict[str, Any]:
    with _connection(target) as con, _transaction(con, write=False):
        SiteState(con)
        return conflict_log.get(con, conflict_id)


def resolve(target: apsw.Connection | str | os.PathLike[str], conflict_id: int, action: str,
            by: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Resolve a recorded conflict.

    ``dismiss``: keep what won. ``reapply``: write the losing version (``version`` =
    ``"local"``/``"remote"`` to choose one after a merge) again as a new local change,
    through the triggers: capture logs it, it orders after everything this site has seen,
    and it syncs out like any change made here."""
    if action not in ("reapply", "dismiss"):
        raise UsageError(f"unknown resolution {action!r}", hint="use reapply or dismiss")
    with _connection(target) as con:
        trig = con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
        try:
            with _transaction(con):
                s = SiteState(con)
                c = conflict_log.get(con, conflict_id)
                pick = conflict_log.to_reapply(c, action, version)
                resolution = "dismissed"
                if pick is not None:
                    s.ingest()
                    v = c[pick]
                    kcols = tuple(c["key"])
                    key = tuple(c["key"].values())
                    if v["deleted"]:
                        s.write(c["table"], kcols, key, Version(0, "", (), None))
                    else:
                        vals = s.with_totals(c["table"], key, v["values"])
                        cols = tuple(vals)
                        s.write(c["table"], kcols, key, Version(0, "", cols, tuple(vals[k] for k in cols)))
                    before = s.seen[s.site][0]
                    s.ingest()
                    if s.seen[s.site][0] == before:
                        raise StateConflict("the reapplied version was not captured",
                                            hint="is change capture installed on this table?")
                    resolution = f"reapplied {pick} as local change {s.seen[s.site][0]}"
                con.execute(f"UPDATE {CONFLICTS} SET resolved_at = ?, resolution = ?, resolved_by = ? WHERE id = ?",
                            (time.time(), resolution, by, int(conflict_id)))
            _prune_capture(con, s)
        finally:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
        c.update(resolved_at=time.time(), resolution=resolution, resolved_by=by)
        return c


def status(target: apsw.Connection | str | os.PathLike[str]) -> dict[str, Any]:
    """Site, vector, log size, per-peer position and lag (changes held here that the peer lacks)."""
    with _connection(target) as con:
        ingest(con)
        with _transaction(con, write=False):
            s = SiteState(con)
            vec = {o: st[0] for o, st in s.seen.items()}
            peers: dict[str, dict[str, int]] = {}
            seen_at: dict[str, float] = {}
            for p, o, n, at in con.execute(f"SELECT peer, origin, oseq, at FROM {PEERS}"):
                peers.setdefault(p, {})[o] = n
                seen_at[p] = max(seen_at.get(p, 0.0), at)
            return {
                "site": s.site, "vector": vec,
                "log_entries": one(con, f"SELECT count(*) FROM {LOG}"),
                "unresolved_conflicts": one(con, f"SELECT count(*) FROM {CONFLICTS} "
                                                          "WHERE resolved_at IS NULL"),
                "peers": {p: {"vector": v, "lag_changes": sum(max(0, n - v.get(o, 0)) for o, n in vec.items()),
                              "recorded_at": seen_at[p]} for p, v in peers.items()},
            }


def to_wire(changes: Sequence[SyncChange]) -> dict[str, Any]:
    """Changes as lists, ints, str and bytes (msgpack-ready), exact for every value: per change its
    key, values, ctx, counters and refs as the sync log holds them (msgpack blobs: read from a log,
    they are not decoded and encoded again). Table shapes are sent once per batch. Each change is
    ``[origin, oseq, ...]``: a sender may drop changes from the list."""
    shapes: dict[tuple[Any, ...], int] = {}
    rows = []
    for c in changes:
        idx = None
        if c.table is not None:
            idx = shapes.setdefault((c.table, tuple(c.columns), tuple(c.key_columns)), len(shapes))
        keyb, vals, ctx, counters, refs = c.blobs()
        rows.append([c.origin, c.oseq, c.hlc, c.op, idx, keyb, vals, None if c.base is None else list(c.base),
                     ctx, c.sql, counters, refs])
    return {"format": WIRE_FORMAT, "shapes": [[t, list(cs), list(ks)] for t, cs, ks in shapes], "changes": rows}


def from_wire(data: Mapping[str, Any], lazy: bool = False) -> list[SyncChange]:
    """Changes from :func:`to_wire`. ``lazy`` (format 2): the values of a row change are left packed
    (``values`` None, ``raw`` holds them) for :func:`apply`, which decodes only those it weighs."""
    if data.get("format") == WIRE_FORMAT:
        return _from_blobs(data, lazy)
    if data.get("format") != FORMAT:
        raise UsageError(f"sync changes of format {data.get('format')!r}; this Bastion reads {FORMAT} and "
                         f"{WIRE_FORMAT}", hint="run the same Bastion version on every site of the group")
    shapes = [(t, tuple(cs), tuple(ks)) for t, cs, ks in data["shapes"]]

    def vals(v: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if v is None else tuple(unwire(x) for x in v)
    out = []
    for origin, oseq, hlc, op, idx, key, values, base, ctx, sql, *rest in data["changes"]:
        t, cs, ks = shapes[idx] if idx is not None else (None, (), ())
        counters = rest[0] if rest else None
        refs = rest[1] if len(rest) > 1 else None       # a site of an earlier version sends none
        out.append(SyncChange(origin, int(oseq), int(hlc), op, t, cs, ks, vals(key), vals(values),
                              None if base is None else (int(base[0]), str(base[1])),
                              {str(k): int(v) for k, v in (ctx or {}).items()}, sql,
                              None if not counters else {str(k): int(v) for k, v in counters.items()},
                              None if not refs else {str(k): (int(h), str(o), unwire(v))
                                                     for k, (h, o, v) in refs.items()}))
    return out


def _from_blobs(data: Mapping[str, Any], lazy: bool) -> list[SyncChange]:
    """Changes of wire format 2: the log's blobs decoded, and kept to be logged here as they came."""
    shapes = [(t, tuple(cs), tuple(ks)) for t, cs, ks in data["shapes"]]
    out = []
    for origin, oseq, hlc, op, idx, keyb, vals, base, ctx, sql, counters, refs in data["changes"]:
        t, cs, ks = shapes[idx] if idx is not None else (None, (), ())
        for b in (keyb, vals, ctx, counters, refs):
            if b is not None and type(b) is not bytes:
                raise UsageError(f"change {origin}:{oseq} is malformed (a {type(b).__name__} where bytes go)")
        out.append(SyncChange(origin, int(oseq), int(hlc), op, t, cs, ks, unpack(keyb),
                              None if lazy else unpack(vals),
                              None if base is None else (int(base[0]), str(base[1])),
                              {str(k): int(v) for k, v in unpack_vv(ctx).items()}, sql,
                              None if counters is None else {str(k): int(v) for k, v in unpack_vv(counters).items()},
                              unpack_refs(refs), (keyb, vals, ctx, counters, refs)))
    return out


def adopt(target: apsw.Connection | str | os.PathLike[str], new_site: str) -> dict[str, Any]:
    """Make a copy of another site's file the file of ``new_site`` (a site joining the group).

    What the copy's capture log holds that its site had not ingested yet is ingested first,
    under that site's id: the source ingests the same entries the same way, so both agree
    on their numbers. Then capture's origin and the sync site become ``new_site``; every
    version, log entry and vector of the copy stays (the new site holds what the source
    held), and the source is recorded as holding at least that."""
    if not isinstance(new_site, str) or not new_site.strip():
        raise UsageError("the site id must be a non-empty string")
    with _connection(target) as con:
        ingest(con)
        with _transaction(con):
            s = SiteState(con)
            old = s.site
            if old == new_site:
                raise StateConflict(f"this copy already belongs to site {new_site!r}",
                                    hint="a joining site needs its own site id")
            if new_site in s.seen and s.seen[new_site][0] > 0:
                raise StateConflict(f"site {new_site!r} already made changes known to this copy: a site id "
                                    "cannot be reused by a new copy", hint="give the joining site a new id")
            con.execute(f"UPDATE {META} SET value = ? WHERE key = 'site'", (new_site,))
            capture.set_meta(con, "origin", new_site)
            con.execute(f"INSERT OR IGNORE INTO {SEEN}(origin, oseq, hlc) VALUES (?, 0, 0)", (new_site,))
            vec = {o: st[0] for o, st in s.seen.items() if st[0] > 0}
            s.record_peer(old, vec)
        return {"site": new_site, "from": old, "vector": vec}
