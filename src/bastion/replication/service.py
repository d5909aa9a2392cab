"""Replication inside the daemon: shippers for primary databases, a receiver for replicas."""

from __future__ import annotations

import hmac
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict
from collections.abc import Callable, Iterator

from ..errors import ConfigError, Outcome, UnknownTarget, UsageError
from .receiver import Receiver, ReplicaStatus
from .shipper import PrimaryStatus, Shipper

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..config import Config
    from ..contops import ContinuousOperations
    from ..sql.service import SQLService

log = logging.getLogger("bastion.replication")


@dataclass(frozen=True)
class Parts:
    """What the shippers and the receiver use of the daemon, and nothing more (they read these
    attributes off the object they are given)."""
    config: Config
    catalog: Catalog
    contops: ContinuousOperations
    sql: SQLService
    renewed_after: Callable[[float], bool] | None = None   # cluster node: may a primary degrade (shipper.py)


def read_peer_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except FileNotFoundError:
        raise ConfigError(f"peer token file {path} does not exist",
                          hint="write the same shared secret into it on both daemons "
                               "(e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read peer token file {path}: {exc}") from None
    if len(token) < 16:
        raise ConfigError(f"peer token file {path} holds less than 16 characters",
                          hint="use a long random secret, e.g. `openssl rand -hex 32`")
    return token


class ReplicationStatus(TypedDict):
    """`replicate status` (GET /v1/replication/status): the JSON is this dict as is."""
    origin: str
    databases: list[PrimaryStatus | ReplicaStatus]
    verdict: Outcome


class Replication:
    def __init__(self, config: Config, catalog: Catalog, contops: ContinuousOperations, sql: SQLService,
                 renewed_after: Callable[[float], bool] | None = None) -> None:
        self.config = config
        self.origin = config.replication.origin or f"{socket.gethostname()}:{config.data_dir}"
        # the peer token also opens /v1/peer/sync/* (multi-site sync) and the cluster's peer routes
        needed = any(d.replicate_to or d.replica_of or d.sync_group for d in config.databases.values()) or bool(
            config.cluster and config.cluster.mode == "replicated")
        path = config.replication.peer_token_file
        self.peer_token = read_peer_token(path) if needed and path else None
        parts = Parts(config, catalog, contops, sql, renewed_after)
        self.receiver = Receiver(parts, self.origin)
        self.shippers = {n: Shipper(parts, n, self.origin, self.peer_token or "")
                         for n, d in config.databases.items() if d.replicate_to}
        for name, s in self.shippers.items():      # durability = "replicated": commits wait for the peer
            sqldb = sql.databases.get(name)
            if sqldb is not None and sqldb.durability == "replicated":
                sqldb.replicated_wait = (lambda positions, s=s, t=sql.settings.busy_timeout:
                                         s.wait_applied(positions, t))
        for name in self.receiver.replicas:    # writes through the SQL server wait for promotion
            sqldb = sql.databases.get(name)
            if sqldb is not None:
                sqldb.guard = self.receiver.sql_guard(name, sqldb.guard)

    def start(self) -> None:
        for s in self.shippers.values():
            s.start()

    def stop(self) -> None:
        for s in self.shippers.values():
            s.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No pass runs (so no connection of ours is open on the files) while this is held."""
        held = []
        try:
            for s in self.shippers.values():
                s.pass_lock.acquire()
                held.append(s)
            yield
        finally:
            for s in held:
                s.pass_lock.release()

    def peer_allowed(self, header: str | None) -> bool:
        if not self.peer_token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.peer_token.encode())

    def status(self, name: str | None = None) -> ReplicationStatus:
        dbs: list[PrimaryStatus | ReplicaStatus] = [s.status() for s in self.shippers.values()]
        dbs += self.receiver.status()
        if name is not None:
            dbs = [d for d in dbs if d["database"] == name]
            if not dbs:
                raise UnknownTarget(f"database {name!r} neither replicates nor is a replica here",
                                    hint=self._known())
        failing = any(d.get("failures") for d in dbs) or any(d.get("divergence") for d in dbs)
        return {"origin": self.origin, "databases": dbs,
                "verdict": Outcome.PARTIAL if failing else Outcome.OK}

    def _known(self) -> str:
        names = sorted(self.shippers) + sorted(self.receiver.replicas)
        return "replicating databases here: " + (", ".join(names) or "none")

    def run(self, name: str, timeout: float = 300.0) -> dict[str, Any]:
        s = self.shippers.get(name)
        if s is None:
            raise UsageError(f"database {name!r} has no replicate_to in this daemon's config", hint=self._known())
        return s.run_now(timeout)

    def promote(self, name: str) -> dict[str, Any]:
        return self.receiver.promote(name)
