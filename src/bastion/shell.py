"""`bastion sql`: run SQL through the daemon's SQL server, one command or a shell.

The shell keeps a history (~/.bastion_history), accepts statements over several lines
(ended by ';'), and BEGIN / COMMIT / ROLLBACK to work in an interactive transaction;
otherwise every statement commits on its own. ``.tables`` and ``.schema [TABLE]``
list what is there; ``.quit`` leaves.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from .client import Connection, Error

_META = {".tables": "SELECT name FROM sqlite_schema WHERE type IN ('table','view') AND name NOT LIKE 'sqlite_%' "
                    "ORDER BY name",
         ".schema": "SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL AND (? IS NULL OR tbl_name = ?) ORDER BY name"}


def run_one(con: Connection, sql: str) -> dict[str, Any]:
    word = sql.strip().rstrip(";").strip().upper()
    if word in ("BEGIN", "BEGIN TRANSACTION", "BEGIN DEFERRED", "BEGIN IMMEDIATE"):
        con.begin(write=word.endswith("IMMEDIATE"))
        return {"message": "transaction open"}
    if word in ("COMMIT", "END", "COMMIT TRANSACTION"):
        con.commit()
        return {"message": "committed"}
    if word in ("ROLLBACK", "ROLLBACK TRANSACTION"):
        con.rollback()
        return {"message": "rolled back"}
    parts = sql.strip().split(None, 1)
    if parts and parts[0] in _META:
        arg = parts[1].strip().rstrip(";") if len(parts) > 1 else None
        cur = con.execute(_META[parts[0]], (arg, arg) if parts[0] == ".schema" else None)
    else:
        cur = con.execute(sql)
    cols = [d[0] for d in cur.description or []]
    return {"columns": cols, "rows": [list(r) for r in cur.fetchall()] if cols else [], "rowcount": cur.rowcount}


def show(console: Console, res: dict[str, Any]) -> None:
    if "message" in res:
        console.print(res["message"])
        return
    if not res["columns"]:
        console.print(f"ok ({res['rowcount']} row(s) changed)" if res["rowcount"] >= 0 else "ok")
        return
    t = Table(*res["columns"])
    for r in res["rows"]:
        t.add_row(*["NULL" if v is None else (f"x'{v.hex()}'" if isinstance(v, bytes) else str(v)) for v in r])
    console.print(t)
    console.print(f"{len(res['rows'])} row(s)")


def interactive(con: Connection, console: Console, errc: Console) -> int:
    try:
        import readline
        hist = os.path.expanduser("~/.bastion_history")
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
    except ImportError:  # pragma: no cover - no readline on this platform
        readline = None  # type: ignore[assignment]  # the shell works without history
    buf: list[str] = []
    failures = 0
    try:
        while True:
            prompt = (f"{con.database}*> " if con.in_transaction else f"{con.database}> ") if not buf else "   ...> "
            try:
                line = input(prompt)
            except EOFError:
                break
            if not buf and line.strip() in (".quit", ".exit"):
                break
            if not buf and line.strip().startswith("."):
                sql = line
            else:
                buf.append(line)
                if not line.rstrip().endswith(";"):
                    continue
                sql, buf = "\n".join(buf), []
            try:
                show(console, run_one(con, sql))
            except Error as exc:
                failures += 1
                errc.print(f"error: {exc}")
    finally:
        if readline is not None:
            try:
                readline.write_history_file(hist)
            except OSError:
                pass
        if con.in_transaction:
            errc.print("leaving with an open transaction: rolled back")
            con.rollback()
    return 0 if not failures or sys.stdin.isatty() else 2
