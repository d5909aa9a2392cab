"""Declared foreign keys follow a row that sync moved to a new key (issue 18, rekey).

Sites are real files with the real capture triggers; the applications are unmodified
(stdlib sqlite3 in another process) and refer to their own rows by the integer keys they
just inserted. Two sites create order 1 concurrently; the later one moves to a new key at
every site, and the rows its site wrote for it (lines, notes keyed by ``(order_id, n)``, a
one-to-one ``extra`` keyed by the order's key) must move with it, whichever comes first at
each site: the child or the parent's move. Rows that another site wrote for the order that
kept the key stay where they are.
"""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
from test_sync_engine import App, converge, make_sites, push, rows

from bastion import sync
from support.data import content, integrity

SCHEMA = """
CREATE TABLE orders(id INTEGER PRIMARY KEY, who TEXT NOT NULL UNIQUE);
CREATE TABLE lines(id INTEGER PRIMARY KEY, order_id INTEGER REFERENCES orders(id), what TEXT NOT NULL);
CREATE TABLE notes(order_id INTEGER REFERENCES orders ON UPDATE CASCADE, n INTEGER, text TEXT NOT NULL,
                   PRIMARY KEY(order_id, n));
CREATE TABLE extra(order_id INTEGER PRIMARY KEY REFERENCES orders(id), info TEXT NOT NULL);
CREATE TABLE tags(id INTEGER PRIMARY KEY, order_who TEXT REFERENCES orders(who), tag TEXT);
"""


@pytest.fixture(scope="module")
def app():
    a = App()
    yield a
    a.close()


def order_of(site: Path, table: str, what: str) -> dict[str, str]:
    """Per child row (by its text), the order it refers to (by who made it)."""
    got = rows(site, f"SELECT c.{what}, o.who FROM {table} c LEFT JOIN orders o ON o.id = c.order_id")
    return {w: who for w, who in got}


def write_order(app: App, site: Path, who: str) -> None:
    """The application inserts order 1 and refers to it by the key it inserted."""
    app.txn(site, ("INSERT INTO orders VALUES (1, ?)", (who,)),
            ("INSERT INTO lines(order_id, what) VALUES (1, ?)", (f"{who}-x",)),
            ("INSERT INTO notes VALUES (1, 1, ?)", (f"{who}-note",)),
            ("INSERT INTO extra VALUES (1, ?)", (f"{who}-info",)))


def test_children_follow_their_moved_parent_in_every_order(tmp_path: Path, app: App) -> None:
    s = make_sites(tmp_path, ["A", "B", "C", "D"], SCHEMA)
    a, b, c, d = s["A"], s["B"], s["C"], s["D"]
    write_order(app, a, "A")                       # the earlier creation: keeps key 1
    write_order(app, b, "B")                       # moves, with its children
    app.txn(b, "INSERT INTO lines(order_id, what) VALUES (1, 'B-y')",
            "UPDATE lines SET what = 'B-x2' WHERE what = 'B-x'",
            "INSERT INTO notes VALUES (1, 2, 'B-note2')", "DELETE FROM notes WHERE n = 2",
            "UPDATE extra SET info = 'B-info2' WHERE order_id = 1")
    push(a, c)                                      # C has A's order only, and refers to it
    app.txn(c, "INSERT INTO lines(order_id, what) VALUES (1, 'C-for-A')",
            "INSERT INTO notes VALUES (1, 3, 'C-note-for-A')")
    push(b, d)                                      # D: B's children here before B's order moves
    push(c, d)
    push(b, c)                                      # C: B's children arrive after B's order moved
    push(c, b)                                      # B: its own children move when A's order comes
    converge([a, b, c, d])
    want_lines = {"A-x": "A", "B-x2": "B", "B-y": "B", "C-for-A": "A"}
    want_notes = {"A-note": "A", "B-note": "B", "C-note-for-A": "A"}
    for name, site in s.items():
        assert order_of(site, "lines", "what") == want_lines, name
        assert order_of(site, "notes", "text") == want_notes, name
        assert order_of(site, "extra", "info") == {"A-info": "A", "B-info2": "B"}, name
        assert rows(site, "SELECT who FROM orders WHERE id = 1") == [("A",)], name
        assert rows(site, "PRAGMA foreign_key_check") == [], name
        assert sync.conflicts(site) == [], name           # nothing decided: every row kept
        assert integrity(site) == "ok"
    assert content(a) == content(b) == content(c) == content(d)

    # Life goes on at the moved key: B's application finds its order where it is now.
    bid = rows(b, "SELECT id FROM orders WHERE who = 'B'")[0][0]
    assert bid < 0
    app.txn(b, ("INSERT INTO lines(order_id, what) VALUES (?, 'B-z')", (bid,)),
            ("UPDATE notes SET text = 'B-note-again' WHERE order_id = ?", (bid,)))
    app.txn(a, "INSERT INTO lines(order_id, what) VALUES (1, 'A-y')")
    converge([a, b, c, d])
    assert content(a) == content(b) == content(c) == content(d)
    assert order_of(d, "lines", "what") == {**want_lines, "B-z": "B", "A-y": "A"}
    assert order_of(d, "notes", "text") == {"A-note": "A", "B-note-again": "B", "C-note-for-A": "A"}


def test_a_reference_to_another_column_stays(tmp_path: Path, app: App) -> None:
    """A foreign key to a UNIQUE column that is not the key does not move: the key moved, the
    column did not."""
    s = make_sites(tmp_path, ["A", "B"], SCHEMA)
    a, b = s["A"], s["B"]
    for site, who in ((a, "A"), (b, "B")):
        app.txn(site, ("INSERT INTO orders VALUES (1, ?)", (who,)),
                ("INSERT INTO tags(order_who, tag) VALUES (?, 't')", (who,)))
    converge([a, b])
    assert content(a) == content(b)
    assert sorted(rows(a, "SELECT order_who FROM tags")) == [("A",), ("B",)]
    assert rows(a, "PRAGMA foreign_key_check") == []


def test_an_upgraded_file_carries_references(tmp_path: Path, app: App) -> None:
    """A file synced before references travelled gets the column and index at install."""
    s = make_sites(tmp_path, ["A", "B"], SCHEMA)
    for p in s.values():
        con = apsw.Connection(str(p))
        con.execute("DROP INDEX _bastion_sync_ids_at; ALTER TABLE _bastion_sync_log DROP COLUMN refs")
        con.close()
        assert sync.install(p, sync.site_of(p))["already_installed"] is True
    write_order(app, s["A"], "A")
    write_order(app, s["B"], "B")
    converge(list(s.values()))
    for site in s.values():
        assert order_of(site, "lines", "what") == {"A-x": "A", "B-x": "B"}
