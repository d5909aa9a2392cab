"""Content comparisons of SQLite files, read in the test process (never the daemon's)."""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from pathlib import Path
from typing import Any

import apsw


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dump(path: Path) -> list[tuple]:
    """Every row of every table, in key order: for content comparisons."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = []
        for (name,) in con.execute("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name"):
            out.append((name, con.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall()))
        return out
    finally:
        con.close()


def user_rows(path: Path) -> list[tuple]:
    """Every row of every application table (Bastion's own differ between sites and nodes by design)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type = 'table' AND "
                                           "name NOT LIKE '\\_bastion\\_%' ESCAPE '\\' ORDER BY name")]
        return [(n, con.execute(f'SELECT * FROM "{n}" ORDER BY rowid').fetchall()) for n in names]
    finally:
        con.close()


def integrity(path: Path) -> str:
    """PRAGMA integrity_check of a file, read-only ("ok" when intact); waits up to 30 s for a writer."""
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        con.set_busy_timeout(30_000)
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def qi(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def exact(v: Any) -> Any:
    # Floats by their bits, so -0.0 and 0.0 differ and 0.1 must be exactly 0.1.
    return ("f", struct.pack(">d", v)) if isinstance(v, float) else v


def content(target: Path | apsw.Connection) -> dict[str, list[tuple]]:
    """Every user table exactly: rowid (if any), then typeof and bytes of every value; rowid-ordered,
    WITHOUT ROWID tables ordered by their values. target: a file, or an open apsw connection."""
    con = target if isinstance(target, apsw.Connection) else \
        apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out = {}
        for name, wr in con.execute("SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type = 'table' "
                                    "AND name NOT LIKE 'sqlite%' AND substr(name, 1, 9) != '_bastion_' "
                                    "ORDER BY name").fetchall():
            cols = [r[0] for r in con.execute("SELECT name FROM pragma_table_xinfo(?)", (name,))]
            sel = [f"typeof({qi(c)}), CASE WHEN typeof({qi(c)}) IN ('text', 'blob') THEN CAST({qi(c)} AS BLOB) "
                   f"ELSE {qi(c)} END" for c in cols]
            if wr:
                order = ", ".join(str(2 * i + 2) for i in range(len(cols)))
            else:       # the rowid under a name no column shadows
                sel.insert(0, next(n for n in ("rowid", "_rowid_", "oid") if n not in {c.lower() for c in cols}))
                order = "1"
            out[name] = [tuple(exact(v) for v in r) for r in
                         con.execute(f"SELECT {', '.join(sel)} FROM {qi(name)} ORDER BY {order}")]
        return out
    finally:
        if con is not target:
            con.close()
