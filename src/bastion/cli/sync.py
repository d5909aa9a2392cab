"""Multi-site sync and the conflict log: sync status/run/check, conflicts list/show/resolve."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from ..errors import UsageError
from .base import _client, _seconds, cli, common, emit, out


@cli.group()
def sync() -> None:
    """Multi-site sync of databases in a [sync_groups.NAME] (see docs/sync.md)."""


@sync.command("status")
@click.argument("database", required=False)
@common
def sync_status(conf: cfg.Config, as_json: bool, database: str | None) -> None:
    """Per synced database: group, neighbours, state, per-neighbour lag, conflicts, last error."""
    q = f"?database={database}" if database else ""
    data = _client(conf).request("GET", "/v1/sync/status" + q)

    def human(d: dict[str, Any]) -> None:
        if not d["databases"]:
            out.print("no database is in a sync group on this daemon")
        for r in d["databases"]:
            out.print(f"{r['database']}: site {r['site']} of group {r['group']} ({r['topology']}, {r['policy']}, "
                      f"{r['schedule']}), {r['state']}; last error: {r['last_error'] or 'none'}"
                      + (f" ({r['failures']} failures in a row)" if r["failures"] else ""))
            t = Table("file", "neighbour", "lag (changes)", "unresolved conflicts")
            for f in r["files"]:
                for p, st in (f.get("peers") or {}).items():
                    t.add_row(f["path"], p, str(st["lag_changes"]), str(f.get("unresolved_conflicts")))
            out.print(t)
    emit(data, as_json, human)


@sync.command("run")
@click.argument("database")
@click.option("--timeout", type=float, default=300.0, callback=_seconds, help="Seconds to wait for the pass.")
@common
def sync_run(conf: cfg.Config, as_json: bool, database: str, timeout: float) -> None:
    """Exchange every pending change of DATABASE with its neighbours now (whatever the schedule)."""
    data = _client(conf).request("POST", "/v1/sync/run", {"database": database, "timeout": timeout},
                                 timeout=timeout + 30)
    emit(data, as_json, lambda d: out.print(
        f"{database}: sent {d.get('sent', 0)} changes"
        + (" (blackout window: nothing sent)" if d.get("blackout") else "")
        + (f"; FAILED: {d['error']}" if d.get("error") else "")
        + ("".join(f"; {e}" for e in d.get("errors") or []))))


@sync.command("check")
@click.argument("database")
@common
def sync_check(conf: cfg.Config, as_json: bool, database: str) -> None:
    """Ask every site of DATABASE's group: same rows everywhere? do the group's invariants hold?"""
    data = _client(conf).request("GET", f"/v1/sync/check?database={database}", timeout=120)

    def human(d: dict[str, Any]) -> None:
        out.print(f"{d['database']} (group {d['group']}, asked from {d['site']}): "
                  + ("converged" if d["converged"] else "NOT converged"))
        t = Table("invariant", "expect", "result", "values per site")
        for name, r in d["invariants"].items():
            t.add_row(name, str(r["expect"]), "ok" if r["ok"] else "VIOLATED",
                      ", ".join(f"{s}={v}" for s, v in r["values"].items())
                      + "".join(f" {s}: {e}" for s, e in r["errors"].items()))
        if d["invariants"]:
            out.print(t)
        for p in d["problems"]:
            out.print(f"problem: {p}")
    emit(data, as_json, human)


@cli.group()
def conflicts() -> None:
    """The conflict log: versions that lost (sync) or never reached the new primary (failover)."""


def _conflict_line(c: dict[str, Any]) -> str:
    r, l_ = c["remote"], c["local"]
    return (f"#{c['id']} {c['database']}[{c['file']}] {c['table']} {c['key']}: {c['policy']}, kept {c['outcome']}; "
            f"local {'deleted' if l_['deleted'] else l_['values']} ({l_['origin']}), "
            f"remote {'deleted' if r['deleted'] else r['values']} ({r['origin']})"
            + (f"; resolved: {c['resolution']}" if c.get("resolved_at") else ""))


@conflicts.command("list")
@click.argument("database", required=False)
@click.option("--all", "all_", is_flag=True, help="Resolved ones too.")
@common
def conflicts_list(conf: cfg.Config, as_json: bool, database: str | None, all_: bool) -> None:
    """Conflicts not resolved yet (of DATABASE, or every database)."""
    q = "?" + "&".join(p for p in (f"database={database}" if database else "", "all=true" if all_ else "") if p)
    data = _client(conf).request("GET", "/v1/conflicts" + (q if q != "?" else ""))

    def human(d: dict[str, Any]) -> None:
        if not d["conflicts"]:
            out.print("no conflict" + ("" if all_ else " to resolve"))
        for c in d["conflicts"]:
            out.print(_conflict_line(c))
    emit(data, as_json, human)


@conflicts.command("show")
@click.argument("database")
@click.argument("conflict_id", type=int)
@click.option("--file", "file_", type=int, default=0, show_default=True, help="Which file of the database.")
@common
def conflicts_show(conf: cfg.Config, as_json: bool, database: str, conflict_id: int, file_: int) -> None:
    """One conflict, with both versions."""
    data = _client(conf).request("GET", f"/v1/conflicts/{database}/{conflict_id}?file={file_}")
    emit(data, as_json, lambda d: out.print(json.dumps(d, indent=2, default=str)))


@conflicts.command("resolve")
@click.argument("database")
@click.argument("conflict_id", type=int)
@click.option("--reapply", "action", flag_value="reapply", help="Write the losing version again, as a new change.")
@click.option("--dismiss", "action", flag_value="dismiss", help="Keep what won; mark the conflict resolved.")
@click.option("--version", "version", type=click.Choice(["local", "remote"]),
              help="After a merge: which version --reapply writes.")
@click.option("--file", "file_", type=int, default=0, show_default=True, help="Which file of the database.")
@common
def conflicts_resolve(conf: cfg.Config, as_json: bool, database: str, conflict_id: int, action: str | None,
                      version: str | None, file_: int) -> None:
    """Settle a conflict: --reapply its losing version, or --dismiss it."""
    if action is None:
        raise UsageError("say how to resolve it: --reapply (write the losing version again) or --dismiss")
    data = _client(conf).request("POST", f"/v1/conflicts/{database}/{conflict_id}/resolve",
                                 {"action": action, "version": version, "file": file_})
    emit(data, as_json, lambda d: out.print(f"conflict #{conflict_id}: {d['resolution']}"))
