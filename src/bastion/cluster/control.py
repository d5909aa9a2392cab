"""The cluster as an operator drives it: every node's role, and a planned switchover.

The one implementation of the switchover protocol, for the CLI and the HTTP API alike:

- :func:`switchover` (``bastion cluster switchover``): find the one active node, ask it to
  hand over (POST /v1/cluster/switchover), wait for the new active;
- :func:`handover`, what that route runs on the active node: check the target, then
  ClusterNode.switchover (drain, demote, hand the lease over);
- :func:`node_status` / :func:`status`: one node's answer to GET /v1/cluster/status, and
  every node's, read over the nodes' HTTP APIs (bastion.peer).

Both halves check the target with :func:`check_target`: a request straight to the API with
a name that is no node must not release the lease reserved for nobody (no node would be
active until the reservation ran out). Results are typed (:class:`Switchover`,
:class:`ClusterStatus`) with an :class:`~bastion.errors.Outcome`; only the CLI turns that
into an exit code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import BastionError, Outcome, StateConflict, UsageError
from ..peer import PeerClient
from ..tls import trust

if TYPE_CHECKING:
    from .node import ClusterNode


@dataclass(frozen=True)
class Switchover:
    """A planned switchover: from the node that was active to the one that took over
    (None: none took over in time, or the node's half alone, which does not wait)."""

    from_node: str
    to: str | None
    seconds: float | None = None
    waited: bool = True

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK if self.to or not self.waited else Outcome.FAILED

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"from": self.from_node, "to": self.to}
        if self.seconds is not None:
            d["seconds"] = self.seconds
        return d


@dataclass(frozen=True)
class ClusterStatus:
    """Every node's row (role, writable, fencing token, lease holder, error) and the active ones."""

    nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> list[str]:
        return [r["node"] for r in self.nodes if r.get("role") == "active"]

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK if len(self.active) == 1 else Outcome.PARTIAL

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "active": self.active}


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


def check_target(config: Config, to: str | None, active: str) -> None:
    """Refuse a switchover to a node the cluster does not list, or to the active node itself."""
    known = nodes(config)
    if to is not None and to not in known:
        raise UsageError(f"unknown node {to!r}: [cluster] peers lists no such node",
                         hint="known: " + ", ".join(sorted(known)))
    if to == active:
        raise StateConflict(f"node {to} is already active")


def handover(node: ClusterNode, to: str | None) -> Switchover:
    """The active node's half (POST /v1/cluster/switchover): hand the lease over to ``to``
    (None: whichever passive node takes it first). Does not wait for the new active."""
    check_target(node.config, to, node.name)
    node.switchover(to)
    return Switchover(node.name, to, waited=False)


def node_status(node: ClusterNode | None) -> dict[str, Any]:
    """This node's answer to GET /v1/cluster/status (a daemon outside a cluster is active)."""
    if node is None:
        return {"node": None, "role": "active", "clustered": False}
    return {**node.describe(), "clustered": True}


def role(config: Config, addr: str) -> str:
    """What the node at ``addr`` says it is (its /v1/health, no token needed), or "unreachable"."""
    c = _client(config, addr, None, 3.0)
    try:
        return str(c.get("/v1/health")["role"])
    except (BastionError, KeyError, TypeError):
        return "unreachable"
    finally:
        c.close()


def status(config: Config, token: str) -> ClusterStatus:
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
    return ClusterStatus(rows)


def switchover(config: Config, token: str, to: str | None = None, timeout: float = 30.0) -> Switchover:
    """Hand the active role over to ``to`` (or any passive node) and wait up to ``timeout``
    seconds for a new active. ``to`` is None in the result when no node took over in time."""
    known = nodes(config)
    check_target(config, to, "")
    active = [n for n, a in known.items() if role(config, a) == "active"]
    if len(active) != 1:
        raise BastionError(f"expected one active node, found {len(active)}: {', '.join(active) or 'none'}",
                           hint="see `bastion cluster status`")
    check_target(config, to, active[0])
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
    return Switchover(active[0], new, round(time.monotonic() - t0, 3))
