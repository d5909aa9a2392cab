"""Per-table content digests: row count and a SHA-256 of the rows in key order.

The same function runs on the source at backup time (the frozen main file,
opened immutable) and on a restored copy, so equal digests mean equal content.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, cast

import apsw
from ..sqlite import connect


def _feed(h: Any, value: Any) -> None:
    # A type tag before every value, so 1, 1.0, '1' and b'1' all hash differently.
    if value is None:
        h.update(b"N")
    elif isinstance(value, int):
        h.update(b"I" + str(value).encode() + b";")
    elif isinstance(value, float):
        h.update(b"F" + struct.pack(">d", value))
    elif isinstance(value, str):
        b = value.encode("utf-8", "surrogatepass")
        h.update(b"T" + str(len(b)).encode() + b":" + b)
    else:
        b = bytes(value)
        h.update(b"B" + str(len(b)).encode() + b":" + b)


def table_digests(conn: apsw.Connection) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    tables = cast(list[tuple[str, str | None]], conn.execute(     # name TEXT, sql TEXT (NULL for some)
        "SELECT name, sql FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "ORDER BY name").fetchall())
    for name, sql in tables:
        if sql and sql.upper().startswith("CREATE VIRTUAL"):
            continue
        without_rowid = sql is not None and "WITHOUT ROWID" in sql.upper()
        order = "" if without_rowid else " ORDER BY rowid"   # WITHOUT ROWID scans in key order
        h = hashlib.sha256()
        rows = 0
        quoted = name.replace('"', '""')
        for row in conn.execute(f'SELECT * FROM "{quoted}"{order}'):
            rows += 1
            for v in row:
                _feed(h, v)
            h.update(b"\n")
        out[name] = {"rows": rows, "sha256": h.hexdigest()}
    return out


def file_digests(path: str, immutable: bool = False) -> dict[str, dict[str, Any]]:
    """Open ``path`` read-only (``immutable``: the main file alone, ignoring any WAL) and digest it."""
    conn = connect.reader(path, immutable=immutable)
    try:
        return table_digests(conn)
    finally:
        conn.close()
