"""`bastion sync check`: after the sites converged, do they hold the same rows, and do the
application's invariants hold?

Row-level policies keep every site identical; they do not keep what an application means
(a total that must not move, a log that must hold every entry). The operator states that
as invariants in the sync group, each an SQL query returning one value:

    [sync_groups.bank.invariants]
    total = { sql = "SELECT sum(balance) FROM accounts", expect = "same" }      # equal at every site
    no_overdraft = { sql = "SELECT count(*) = 0 FROM accounts WHERE balance < 0", expect = "true" }
    money = { sql = "SELECT sum(balance) FROM accounts", expect = 1000000 }     # this value at every site

``file`` (default 0) says which file of the database the query runs on. Each site answers
for itself (:func:`local_report`, read-only); the site asked compares (:func:`compare`).
"""

from __future__ import annotations

import hashlib
from typing import Any, cast
from collections.abc import Mapping

import apsw

from .. import capture
from ..errors import Outcome, UsageError
from . import site
from ..sqlite import connect

EXPECTS = ("same", "true")


def parse_invariants(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """``[sync_groups.NAME.invariants]`` -> {name: {sql, expect, file}}; UsageError when malformed."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where} invariants must be a table: NAME = {{ sql = \"SELECT ...\", expect = \"same\" }}")
    out = {}
    for name, spec in raw.items():
        if isinstance(spec, str):
            spec = {"sql": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("sql"), str) or not spec["sql"].strip():
            raise UsageError(f"{where} invariant {name!r} needs sql = \"SELECT ...\" (a query returning one value)")
        extra = set(spec) - {"sql", "expect", "file"}
        if extra:
            raise UsageError(f"{where} invariant {name!r}: unknown key {sorted(extra)[0]!r}",
                             hint="known keys: sql, expect, file")
        expect = spec.get("expect", "same")
        if isinstance(expect, str) and expect not in EXPECTS:
            if expect.lower() in EXPECTS:
                expect = expect.lower()
            else:
                raise UsageError(f"{where} invariant {name!r}: expect must be \"same\" (equal at every site), "
                                 "\"true\" (holds at each site) or a value (every site returns it)",
                                 hint=f"got {expect!r}")
        f = spec.get("file", 0)
        if not isinstance(f, int) or f < 0:
            raise UsageError(f"{where} invariant {name!r}: file must be the index of a file of the database (0, 1...)")
        out[str(name)] = {"sql": spec["sql"], "expect": expect, "file": f}
    return out


def _json(v: Any) -> Any:
    return v.hex() if isinstance(v, (bytes, bytearray)) else v


def digest(path: str) -> dict[str, Any]:
    """SHA-256 over every application table's rows (typeof and bytes of each value), in key order."""
    con = connect.reader(path)
    try:
        h = hashlib.sha256()
        rows = 0
        con.execute("BEGIN")
        try:
            for name, wr in cast(list[tuple[str, int]], con.execute(
                    "SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND "
                    "type = 'table' AND name NOT LIKE 'sqlite%' AND substr(name, 1, 9) != "
                    "'_bastion_' ORDER BY name").fetchall()):
                cols = [r[0] for r in con.execute("SELECT name FROM pragma_table_xinfo(?)", (name,))]
                q = capture.quote
                sel = ", ".join(f"typeof({q(c)}), CAST({q(c)} AS BLOB)" for c in cols)
                order = "rowid" if not wr else ", ".join(str(2 * i + 2) for i in range(len(cols)))
                h.update(b"\x00T" + name.encode())
                for r in con.execute(f"SELECT {'rowid, ' if not wr else ''}{sel} FROM {q(name)} ORDER BY {order}"):
                    h.update(repr(r).encode())
                    rows += 1
        finally:
            con.execute("COMMIT")
        return {"sha256": h.hexdigest(), "rows": rows}
    finally:
        con.close()


def evaluate(path: str, sql: str) -> dict[str, Any]:
    con = connect.reader(path)
    try:
        got = con.execute(sql).fetchall()
        return {"value": _json(got[0][0]) if got and got[0] else None}
    except apsw.Error as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        con.close()


def local_report(files: list[str], invariants: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"files": [], "invariants": {}}
    for p in files:
        out["files"].append({"path": p, "vector": site.vector(p), **digest(p)})
    for name, spec in invariants.items():
        f = spec["file"]
        out["invariants"][name] = evaluate(files[f], spec["sql"]) if f < len(files) else \
            {"error": f"the database has no file {f} here"}
    return out


def compare(reports: Mapping[str, Mapping[str, Any]], invariants: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``reports``: per site, its local report or {"error": ...}. Sites converged when every site
    answered with the same vectors and the same rows."""
    ok_sites = {s: r for s, r in reports.items() if "error" not in r}
    problems = [f"site {s} did not answer: {r['error']}" for s, r in reports.items() if "error" in r]
    converged = not problems
    if ok_sites:
        first = next(iter(ok_sites.values()))
        for r in ok_sites.values():
            for a, b in zip(first["files"], r["files"]):
                if a["vector"] != b["vector"] or a["sha256"] != b["sha256"]:
                    converged = False
        if not converged and not problems:
            problems.append("the sites do not hold the same rows yet (vectors or row digests differ): sync is "
                            "still under way, or a site cannot apply what it receives (bastion sync status)")
    results = {}
    for name, spec in invariants.items():
        vals = {s: r["invariants"].get(name, {}) for s, r in ok_sites.items()}
        errs = {s: v["error"] for s, v in vals.items() if "error" in v}
        values = {s: v.get("value") for s, v in vals.items() if "error" not in v}
        expect = spec["expect"]
        if errs:
            ok = False
        elif expect == "same":
            ok = len({repr(v) for v in values.values()}) <= 1
        elif expect == "true":
            ok = all(bool(v) for v in values.values())
        else:
            ok = all(v == expect for v in values.values())
        results[name] = {"sql": spec["sql"], "expect": expect, "ok": ok, "values": values, "errors": errs}
        if not ok:
            why = ("; ".join(f"{s}: {e}" for s, e in errs.items())
                   or ", ".join(f"{s} = {v!r}" for s, v in values.items()))
            problems.append(f"invariant {name} ({expect}) violated: {why}")
    return {"converged": converged, "invariants": results, "sites": dict(reports), "problems": problems,
            "ok": not problems, "verdict": Outcome.OK if not problems else Outcome.PARTIAL}
