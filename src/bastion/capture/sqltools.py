"""SQL text helpers of change capture: quoting, statements, splitting CREATE text."""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence

import apsw

from ..sqlite.connect import one


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def exists(con: apsw.Connection, name: str, kind: str = "table") -> bool:
    return one(con, "SELECT count(*) FROM sqlite_schema WHERE type = ? AND name = ?", (kind, name)) > 0


_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|--[^\n]*|/\*.*?(?:\*/|$)|.""", re.S)


def split_top(text: str) -> list[str]:
    """Split SQL text on commas outside parentheses, quotes and comments."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        if t == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(t)
    parts.append("".join(cur))
    return parts


def first_name(coldef: str) -> str | None:
    m = re.match(r"""\s*(?:"((?:[^"]|"")*)"|`((?:[^`]|``)*)`|\[([^\]]*)\]|'((?:[^']|'')*)'|([^\s(]+))""", coldef)
    if not m:
        return None
    if m.group(1) is not None:
        return m.group(1).replace('""', '"')
    if m.group(2) is not None:
        return m.group(2).replace("``", "`")
    if m.group(4) is not None:
        return m.group(4).replace("''", "'")
    return m.group(3) if m.group(3) is not None else m.group(5)


def bare_or_quoted(name: str) -> str:
    """SQLite writes a renamed column into the table's text as the ALTER named it; naming it the
    way the application most likely did keeps the copy's schema text equal."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name.upper() not in apsw.keywords:
        return name
    return quote(name)


def is_unique_index(sql: str | None) -> bool:
    return sql is not None and re.match(r"\s*CREATE\s+UNIQUE\s", sql, re.I) is not None


def upsert_sql(table: str, columns: Sequence[str], marks: Sequence[str]) -> str:
    return f"INSERT OR REPLACE INTO {quote(table)}({', '.join(map(quote, columns))}) VALUES ({', '.join(marks)})"


def delete_sql(table: str, keys: Sequence[str], marks: Sequence[str]) -> str:
    return f"DELETE FROM {quote(table)} WHERE " + " AND ".join(f"{quote(n)} = {m}" for n, m in zip(keys, marks))


def same_values(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b))
