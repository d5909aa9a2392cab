"""Cluster: status of every node, planned switchover."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from ..errors import BastionError, UsageError
from ..tls import trust
from .base import _seconds, cli, common, emit, out


@cli.group()
def cluster() -> None:
    """Active/passive cluster: roles of the nodes, planned switchover."""


def _nodes(conf: cfg.Config) -> dict[str, str]:
    if not conf.cluster:
        raise UsageError(f"{conf.source} has no [cluster] section: this daemon is not part of a cluster")
    nodes = dict(conf.cluster["peers"])
    nodes.setdefault(conf.cluster["node"], conf.base_url.split("://", 1)[1])
    return nodes


@cluster.command("status")
@common
def cluster_status(conf: cfg.Config, as_json: bool) -> None:
    """Every node's role (from [cluster] peers), the lease holder and its fencing token."""
    import httpx

    from ..daemon.auth import read_token
    token = read_token(conf.token_file)
    rows = []
    for name, addr in sorted(_nodes(conf).items()):
        try:
            r = httpx.get(f"{conf.scheme}://{addr}/v1/cluster/status", headers={"Authorization": f"Bearer {token}"},
                          timeout=5, verify=trust(conf.tls_ca or conf.tls_cert))
            d = r.json()
            rows.append({"node": name, "address": addr, "role": d.get("role"), "writable": d.get("writable"),
                         "token": d.get("token"), "lease_holder": (d.get("lease") or {}).get("holder"),
                         "last_error": d.get("last_error")})
        except (httpx.HTTPError, ValueError) as exc:
            rows.append({"node": name, "address": addr, "role": "unreachable", "error": str(exc)})
    active = [r["node"] for r in rows if r.get("role") == "active"]
    data = {"nodes": rows, "active": active, "exit_code": 0 if len(active) == 1 else 1}

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
    import httpx

    from ..daemon.auth import read_token
    token = read_token(conf.token_file)
    nodes = _nodes(conf)
    if to and to not in nodes:
        raise UsageError(f"unknown node {to!r}", hint="known: " + ", ".join(sorted(nodes)))
    hdr = {"Authorization": f"Bearer {token}"}

    def role(addr: str) -> str:
        try:
            return httpx.get(f"{conf.scheme}://{addr}/v1/health", timeout=3, verify=trust(conf.tls_ca or conf.tls_cert)).json()["role"]
        except (httpx.HTTPError, ValueError, KeyError):
            return "unreachable"
    active = [n for n, a in nodes.items() if role(a) == "active"]
    if len(active) != 1:
        raise BastionError(f"expected one active node, found {len(active)}: {', '.join(active) or 'none'}",
                           hint="see `bastion cluster status`")
    t0 = time.monotonic()
    r = httpx.post(f"{conf.scheme}://{nodes[active[0]]}/v1/cluster/switchover", json={"to": to}, headers=hdr,
                   timeout=60, verify=trust(conf.tls_ca or conf.tls_cert))
    if r.status_code >= 400:
        raise BastionError.from_dict(r.json().get("error", {}))
    new = None
    while time.monotonic() - t0 < timeout:
        cands = [n for n, a in nodes.items() if n != active[0] and (to is None or n == to) and role(a) == "active"]
        if cands:
            new = cands[0]
            break
        time.sleep(0.1)
    data = {"from": active[0], "to": new, "seconds": round(time.monotonic() - t0, 3), "exit_code": 0 if new else 2}
    emit(data, as_json, lambda d: out.print(f"switchover {d['from']} -> {d['to'] or 'NONE (no node took over)'} "
                                            f"in {d['seconds']:.2f} s"))
