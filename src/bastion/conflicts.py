"""The conflict log: every version that lost, kept beside the one that won, until someone decides.

Two writers record in it, in the database file itself (table ``_bastion_conflicts``, in
the same transaction as what they apply):

- sync (sync/site.py), when two sites changed a row without seeing each other's change: the
  policy picked a winner, the other version is recorded (policies ``lww``, ``priority``...);
- a replicated cluster (cluster/standby.py), when an old primary rejoins: every change it
  made that never reached the node that took over (policy ``failover``, outcome ``local``:
  the new primary's row stays). Nothing of it is applied on its own: it may be half of a
  transaction whose other half is gone, or overwrite what clients did since.

``bastion conflicts list|show|resolve`` reads and settles them: ``dismiss`` keeps the
winner; ``reapply`` writes the losing version again as a new change of this node,
through the application's triggers, so capture logs it and it travels on (to the
standby, or to the other sites) like any local write.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from collections.abc import Sequence

import apsw
import msgpack

from . import capture
from .capture import RawText
from .errors import StateConflict, UsageError
from .sqlite.connect import connection as _connection
from .sqlite.connect import transaction

TABLE = "_bastion_conflicts"
DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE}(id INTEGER PRIMARY KEY, at REAL NOT NULL, tbl TEXT NOT NULL, "
       "key BLOB NOT NULL, key_columns TEXT NOT NULL, policy TEXT NOT NULL, outcome TEXT NOT NULL, "
       "local_hlc INTEGER NOT NULL, local_origin TEXT NOT NULL, local_columns TEXT, local_values BLOB, "
       "remote_hlc INTEGER NOT NULL, remote_origin TEXT NOT NULL, remote_oseq INTEGER, remote_columns TEXT, "
       "remote_values BLOB, resolved_at REAL, resolution TEXT, resolved_by TEXT)")
COLUMNS = ("id, at, tbl, key, key_columns, policy, outcome, local_hlc, local_origin, local_columns, "
           "local_values, remote_hlc, remote_origin, remote_oseq, remote_columns, remote_values, "
           "resolved_at, resolution, resolved_by")


# -- values: capture's native values, msgpack; text that is not UTF-8 as [bytes] --------------

def pack(values: Sequence[Any] | None) -> bytes | None:
    if values is None:
        return None
    return msgpack.packb([[bytes(v)] if type(v) is RawText else v for v in values], use_bin_type=True)


def unpack(blob: bytes | None) -> tuple[Any, ...] | None:
    if blob is None:
        return None
    return tuple(RawText(v[0]) if type(v) is list else v for v in msgpack.unpackb(blob, raw=False))


def _version(hlc: int, origin: str, columns: str | None, values: bytes | None) -> dict[str, Any]:
    vals = unpack(values)
    cols = json.loads(columns) if columns else []
    return {"hlc": hlc, "origin": origin, "time": (hlc >> capture.HLC_SHIFT) / 1000.0 if hlc else None,
            "deleted": vals is None, "values": None if vals is None else dict(zip(cols, vals))}


def as_dict(r: Sequence[Any]) -> dict[str, Any]:
    (cid, at, tbl, key, kcols, pol, outcome, lh, lo, lc, lv, rh, ro, rseq, rc, rv, rat, resolution, by) = r
    kc = json.loads(kcols)
    keyd = dict(zip(kc, unpack(key) or ()))
    local, remote = _version(lh, lo, lc, lv), {**_version(rh, ro, rc, rv), "oseq": rseq}
    # The application rows involved: the row itself; for two inserts of one key (sync's rekey), also
    # the key the moved one lives at now (the remote version is recorded at its new key).
    rows = [{"table": tbl, "key": keyd}]
    if pol == "keys:rekey" and remote["values"] is not None:
        rows.append({"table": tbl, "key": {k: remote["values"].get(k) for k in kc}})
    return {"id": cid, "at": at, "table": tbl, "key": keyd, "policy": pol, "outcome": outcome, "winner": outcome,
            "local": local, "remote": remote, "rows": rows,
            "resolved_at": rat, "resolution": resolution, "resolved_by": by}


def _has_table(con: apsw.Connection) -> bool:
    return bool(con.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (TABLE,)).fetchall())


def _ensure(con: apsw.Connection) -> None:
    """The table, created inside the caller's transaction. Capture must know the schema change
    is ours: else its next look takes the moved schema cookie for a VACUUM (a re-seed)."""
    if _has_table(con):
        return
    if capture.installed(con):
        capture.own_ddl(con, DDL)
    else:
        con.execute(DDL)


# -- reading -------------------------------------------------------------------------------------

def listing(target: apsw.Connection | str | os.PathLike[str], unresolved: bool = True,
            limit: int | None = None) -> list[dict[str, Any]]:
    """Recorded conflicts, oldest first (only those not resolved yet, by default)."""
    with _connection(target) as con:
        if not _has_table(con):
            return []
        where = "WHERE resolved_at IS NULL" if unresolved else ""
        lim = f"LIMIT {int(limit)}" if limit is not None else ""
        return [as_dict(r) for r in con.execute(f"SELECT {COLUMNS} FROM {TABLE} {where} ORDER BY id {lim}")]


def get(target: apsw.Connection | str | os.PathLike[str], conflict_id: int) -> dict[str, Any]:
    with _connection(target) as con:
        got = (con.execute(f"SELECT {COLUMNS} FROM {TABLE} WHERE id = ?", (int(conflict_id),)).fetchall()
               if _has_table(con) else [])
        if not got:
            raise UsageError(f"no conflict {conflict_id} in this database",
                             hint="list them with `bastion conflicts list DATABASE`")
        return as_dict(got[0])


# -- recording (the caller's write transaction) ----------------------------------------------------

def record(con: apsw.Connection, *, table: str, key_columns: Sequence[str], key: Sequence[Any], policy: str,
           outcome: str, local: tuple[int, str, Sequence[str] | None, Sequence[Any] | None],
           remote: tuple[int, str, int | None, Sequence[str] | None, Sequence[Any] | None]) -> int:
    """One conflict; versions are (hlc, origin, columns, values or None if deleted), the
    remote one with its origin's position."""
    _ensure(con)
    lh, lo, lc, lv = local
    rh, ro, rseq, rc, rv = remote
    con.execute(f"INSERT INTO {TABLE}(at, tbl, key, key_columns, policy, outcome, local_hlc, local_origin, "
                "local_columns, local_values, remote_hlc, remote_origin, remote_oseq, remote_columns, remote_values) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), table, pack(key), json.dumps(list(key_columns)), policy, outcome, lh, lo,
                 json.dumps(list(lc)) if lc is not None else None, pack(lv), rh, ro, rseq,
                 json.dumps(list(rc)) if rc is not None else None, pack(rv)))
    return con.last_insert_rowid()


