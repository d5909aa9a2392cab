"""Replicated standby: each node keeps its own copy; real-time backup keeps the standby's.

With ``[cluster] mode = "replicated"`` a node's role decides how its databases are
opened. The active node (lease holder) is a primary: every database gets
``replicate_to`` = the other node. A standby opens every database as ``replica_of``
itself: it receives the active's cuts (docs/replication.md) and answers everything
else with NotActive. The lease lives in etcd: nothing else is shared.

Promotion (the lease expired and this standby took it): the replica's last cut is made
whole (a cut interrupted by a crash is applied again), what it holds of the old
primary (its origin and, per file, the last position applied) is written to
``data_dir/cluster/takeover-NAME.json``, the copy's capture is removed, and the
databases open as a primary, shipping to the old primary once it is back.

Rejoining (the old primary comes back, or an active node was fenced): before its files
are replaced by a seed of the new active's copy, every change this node captured as a
primary and the new active never applied (positions after the takeover record) is sent
to the new active, which records each one in its conflict log (``bastion conflicts``):
never applied on its own, never silently dropped. The old files are kept aside in
``data_dir/cluster/rejoined-TIME/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from typing import Any


from .. import capture
from ..fsutil import fsync_dir
from ..config import Config
from ..errors import ConfigError
from ..fsutil import durable_json
from ..peer import PeerClient
from ..replication.receiver import KEEP
from .. import conflicts as conflict_log
from ..tls import trust
from ..sqlite import connect

log = logging.getLogger("bastion.cluster.standby")


def origin_of(config: Config) -> str:
    """This daemon's capture origin (the same rule as bastion.replication)."""
    return config.replication.origin or f"{socket.gethostname()}:{config.data_dir}"


