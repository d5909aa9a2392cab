"""The cluster seen from outside, as an operator drives it: every node's role, and a planned
switchover (find the one active node, ask it to hand over, wait for the new active).

The node's own half of a switchover (drain, demote, hand the lease over) is
ClusterNode.switchover, behind POST /v1/cluster/switchover; this module is the protocol
around it, over the nodes' HTTP APIs (bastion.peer), so that the CLI stays a thin layer and
anything else (a script, the dashboard) can drive the same steps.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import Config
from ..errors import BastionError, UsageError
from ..peer import PeerClient
from ..tls import trust


def nodes(config: Config) -> dict[str, str]:
    """Every node of the cluster by name -> host:port (this one included), from [cluster] peers."""
    if not config.cluster:
        raise UsageError(f"{config.source} has no [cluster] section: this daemon is not part of a cluster")
    out = dict(config.cluster.peers)
    out.setdefault(config.cluster.node, config.base_url.split("://", 1)[1])
    return out


def _client(config: Config, addr: str, token: str | None, timeout: float) -> PeerClient:
    return PeerClient(f"{config.scheme}://{addr}", token=token, timeout=timeout,
                      verify=trust(config.tls_ca or config.tls_cert), prefix_errors=False)


def role(config: Config, addr: str) -> str:
    """What the node at ``addr`` says it is (its /v1/health, no token needed), or "unreachable"."""
    c = _client(config, addr, None, 3.0)
    try:
        return str(c.get("/v1/health")["role"])
    except (BastionError, KeyError, TypeError):
        return "unreachable"
    finally:
        c.close()


def status(config: Config, token: str) -> dict[str, Any]:
    """Every node's role, writability, fencing token and lease holder; ``active``: the nodes
    that say they are active (exactly one when all is well)."""
    rows = []
    for name, addr in sorted(nodes(config).items()):
        c = _client(config, addr, token, 5.0)
        try:
            d = c.get("/v1/cluster/status")
            rows.append({"node": name, "address": addr, "role": d.get("role"), "writable": d.get("writable"),
                         "token": d.get("token"), "lease_holder": (d.get("lease") or {}).get("holder"),
                         "last_error": d.get("last_error")})
        except BastionError as exc:
            # no answer at all, or an answer that is an error (a wrong token, say): not the same
            rows.append({"node": name, "address": addr, "role": "unreachable" if "transport" in exc.details else None,
                         "error": exc.message})
        finally:
            c.close()
    return {"nodes": rows, "active": [r["node"] for r in rows if r.get("role") == "active"]}


def switchover(config: Config, token: str, to: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Hand the active role over to ``to`` (or any passive node) and wait up to ``timeout``
    seconds for a new active. ``to`` is None in the result when no node took over in time."""
    known = nodes(config)
    if to and to not in known:
        raise UsageError(f"unknown node {to!r}", hint="known: " + ", ".join(sorted(known)))
    active = [n for n, a in known.items() if role(config, a) == "active"]
    if len(active) != 1:
        raise BastionError(f"expected one active node, found {len(active)}: {', '.join(active) or 'none'}",
                           hint="see `bastion cluster status`")
    t0 = time.monotonic()
    c = _client(config, known[active[0]], token, 60.0)
    try:
        c.post("/v1/cluster/switchover", json={"to": to})
    finally:
        c.close()
    new = None
    while time.monotonic() - t0 < timeout:
        cands = [n for n, a in known.items() if n != active[0] and (to is None or n == to)
                 and role(config, a) == "active"]
        if cands:
            new = cands[0]
            break
        time.sleep(0.1)
    return {"from": active[0], "to": new, "seconds": round(time.monotonic() - t0, 3)}