def _current(con: apsw.Connection, table: str, columns: Sequence[str], key_columns: Sequence[str],
             key: Sequence[Any]) -> tuple[Any, ...] | None:
    q = capture.quote
    where = " AND ".join(f"{q(k)} IS ?" for k in key_columns)
    try:
        got = con.execute(f"SELECT {', '.join(map(q, columns))} FROM {q(table)} WHERE {where}", tuple(key)).fetchall()
    except apsw.SQLError:       # the table or a column is gone here
        return None
    return tuple(got[0]) if got else None


def record_unshipped(con: apsw.Connection, origin: str, node: str, changes: Sequence[capture.Change]) -> int:
    """An old primary's changes that never reached this node (failover): each one recorded,
    none applied. Recording the same change twice (a rejoin retried) is a no-op."""
    here = capture.origin_of(con) or "(this node)"
    n = 0
    with transaction(con, write=True):
        _ensure(con)
        for c in changes:
            if con.execute(f"SELECT 1 FROM {TABLE} WHERE policy = 'failover' AND remote_origin = ? AND "
                           "remote_oseq = ?", (origin, c.seq)).fetchall():
                continue
            if c.op == "ddl":
                record(con, table="(schema)", key_columns=(), key=(), policy="failover", outcome="local",
                       local=(0, here, None, None), remote=(c.hlc, origin, c.seq, ["sql"], [c.sql]))
                n += 1
                continue
            if c.op not in ("insert", "update", "delete"):
                continue
            assert c.table is not None, "a row change names its table"
            if c.op == "delete":
                key = tuple(c.key or ())
            else:
                assert c.values is not None, "an insert or update carries its new row"
                key = tuple(c.values[c.columns.index(k)] for k in c.key_columns)
            cur = _current(con, c.table, c.columns, c.key_columns, key)
            record(con, table=c.table, key_columns=c.key_columns, key=key, policy="failover", outcome="local",
                   local=(0, here, c.columns if cur is not None else None, cur),
                   remote=(c.hlc, origin, c.seq, c.columns if c.op != "delete" else None,
                           c.values if c.op != "delete" else None))
            n += 1
    return n


def rows(target: apsw.Connection | str | os.PathLike[str]) -> list[tuple[Any, ...]]:
    """Every conflict as stored (to hand a node's log to another: :func:`merge`)."""
    with _connection(target) as con:
        if not _has_table(con):
            return []
        return [tuple(r) for r in con.execute(f"SELECT {COLUMNS} FROM {TABLE} ORDER BY id")]