class ReplicatedMode:
    def __init__(self, config: Config, node: str) -> None:
        from ..replication.service import read_peer_token
        c = config.cluster
        assert c is not None
        self.config, self.node = config, node
        others = {n: a for n, a in c.peers.items() if n != node}
        if len(others) != 1 or node not in c.peers:
            raise ConfigError(f"{config.source}: [cluster] mode = \"replicated\" needs peers listing this node "
                              f"({node}) and exactly one other", hint="peers = { n1 = \"host:port\", n2 = ... }")
        (self.peer_name, addr), = others.items()
        self.peer_url = f"{config.scheme}://{addr}"
        self.origin = origin_of(config)
        self.token = read_peer_token(config.replication.peer_token_file or "")
        self.dir = os.path.join(config.data_dir, "cluster")
        os.makedirs(self.dir, exist_ok=True)

    # -- the two shapes of the config ------------------------------------------------------
    def active_config(self) -> Config:
        dbs = {n: dataclasses.replace(d, replicate_to=self.peer_url, replica_of=None, standby_optional=True)
               for n, d in self.config.databases.items()}
        return dataclasses.replace(self.config, databases=dbs)

    def standby_config(self) -> Config:
        dbs = {n: dataclasses.replace(d, replicate_to=None, replica_of=n, durability="durable")
               for n, d in self.config.databases.items()}
        return dataclasses.replace(self.config, databases=dbs)

    def _replica_state(self, name: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.config.data_dir, "replication", f"{name}.replica.json")) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}

    def _reset_replica_state(self, name: str) -> None:
        path = os.path.join(self.config.data_dir, "replication", f"{name}.replica.json")
        if os.path.exists(path):
            os.remove(path)

    # -- may this node take the lease? ------------------------------------------------------
    def eligible(self) -> str | None:
        """None if this node's files can serve as the primary; else why not."""
        for name, db in self.config.databases.items():
            seeded = self._replica_state(name).get("origin")
            for path in db.files:
                if not os.path.exists(path):
                    return f"{path} does not exist here (never seeded)"
                own = capture.origin_of(path) if capture.is_installed(path) else None
                if own is not None and own != self.origin and not own.startswith("replica:"):
                    return f"{path} holds changes captured by {own}: it must rejoin first"
                if own is not None and own.startswith("replica:") and not seeded:
                    return f"{path} is a replica copy that was never completely seeded"
        return None

    # -- promotion ------------------------------------------------------------------------------
    def take_over(self, standby_daemon: Any | None) -> list[dict[str, Any]]:
        """Make each replica copy whole and this node's own; called with the lease held,
        before the databases open as a primary."""
        out = []
        for name, db in self.config.databases.items():
            st = self._replica_state(name)
            old = st.get("origin")
            if not old:
                continue            # not a replica here (this node was the primary already)
            if standby_daemon is not None:
                rec = standby_daemon.replication.receiver
                rec.closed = True          # refuse whatever the old primary still sends
                with rec._locks[name]:     # and wait for a cut being applied
                    rec._drop_partial(name)
                    rec._redo(name)
            applied = []
            for path in db.files:
                applied.append(capture.applied_position(path, old) if os.path.exists(path) else None)
            record = {"database": name, "from_origin": old, "applied": applied, "at": time.time(),
                      "node": self.node}
            durable_json(os.path.join(self.dir, f"takeover-{name}.json"), record)
            for path in db.files:
                if os.path.exists(path) and capture.is_installed(path):
                    capture.remove(path, keep=KEEP)
            self._reset_replica_state(name)
            out.append(record)
            log.warning("took over %s from %s at positions %s", name, old, applied)
        return out

    def takeover_record(self, name: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.dir, f"takeover-{name}.json")) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}

    # -- rejoining ---------------------------------------------------------------------------------
    def needs_rejoin(self) -> bool:
        """Files captured here as a primary: they hold changes the active may not have."""
        for db in self.config.databases.values():
            for path in db.files:
                if os.path.exists(path) and capture.is_installed(path) and capture.origin_of(path) == self.origin:
                    return True
        return False

    def rejoin(self, active_url: str) -> dict[str, Any]:
        """Hand every change the active never applied to its conflict log, then put the
        old files aside so that the active seeds this node as its standby."""
        http = PeerClient(active_url, token=self.token, timeout=60.0,
                          verify=trust(self.config.replication.peer_ca_file), label="the active node",
                          hint="this node stays out of service and retries")
        sent: dict[str, list[int]] = {}
        try:
            for name, db in self.config.databases.items():
                rec = http.post("/v1/peer/takeover", json={"database": name})
                applied = rec.get("applied") if rec.get("from_origin") == self.origin else None
                counts = []
                for i, path in enumerate(db.files):
                    if not (os.path.exists(path) and capture.is_installed(path)
                            and capture.origin_of(path) == self.origin):
                        counts.append(0)
                        continue
                    # Not taken over from us (or no record): every change still logged here is
                    # sent; the active records what it cannot tell apart as a conflict too.
                    after = (applied[i] if applied and applied[i] is not None else 0)
                    n = 0
                    while True:
                        changes = [c for c in capture.read_changes(path, after, 2000) if c.op != "reseed"]
                        if not changes:
                            break
                        http.post("/v1/peer/reconcile", msgpack={"database": name, "origin": self.origin,
                                                                 "node": self.node, "file": i,
                                                                 "batch": capture.to_wire(changes)})
                        n += len(changes)
                        after = changes[-1].seq
                    counts.append(n)
                    # and this node's conflict log: resolutions made here while it was primary
                    # (the copy the active holds came with an older one)
                    log_rows = conflict_log.rows(path)
                    if log_rows:
                        http.post("/v1/peer/reconcile", msgpack={"database": name, "origin": self.origin,
                                                                 "node": self.node, "file": i,
                                                                 "conflicts": log_rows})
                sent[name] = counts
        finally:
            http.close()
        aside = os.path.join(self.dir, time.strftime("rejoined-%Y%m%dT%H%M%SZ", time.gmtime()))
        for name, db in self.config.databases.items():
            for path in db.files:
                for p in (path, path + "-wal", path + "-shm"):
                    if os.path.exists(p):
                        os.makedirs(aside, exist_ok=True)
                        shutil.move(p, os.path.join(aside, os.path.basename(p)))
            self._reset_replica_state(name)
        if os.path.isdir(aside):
            fsync_dir(aside)
        log.warning("rejoined as standby: %s change(s) handed to the active's conflict log; old files in %s",
                    sent, aside)
        return {"sent": sent, "kept_aside": aside if os.path.isdir(aside) else None}


def reconcile_record(con_path: str, origin: str, node: str, changes: list[capture.Change] | None,
                     conflicts: list[Any] | None = None) -> int:
    """On the active: record an old primary's unshipped changes in the conflict log, or take in
    its conflict log."""
    con = connect.app_file(con_path)
    try:
        if conflicts is not None:
            return conflict_log.merge(con, conflicts)
        return conflict_log.record_unshipped(con, origin, node, changes or [])
    finally:
        con.close()
