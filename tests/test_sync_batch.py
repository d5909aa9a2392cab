"""A batch of sync changes applied whole ends as the same changes applied one at a time.

Applying a batch skips the changes that a later change of the same row in the batch, made by
the same site on top of them, replaces (a bank's account moved many times between two
exchanges): those are logged but not weighed. Whatever the batch holds (counter columns, a
counter set to NULL and back, a delete then a new insert of the key, a creation and its
updates, the other site's concurrent changes of the same rows), the receiving site must end
with the same rows, versions, counters and log as when it weighs every change in turn.
Batches travel in wire format 2 (the sync log's blobs, values decoded only when weighed);
the earlier format is still read.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import apsw
import msgpack
import pytest

from bastion import sync
from bastion.capture import RawText
from bastion.errors import UsageError
from support.data import content

SCHEMA = ("CREATE TABLE acc(id INTEGER PRIMARY KEY, owner TEXT, bal INTEGER);"
          "CREATE TABLE kv(k TEXT PRIMARY KEY, v);")
ROWS = "".join(f"INSERT INTO acc VALUES ({i}, 'o{i}', 100);" for i in range(1, 5)) + "INSERT INTO kv VALUES ('n', 0);"


def site(tmp: Path, name: str, seed: Path) -> Path:
    p = tmp / f"{name}.db"
    src, dst = apsw.Connection(str(seed)), apsw.Connection(str(p))
    with dst.backup("main", src, "main") as b:
        b.step(-1)
    src.close()
    dst.execute("PRAGMA journal_mode = WAL").fetchall()
    dst.close()
    sync.install(p, name)
    sync.configure(p, ["acc.bal", "kv.v"])
    return p


def copy(src: Path, dst: Path) -> Path:
    """A page copy of a site's file (the same site: two futures of one site, to compare)."""
    s, d = apsw.Connection(str(src)), apsw.Connection(str(dst))
    with d.backup("main", s, "main") as b:
        b.step(-1)
    s.close()
    d.close()
    return dst


