"""Replication: status, run, promote."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from .base import _client, _seconds, cli, common, emit, out


@cli.group()
def replicate() -> None:
    """Real-time backup to a second Bastion daemon (see docs/replication.md)."""


@replicate.command("status")
@click.argument("database", required=False)
@common
def replicate_status(conf: cfg.Config, as_json: bool, database: str | None) -> None:
    """Per database: positions shipped and applied, lag in changes and seconds, last error, divergence."""
    q = f"?database={database}" if database else ""
    data = _client(conf).request("GET", "/v1/replication/status" + q)

    def human(d: dict[str, Any]) -> None:
        if not d["databases"]:
            out.print("no database replicates on this daemon")
        for r in d["databases"]:
            if r["role"] == "primary":
                out.print(f"{r['database']}: primary -> {r['peer']} ({r['schedule']}), {r['state']}; "
                          f"lag {r['lag_changes']} changes, {r['lag_seconds']} s; "
                          f"last error: {r['last_error'] or 'none'}"
                          + (f" ({r['failures']} failures in a row)" if r["failures"] else ""))
                t = Table("file", "position", "shipped", "applied", "lag (changes)", "lag (s)")
                for f in r["files"]:
                    t.add_row(f["path"], str(f["position"]), str(f["shipped"]), str(f["applied"]),
                              str(f["lag_changes"]), str(f["lag_seconds"]))
            else:
                state = "PROMOTED (writable)" if r["promoted"] else "replica (read-only)"
                out.print(f"{r['database']}: {state} of {r['replica_of']} from {r['primary_origin']}; "
                          f"seeded {r['seeded_at']}; last batch {r['last_apply_at']}; "
                          + (f"DIVERGENCE: {r['divergence']} local changes" if r["divergence"] else "no divergence"))
                t = Table("file", "applied", "applied at", "local changes")
                for f in r["files"]:
                    t.add_row(f["path"], str(f.get("applied")), str(f.get("applied_at")), str(f.get("local_changes")))
            out.print(t)
    emit(data, as_json, human)


@replicate.command("run")
@click.argument("database")
@click.option("--timeout", type=float, default=300.0, callback=_seconds, help="Seconds to wait for the pass.")
@common
def replicate_run(conf: cfg.Config, as_json: bool, database: str, timeout: float) -> None:
    """Ship every pending change of DATABASE now (whatever its schedule)."""
    data = _client(conf).request("POST", "/v1/replication/run", {"database": database, "timeout": timeout},
                                 timeout=timeout + 30)
    emit(data, as_json, lambda d: out.print(
        f"{database}: shipped {d.get('shipped', 0)} changes" + (" after seeding the replica" if d.get("seeded") else "")
        + (" (blackout window: nothing sent)" if d.get("blackout") else "")
        + (f"; FAILED: {d['error']}" if d.get("error") else "")))


@replicate.command("promote")
@click.argument("database")
@common
def replicate_promote(conf: cfg.Config, as_json: bool, database: str) -> None:
    """On the backup daemon: make the replica DATABASE a normal writable, protected database."""
    data = _client(conf).request("POST", "/v1/replication/promote", {"database": database})
    emit(data, as_json, lambda d: out.print(
        f"{database}: " + ("was already promoted" if d["already"] else "promoted: writable; it no longer follows "
                           "the primary")))
