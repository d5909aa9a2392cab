"""One node of an active/passive cluster on shared storage.

Every node runs ``bastion serve`` with its own config (its own ``listen`` and ``[cluster]
node``) and the same ``data_dir``. A node starts passive: it answers /v1/health and
/v1/cluster/* and refuses everything else with NotActive (HTTP 503), which drivers
take as "try the next host". It takes the lease when it is free, then opens the
databases (SQLite's recovery rolls back what the previous active left in flight) and
serves.

Self-fencing: the active renews the lease every ``ttl/6``. It may acknowledge writes
only until ``fence_at`` = (start of its last successful renewal) + ttl − margin, which
comes before the lease can expire for anyone else; every commit checks this guard
right before COMMIT. If the lease cannot be renewed by then, or turns out to be held
by another node, the node stops serving (fenced), closes the databases and becomes
passive again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Any
from collections.abc import Callable

from .. import hooks
from ..config import Config
from ..errors import NotActive, StateConflict
from .lease import EtcdLease, FileLease, LeaseUnavailable
from .standby import ReplicatedMode

log = logging.getLogger("bastion.cluster")

PASSIVE, ACTIVE, FENCED, PROMOTING = "passive", "active", "fenced", "promoting"


class ClusterNode:
    def __init__(self, config: Config, open_daemon: Callable[[Config], Any]) -> None:
        c = config.cluster
        assert c is not None
        self.config = config
        self.name: str = c.node
        self.ttl: float = c.ttl
        self.margin = self.ttl / 3
        self.interval = self.ttl / 6
        self.hooks = {"promote": c.on_promote, "demote": c.on_demote}
        # hooks run one at a time, in order, off the lease loop: a slow hook must not stop renewals
        self._hook_runner = ThreadPoolExecutor(1, thread_name_prefix="bastion-hook")
        if c.lease == "etcd":
            self.lease: Any = EtcdLease(list(c.etcd), c.name, self.name, self.ttl)
        else:
            self.lease = FileLease(config.data_dir, self.name, self.ttl)
        self.open_daemon = open_daemon
        self.daemon: Any = None
        # replicated mode: each node its own copy; a standby holds a receiving daemon (standby.py)
        self.replicated = ReplicatedMode(config, self.name) if c.mode == "replicated" else None
        self.standby: Any = None
        self.role = PASSIVE
        self.token: int | None = None
        self.fence_at = 0.0
        self.since = time.time()
        self.last_error: str | None = None
        self.events: list[dict[str, Any]] = []
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._mutex = threading.RLock()
        self._thread = threading.Thread(target=self._run, name="bastion-cluster", daemon=True)

    # -- what the rest of the daemon asks ---------------------------------------------
    def may_write(self) -> bool:
        return self.role == ACTIVE and time.time() < self.fence_at and not self._draining

    def renewed_after(self, t: float) -> bool:
        """This node may write, and its lease was renewed by a request that started after ``t``
        (so no other node can take the lease before this node's fence time). A primary that
        is itself cut off cannot prove that, so it never acknowledges a commit its standby
        did not get (replicated mode, standby down: see Shipper.wait_applied)."""
        return self.may_write() and self.fence_at - (self.ttl - self.margin) > t

    def guard(self) -> None:
        """Raise unless this node may acknowledge a write now (called right before COMMIT)."""
        if not self.may_write():
            raise NotActive(f"node {self.name} is {self.role}: it may not accept writes",
                            hint="the driver retries on the active node")

    def replication(self) -> Any:
        """The replication service peer requests reach: the active's, or the standby's receiver."""
        if self.role == ACTIVE and self.daemon is not None:
            return self.daemon.replication
        if self.standby is not None:
            return self.standby.replication
        raise NotActive(f"node {self.name} is {self.role}: it neither ships nor receives now")

    def active_hint(self) -> str:
        """What to tell a person who sent an admin request to this passive node: which node to
        ask instead (drivers just try their next host)."""
        try:
            holder = (self.lease.holder() or {}).get("node")
        except Exception:  # a hint must not turn one error into another
            holder = None
        if not holder or holder == self.name:
            return "no node is active now: see `bastion cluster status`; drivers retry on their own"
        addr = self.config.cluster.peers.get(holder) if self.config.cluster else None
        return (f"the active node is {holder}" + (f" at {addr}" if addr else "") + ": run the command there "
                "(with its --config), or see `bastion cluster status`; drivers do this on their own")

    def lag(self) -> dict[str, Any]:
        """Replicated mode: how far the standby is behind (as the active sees it), or when
        the standby last applied a cut."""
        if self.replicated is None:
            return {"lag_seconds": 0.0}
        now = time.time()
        if self._lag_cache and now - self._lag_cache[0] < 1.0:
            return self._lag_cache[1]
        out: dict[str, Any] = {"lag_seconds": None}
        try:
            if self.role == ACTIVE and self.daemon is not None:
                st = [s.status() for s in self.daemon.replication.shippers.values()]
                lags = [x["lag_seconds"] for x in st if x.get("lag_seconds") is not None]
                out = {"lag_seconds": max(lags) if lags else None,
                       "lag_changes": sum(x.get("lag_changes") or 0 for x in st),
                       "standby_state": [x["state"] for x in st],
                       "degraded": any(x.get("degraded") for x in st)}
            elif self.standby is not None:
                rec = self.standby.replication.receiver
                last = max(rec.last_apply.values(), default=None)
                out = {"lag_seconds": None, "last_apply_age": None if last is None else round(now - last, 3),
                       "seeded": all(rec.state[n].get("origin") for n in rec.replicas)}
        except Exception as exc:  # health must answer
            out = {"lag_seconds": None, "error": str(exc)}
        self._lag_cache = (now, out)
        return out

    _lag_cache: tuple[float, dict[str, Any]] | None = None

    def describe(self) -> dict[str, Any]:
        assert self.config.cluster is not None      # a node's config has its [cluster] (__init__)
        try:
            holder = self.lease.holder()
        except LeaseUnavailable as exc:
            holder = {"error": str(exc)}
        return {"node": self.name, "role": self.role, "writable": self.may_write(), "token": self.token,
                "mode": "replicated" if self.replicated else "shared",
                "standby": self.standby is not None, **({"replication": self.lag()} if self.replicated else {}),
                "since": self.since, "lease": {"kind": self.config.cluster.lease, "ttl": self.ttl,
                                                "holder": holder},
                "last_error": self.last_error, "events": self.events[-10:]}

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._mutex:
            if self.role in (ACTIVE, FENCED, PROMOTING):
                self._demote("the daemon is stopping", release=True)
            self._close_standby()
        self._hook_runner.shutdown(wait=True)      # on_demote runs before the process exits

    def switchover(self, to: str | None) -> None:
        """Drain, demote and hand the lease over (to ``to``, checked by cluster.control.handover)."""
        if self.role != ACTIVE:
            raise NotActive(f"node {self.name} is {self.role}: only the active node can hand over")
        if to == self.name:
            raise StateConflict(f"node {self.name} is already active")
        try:
            if self.replicated is not None and self.daemon is not None:
                # Replicated standby: stop acknowledging writes, then ship everything to the
                # standby before it takes over, so that the handover leaves nothing behind.
                # (Not under the mutex: the lease must keep being renewed meanwhile.)
                self._draining = True
                for shipper in self.daemon.replication.shippers.values():
                    res = shipper.run_now(timeout=60)
                    if res.get("error"):
                        raise StateConflict(f"switchover refused: the standby did not take the last changes "
                                            f"of {shipper.name}: {res['error']}",
                                            hint="check `bastion replicate status`; retry when it is caught up")
            with self._mutex:
                if self.role != ACTIVE:
                    raise NotActive(f"node {self.name} is {self.role}: only the active node can hand over")
                self._demote(f"switchover to {to or 'any passive node'}", release=True, handoff_to=to)
                # stay out of the race for a while so that another node takes it
                self._hold_off_until = time.monotonic() + 3 * self.ttl
        finally:
            self._draining = False

    _draining = False
    _hold_off_until = 0.0
    renewals = 0

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._mutex:
                    if self.role == ACTIVE:
                        self._renew()
                    elif self.role == PASSIVE and self.replicated is not None:
                        self._standby_step()
                    elif self.role == PASSIVE and time.monotonic() >= self._hold_off_until:
                        self._try_promote()
            except Exception as exc:  # the loop must go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("cluster loop")

    def _renew(self) -> None:
        t0 = time.time()
        try:
            ok = self.lease.renew()
        except LeaseUnavailable as exc:
            self.last_error = str(exc)
            if time.time() >= self.fence_at:
                self._demote(f"lease not renewed in time ({exc})", release=False)
            return
        if ok:
            self.fence_at = t0 + self.ttl - self.margin
            self.renewals += 1      # for /metrics
        else:
            self._demote("the lease is held by another node", release=False)

    def _standby_step(self) -> None:
        """Replicated mode, not active: follow the active as its standby, or take over."""
        assert self.replicated is not None
        try:
            holder = self.lease.holder()
        except LeaseUnavailable as exc:
            self.last_error = str(exc)
            return
        if holder and holder.get("node") != self.name:
            if self.standby is None:
                url = self.replicated.peer_url
                if self.replicated.needs_rejoin():
                    res = self.replicated.rejoin(url)
                    self._event("rejoined", **res)
                self.standby = self.open_daemon(self.replicated.standby_config())
                self.since = time.time()
                self._event("standby", of=holder.get("node"))
                log.warning("node %s is a STANDBY of %s", self.name, holder.get("node"))
            return
        if time.monotonic() < self._hold_off_until:
            return
        why = self.replicated.eligible()
        if why:
            if self.last_error != f"cannot take over: {why}":
                log.warning("node %s cannot take over: %s", self.name, why)
            self.last_error = f"cannot take over: {why}"
            return
        self._try_promote()

    def _close_standby(self) -> None:
        if self.standby is not None:
            try:
                self.standby.close()
            except Exception:
                log.exception("closing the standby daemon")
            self.standby = None

    def _try_promote(self) -> None:
        # On a shared data_dir the active holds daemon.lock (an flock) for as long as it
        # holds the lease: getting it proves the active's process is gone, so there is no
        # need to wait for the lease to expire. Still held but the lease long expired: the
        # holder is stalled (stopped, swapping); it is fenced by time, take over anyway.
        self._lock_fd = self._try_flock() if self.replicated is None else None
        try:
            t0 = time.time()
            if isinstance(self.lease, FileLease):
                token = self.lease.try_acquire(holder_dead=self._lock_fd is not None,
                                               grace=0.0 if self._lock_fd is not None else self.ttl)
            else:
                token = self.lease.try_acquire()
        except LeaseUnavailable as exc:
            self.last_error = str(exc)
            token = None
        if token is None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            return
        self.role, self.token = PROMOTING, token
        self.fence_at = t0 + self.ttl - self.margin
        self._event("lease acquired", token=token)
        log.warning("node %s holds the lease (fencing token %s): opening the databases", self.name, token)
        try:
            if self.replicated is not None:
                standby, self.standby = self.standby, None
                taken = self.replicated.take_over(standby)
                if standby is not None:
                    standby.close()
                if taken:
                    self._event("took over", databases=[t["database"] for t in taken])
                self.daemon = self.open_daemon(self.replicated.active_config())
            else:
                if self._lock_fd is None:
                    self._take_data_dir()
                self._mark_lock()
                self.daemon = self.open_daemon(self.config)
        except Exception as exc:  # give the lease back, stay passive
            self.last_error = f"promotion failed: {exc}"
            log.error("node %s: promotion failed: %s", self.name, exc)
            self._demote(f"promotion failed: {exc}", release=True)
            return
        self.role, self.since = ACTIVE, time.time()
        self._event("active", token=token)
        log.warning("node %s is ACTIVE (fencing token %s)", self.name, token)
        self._hook("promote", token)

    def _try_flock(self) -> int | None:
        path = os.path.join(self.config.data_dir, "daemon.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:   # not a name a stopping daemon removed
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def _take_data_dir(self) -> None:
        """Lease taken without daemon.lock: the previous active may still be closing its
        databases; wait for it up to one TTL (it is fenced by time by then)."""
        deadline = time.monotonic() + self.ttl
        while (fd := self._try_flock()) is None:
            if time.monotonic() > deadline:
                log.warning("node %s: the previous active still holds daemon.lock; going on under the lease",
                            self.name)
                return
            time.sleep(0.05)
        self._lock_fd = fd

    def _mark_lock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()} {self.name}\n".encode(), 0)

    def _demote(self, why: str, release: bool, handoff_to: str | None = None) -> None:
        was, token = self.role, self.token
        self.role = FENCED
        self.fence_at = 0.0
        self._event("fenced", why=why)
        log.warning("node %s stops serving: %s", self.name, why)
        try:
            if self.daemon is not None:
                self.daemon.close()
        except Exception:
            log.exception("closing the daemon")
        self.daemon = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if release:
            try:
                self.lease.release(handoff_to)
            except LeaseUnavailable as exc:
                self.last_error = str(exc)
        self.role, self.token, self.since = PASSIVE, None, time.time()
        self._event("passive", why=why)
        if was == ACTIVE:
            self._hook("demote", token)

    def _event(self, what: str, **kw: Any) -> None:
        self.events.append({"at": time.time(), "event": what, **kw})
        del self.events[:-50]

    def _hook(self, which: str, token: int | None) -> None:
        cmd = self.hooks.get(which)
        if not cmd:
            return
        env = {"BASTION_NODE": self.name, "BASTION_ROLE": which, "BASTION_TOKEN": str(token or "")}
        self._hook_runner.submit(self._run_hook, which, cmd, env)

    def _run_hook(self, which: str, cmd: Any, env: dict[str, str]) -> None:
        res = hooks.run(cmd, f"node {self.name}: on_{which} hook", env, timeout=30)
        if res["error"]:
            self.last_error = f"on_{which} hook {res['error']}"
        self._event(f"on_{which} hook", exit_code=res["exit_code"], error=res["error"])