def merge(con: apsw.Connection, incoming: Sequence[Sequence[Any]]) -> int:
    """Take in another node's conflict log (a node rejoining after a failover or a switchover):
    conflicts not known here are added, and a resolution made there is carried over to the
    same conflict here. A conflict is the same when its table, key, policy and both versions'
    origin and clock value are. Returns how many rows changed."""
    n = 0
    with transaction(con, write=True):
        _ensure(con)
        for r in incoming:
            (_id, at, tbl, key, kcols, pol, outcome, lh, lo, lc, lv, rh, ro, rseq, rc, rv, rat, res, by) = r
            same = con.execute(f"SELECT id, resolved_at FROM {TABLE} WHERE tbl = ? AND key = ? AND policy = ? AND "
                               "local_hlc = ? AND local_origin = ? AND remote_hlc = ? AND remote_origin = ? AND "
                               "remote_oseq IS ?", (tbl, key, pol, lh, lo, rh, ro, rseq)).fetchall()
            if not same:
                con.execute(f"INSERT INTO {TABLE}({COLUMNS.replace('id, ', '', 1)}) VALUES "
                            f"({', '.join('?' * 18)})", (at, tbl, key, kcols, pol, outcome, lh, lo, lc, lv, rh, ro,
                                                         rseq, rc, rv, rat, res, by))
                n += 1
            elif rat is not None and same[0][1] is None:
                con.execute(f"UPDATE {TABLE} SET resolved_at = ?, resolution = ?, resolved_by = ? WHERE id = ?",
                            (rat, res, by, same[0][0]))
                n += 1
    return n


# -- settling ----------------------------------------------------------------------------------------

def resolve(target: apsw.Connection | str | os.PathLike[str], conflict_id: int, action: str,
            by: str | None = None, version: str | None = None) -> dict[str, Any]:
    """``dismiss`` keeps the winner; ``reapply`` writes the losing version as a new local change.

    For a file that is not a sync site (failover's log); a sync site settles its conflicts with
    ``sync.site.resolve`` (the new change must enter its version state): ``sync.conflict_log.resolve``
    picks the right one, so this module never imports sync."""
    if action not in ("reapply", "dismiss"):
        raise UsageError(f"unknown resolution {action!r}", hint="use --reapply or --dismiss")
    with _connection(target) as con:
        trig = con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)    # captured: it travels on
        try:
            with transaction(con, write=True):
                c = get(con, conflict_id)
                pick = to_reapply(c, action, version)
                resolution = "dismissed"
                if pick is not None:
                    if c["table"] == "(schema)":
                        con.execute(c[pick]["values"]["sql"])
                    else:
                        _write(con, c["table"], tuple(c["key"]), tuple(c["key"].values()), c[pick]["values"])
                    resolution = f"reapplied the {pick} version"
                con.execute(f"UPDATE {TABLE} SET resolved_at = ?, resolution = ?, resolved_by = ? WHERE id = ?",
                            (time.time(), resolution, by, int(conflict_id)))
        finally:
            con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, trig)
        return get(con, conflict_id)


def to_reapply(c: dict[str, Any], action: str, version: str | None) -> str | None:
    """Which version of conflict ``c`` a resolution writes again ("local"/"remote"), or None
    to dismiss it; refuses one already resolved."""
    if c["resolved_at"] is not None:
        raise StateConflict(f"conflict {c['id']} was already resolved ({c['resolution']})")
    if action != "reapply":
        return None
    pick = version or {"local": "remote", "remote": "local"}.get(c["outcome"])
    if pick not in ("local", "remote"):
        raise UsageError(f"conflict {c['id']} was merged: say which version to reapply",
                         hint="--version local or --version remote")
    return pick


def _write(con: apsw.Connection, table: str, key_columns: Sequence[str], key: Sequence[Any],
           values: dict[str, Any] | None) -> None:
    q = capture.quote

    def mark(v: Any) -> str:
        return "CAST(? AS TEXT)" if type(v) is RawText else "?"

    def arg(v: Any) -> Any:
        return bytes(v) if type(v) is RawText else v
    if values is None:
        where = " AND ".join(f"{q(k)} IS {mark(v)}" for k, v in zip(key_columns, key))
        con.execute(f"DELETE FROM {q(table)} WHERE {where}", [arg(v) for v in key])
        return
    cols = list(values)
    con.execute(f"INSERT OR REPLACE INTO {q(table)}({', '.join(map(q, cols))}) "
                f"VALUES ({', '.join(mark(values[c]) for c in cols)})", [arg(values[c]) for c in cols])


def for_json(c: dict[str, Any]) -> dict[str, Any]:
    """A conflict with its values in the SQL API's exact JSON form (BLOBs tagged, see sql/values.py)."""
    from .sql.values import encode

    def vals(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {k: encode(v) for k, v in d.items()}
    return {**c, "key": vals(c["key"]), "local": {**c["local"], "values": vals(c["local"]["values"])},
            "remote": {**c["remote"], "values": vals(c["remote"]["values"])}}