def write(path: Path, *stmts: str) -> None:
    """One transaction of an unmodified application (stdlib sqlite3)."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        for s in stmts:
            con.execute(s)
        con.execute("COMMIT")
    finally:
        con.close()


def through_wire(path: Path, vector: dict[str, int], limit: int) -> list[sync.SyncChange]:
    """The daemon's way: the log's blobs as they are, msgpack, values left packed."""
    data = sync.changes_for_wire(path, vector, limit)
    return sync.from_wire(msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False), lazy=True)


def state(path: Path) -> tuple:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return (content(con),
                con.execute("SELECT tbl, key, hlc, origin, deleted, vv, siblings FROM _bastion_sync_rows "
                            "ORDER BY tbl, key").fetchall(),
                con.execute("SELECT tbl, key, col, base, contrib FROM _bastion_sync_counters "
                            "ORDER BY tbl, key, col").fetchall(),
                con.execute("SELECT tbl, key, hlc, origin, at_key FROM _bastion_sync_ids ORDER BY 1, 2, 3, 4")
                .fetchall(),
                con.execute("SELECT origin, oseq, hlc, op, key, vals, base_hlc, base_origin, ctx, counters, refs "
                            "FROM _bastion_sync_log ORDER BY origin, oseq").fetchall(),
                sync.vector(path))
    finally:
        con.close()


@pytest.mark.parametrize("policy", ["lww", {"rule": "priority", "priority": ["B", "A"]},
                                    {"rule": "lww", "update_delete": "delete-wins"}])
def test_a_batch_applied_whole_ends_as_its_changes_one_by_one(tmp_path: Path, policy: object) -> None:
    seed = tmp_path / "seed.db"
    con = apsw.Connection(str(seed))
    con.execute(SCHEMA + ROWS).fetchall()
    con.close()
    a, b = site(tmp_path, "A", seed), site(tmp_path, "B", seed)
    # A, cut off: the same rows over and over, in every way a row can be replaced.
    for i in range(12):
        write(a, f"UPDATE acc SET bal = bal - {i + 1} WHERE id = 1", "UPDATE kv SET v = v + 1 WHERE k = 'n'")
    write(a, "UPDATE acc SET owner = 'x' WHERE id = 2", "UPDATE acc SET bal = NULL WHERE id = 3")
    write(a, "UPDATE acc SET bal = 7 WHERE id = 3", "UPDATE acc SET owner = 'y' WHERE id = 2")
    write(a, "DELETE FROM acc WHERE id = 4")
    write(a, "INSERT INTO acc VALUES (4, 'again', 40)", "UPDATE acc SET bal = bal + 1 WHERE id = 4")
    write(a, "INSERT INTO acc VALUES (9, 'new', 1)")
    write(a, "UPDATE acc SET bal = bal + 5 WHERE id = 9", "UPDATE acc SET owner = 'new2' WHERE id = 9")
    write(a, "UPDATE kv SET v = 'text' WHERE k = 'n'", "UPDATE kv SET v = 3 WHERE k = 'n'")
    write(a, "UPDATE acc SET bal = bal - 3 WHERE id = 2", "UPDATE acc SET bal = bal - 4 WHERE id = 2")
    write(a, "UPDATE acc SET bal = NULL WHERE id = 2")          # its last change counts nothing
    # B, meanwhile: the same rows, concurrently (conflicts, counters that add up, a colliding insert).
    write(b, "UPDATE acc SET bal = bal - 30 WHERE id = 1", "UPDATE acc SET owner = 'b' WHERE id = 2")
    write(b, "UPDATE acc SET bal = bal + 2 WHERE id = 3", "UPDATE acc SET owner = 'b4' WHERE id = 4")
    write(b, "INSERT INTO acc VALUES (9, 'b-new', 2)", "UPDATE kv SET v = v + 10 WHERE k = 'n'")
    sync.ingest(b)
    one = copy(b, tmp_path / "B-one.db")

    whole = sync.apply(b, through_wire(a, sync.vector(b), 1000), policy, peer="A")
    assert whole.received == len(sync.changes_for(a, {}, 1000)) > 30
    # Most of A's changes of acc 1 and of kv were replaced by a later one of A in the batch.
    assert whole.superseded >= 20, whole
    n = 0
    while True:
        batch = through_wire(a, sync.vector(one), 1)
        if not batch:
            break
        sync.apply(one, batch, policy, peer="A")
        n += 1
    assert n == whole.received
    assert state(b) == state(one)
    # And the other way: A takes B's changes; both sites hold the same rows.
    sync.apply(a, through_wire(b, sync.vector(a), 1000), policy, peer="B")
    assert content(a) == content(b)
    assert dict(apsw.Connection(str(b)).execute("SELECT id, bal FROM acc").fetchall())[1] == \
        100 - sum(range(1, 13)) - 30


def test_batches_travel_as_the_logs_blobs_and_the_earlier_format_is_still_read(tmp_path: Path) -> None:
    seed = tmp_path / "seed.db"
    con = apsw.Connection(str(seed))
    con.execute(SCHEMA + ROWS).fetchall()
    con.close()
    a, b = site(tmp_path, "A", seed), site(tmp_path, "B", seed)
    write(a, "UPDATE acc SET owner = CAST(x'ff00' AS TEXT), bal = bal - 1 WHERE id = 1",
          "INSERT INTO kv VALUES ('f', -0.0)", "DELETE FROM acc WHERE id = 2")
    changes = sync.changes_for(a, {}, 100)
    data = sync.changes_for_wire(a, {}, 100)
    assert data["format"] == 2 and data == sync.to_wire(changes)
    assert all(type(r[5]) is bytes for r in data["changes"])           # the key as the log holds it
    again = sync.from_wire(msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False))
    assert [c._replace(raw=None) for c in again] == [c._replace(raw=None) for c in changes]
    lazy = sync.from_wire(data, lazy=True)
    assert [c.values for c in lazy] == [None] * len(lazy)

    # Format 1 (a site of an earlier version): values as lists, non-UTF-8 text as [bytes].
    def w(v: object) -> object:
        return [bytes(v)] if type(v) is RawText else v
    old = {"format": 1, "shapes": data["shapes"], "changes": [
        [c.origin, c.oseq, c.hlc, c.op, r[4], None if c.key is None else [w(x) for x in c.key],
         None if c.values is None else [w(x) for x in c.values], None if c.base is None else list(c.base),
         dict(c.ctx), c.sql, c.counters, None] for c, r in zip(changes, data["changes"])]}
    assert [c._replace(raw=None) for c in sync.from_wire(old)] == [c._replace(raw=None) for c in changes]
    sync.apply(b, sync.from_wire(old), peer="A")
    assert content(b) == content(a)
    with pytest.raises(UsageError, match="format 3"):
        sync.from_wire({**data, "format": 3})
