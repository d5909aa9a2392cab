"""Cluster: status of every node, planned switchover."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from .base import _seconds, cli, common, emit, out


@cli.group()
def cluster() -> None:
    """Active/passive cluster: roles of the nodes, planned switchover."""


@cluster.command("status")
@common
def cluster_status(conf: cfg.Config, as_json: bool) -> None:
    """Every node's role (from [cluster] peers), the lease holder and its fencing token."""
    from ..cluster import control
    from ..daemon.auth import read_token
    res = control.status(conf, read_token(conf.token_file))
    data = {**res.to_dict(), "verdict": res.outcome}

    def human(d: dict[str, Any]) -> None:
        t = Table("node", "address", "role", "writable", "fencing token", "error")
        for r in d["nodes"]:
            t.add_row(r["node"], r["address"], str(r["role"]), str(r.get("writable", "")), str(r.get("token") or ""),
                      str(r.get("last_error") or r.get("error") or ""))
        out.print(t)
        out.print(f"active: {', '.join(d['active']) or 'NONE'}")
    emit(data, as_json, human)


@cluster.command("switchover")
@click.option("--to", "to", default=None, help="The node to hand over to (default: any passive node).")
@click.option("--timeout", type=float, default=30.0, callback=_seconds, help="Seconds to wait for the new active.")
@common
def cluster_switchover(conf: cfg.Config, as_json: bool, to: str | None, timeout: float) -> None:
    """Planned switchover: the active node stops, hands the lease over, and a passive one takes it."""
    from ..cluster import control
    from ..daemon.auth import read_token
    res = control.switchover(conf, read_token(conf.token_file), to, timeout)
    data = {**res.to_dict(), "verdict": res.outcome}
    emit(data, as_json, lambda d: out.print(f"switchover {d['from']} -> {d['to'] or 'NONE (no node took over)'} "
                                            f"in {d['seconds']:.2f} s"))
