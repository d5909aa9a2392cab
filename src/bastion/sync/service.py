"""Multi-site sync inside the daemon: one thread per synced database pushes to its neighbours.

Every site runs the same loop, so each pair of neighbours exchanges both ways: a pass asks
the neighbour which changes it holds (its vector), sends what it lacks in batches
(msgpack, POST /v1/peer/sync/apply; the neighbour applies each batch in one transaction
with the group's policy and answers with its new vector), and records that vector, so
the log can be pruned once every neighbour holds an entry. Forwarding needs nothing
more: what a site applied is in its log and goes on to its own neighbours (hub and
spokes). A site offline for days catches up the same way. A site whose files do not
exist yet joins by copying a neighbour's files (a consistent copy under continuous
operations) and adopting them under its own site id.

Failures never lose anything: a batch not acknowledged is sent again (duplicates are
skipped by the receiver), with a growing back-off; ``on_failure`` runs once per streak.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast
from collections.abc import Iterator


from ..errors import BastionError, ConfigError, DaemonUnavailable, Outcome, StateConflict, UnknownTarget, UsageError
from ..passloop import PassLoop
from ..peer import PeerClient
from ..position import Vector  # per origin, the highest change a site holds
from ..replication.window import Timing
from ..state import iso
from ..tls import trust
from . import site
from ..sqlite import connect

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..config import Config, DatabaseConfig, SyncGroup
    from ..contops import ContinuousOperations

log = logging.getLogger("bastion.sync")
BATCH = 2000
POLL = 0.05
PRUNE_EVERY = 5.0
# How long a pass waits for its neighbours' pushes. One still running after that (a silent
# neighbour: a read timeout on a kept-alive connection, a long batch) stays in flight and is
# collected by a later pass, so the neighbours that answer are not held up behind it.
# (Continuous passes only.)
PEER_WAIT = 0.5


class Syncer(PassLoop):
    poll = POLL
    # A site cut off for a while must notice the network is back soon: its own changes only
    # leave when it pushes them (nothing wakes it when a neighbour comes back). A pass against
    # a silent neighbour costs the vector request's connect timeout (1 s) plus this.
    max_backoff = 0.5

    def __init__(self, db: DatabaseConfig, group: SyncGroup, site: str, token: str, peer_ca_file: str | None,
                 catalog: Catalog) -> None:
        name = db.name
        super().__init__(name, f"sync of {name} (group {group.name})",
                         Timing.parse(group.schedule, group.blackout), group.on_failure,
                         {"BASTION_DATABASE": name, "BASTION_GROUP": group.name})
        self.catalog = catalog          # a joined copy is protected at once
        self.db = db
        self.group_name = group.name
        self.group = group
        self.site = site
        self._verify = trust(peer_ca_file)
        self._token = token
        # Short connect and vector timeouts: a neighbour that drops packets must cost seconds, not
        # the minute a large batch may take to apply.
        self._http = {p: self._new_client(p) for p in self.group.neighbours}
        # one thread per neighbour: a silent one must not hold up the exchange with the others
        self._pool = ThreadPoolExecutor(max_workers=len(self.group.neighbours),
                                        thread_name_prefix=f"bastion-sync-{name}")
        # the request of a push in flight, while its thread reads the next batch
        self._posting = ThreadPoolExecutor(max_workers=len(self.group.neighbours),
                                           thread_name_prefix=f"bastion-sync-{name}-post")
        n = len(self.db.files)
        self.their: dict[str, list[Vector | None]] = {p: [None] * n for p in self.group.neighbours}
        self.peer_state: dict[str, dict[str, Any]] = {p: {"sent": 0, "last_error": None, "last_ok_at": None}
                                                      for p in self.group.neighbours}
        self.sent = 0
        self.joined_from: str | None = None
        self._installed = False
        # The last pass failed only because no neighbour answered at all (a partition: transport
        # errors only): the files are as they were, so the next pass need not install again (that
        # took the write lock from the applies of the first batches after the heal, holding up this
        # site's own pushes).
        self._unreachable = False
        self._silent: set[str] = set()     # neighbours whose last push got no answer (transport)
        self._last_prune = 0.0
        self.apply_lock = threading.Lock()      # batches from several neighbours: one at a time
        self._inflight: dict[str, Future[int]] = {}
        # An idle pass asks SQLite whether anything was committed since the last pass found
        # nothing to send: changes_for opens the file and reads the sync state (2 ms of CPU), four
        # times every 50 ms with two neighbours and two files, which took a sixth of a core per idle
        # daemon and slowed every other process. Per file: (inode, connection) for data_version.
        self._watch: dict[int, tuple[int, Any]] = {}
        self._quiet: dict[tuple[str, int], tuple[tuple[int, int], Any]] = {}
        self._watch_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:  # type: ignore[override]
        super().start(f"bastion-sync-{self.name}")

    def stop(self) -> None:
        super().stop()
        self._pool.shutdown(wait=True)
        self._posting.shutdown(wait=True)
        for c in self._http.values():
            c.close()
        self._unwatch()

    def _after_failure(self) -> None:
        if self._unreachable:
            self._unreachable = False
            return
        self._installed = False
        self._unwatch()

    def _unwatch(self) -> None:
        with self._watch_lock:
            for _ino, con in self._watch.values():
                con.close()
            self._watch.clear()
            self._quiet.clear()

    def _mark(self, i: int, path: str) -> tuple[int, int]:
        """(inode, PRAGMA data_version) of the file: it changes with every commit another connection
        makes (applications, our own applies and ingests), and with the inode when the file is replaced."""
        ino = os.stat(path).st_ino
        with self._watch_lock:
            got = self._watch.get(i)
            if got is None or got[0] != ino:
                if got is not None:
                    got[1].close()
                got = self._watch[i] = (ino, connect.app_file(path))
            return ino, int(connect.one(got[1], "PRAGMA data_version"))

    # -- one pass -----------------------------------------------------------------------------
    def _cycle(self) -> dict[str, Any]:
        if self.timing.in_blackout():
            self.state = "blackout"
            return {"database": self.name, "sent": 0, "blackout": True}
        if not self._installed:
            for i, path in enumerate(self.db.files):
                if not os.path.exists(path):
                    self._join(i)
                self._install(path)
            self._installed = True
        if not self.failures:        # a failing streak stays "failing" while it retries
            self.state = "syncing"
        # a pass somebody asked for (sync run, a schedule) is whole: it waits for every neighbour,
        # and a push begun before the request (it may miss what was written since) is not enough
        whole = self.requested() or self.timing.mode != "continuous"
        sent = 0
        if whole and self._inflight:
            wait(list(self._inflight.values()))
            sent += self._collect()
        for peer in self.group.neighbours:
            if peer not in self._inflight:
                self._inflight[peer] = self._pool.submit(self._push_all, peer)
        wait(list(self._inflight.values()), timeout=None if whole else PEER_WAIT)
        sent += self._collect()
        errors = [f"{p}: {st['last_error']}" for p, st in self.peer_state.items() if st["last_error"]]
        if time.monotonic() - self._last_prune > PRUNE_EVERY:
            self._last_prune = time.monotonic()
            for path in self.db.files:
                site.prune(path, self.group.neighbours)
        if errors and len(errors) == len(self.group.neighbours):
            self._unreachable = self._silent >= set(self.group.neighbours)
            raise BastionError(f"sync of {self.name}: no neighbour reachable: " + "; ".join(errors),
                               hint="changes stay here and go out when a neighbour answers")
        self.state = "in sync" if not errors else "partial (" + "; ".join(errors) + ")"
        self.sent += sent
        return {"database": self.name, "sent": sent, "errors": errors,
                "more": bool(sent) and self.timing.mode == "continuous"}

    def _collect(self) -> int:
        """Record the outcome of every finished push; return how many changes they sent."""
        sent = 0
        for peer, fut in list(self._inflight.items()):
            if not fut.done():
                continue
            del self._inflight[peer]
            try:
                sent += fut.result()
                self.peer_state[peer].update(last_error=None, last_ok_at=time.time())
                self._silent.discard(peer)
            except BastionError as exc:   # one neighbour down must not stop the others
                if isinstance(exc, DaemonUnavailable):
                    self._silent.add(peer)
                else:
                    self._silent.discard(peer)
                if self.peer_state[peer]["last_error"] is None:
                    log.warning("sync of %s: neighbour %s fails: %s", self.name, peer, exc.message)
                self.peer_state[peer]["last_error"] = exc.message
        return sent

    def _push_all(self, peer: str) -> int:
        return sum(self._push(peer, i, path) for i, path in enumerate(self.db.files))

    def _push(self, peer: str, i: int, path: str) -> int:
        known = self.their[peer][i]       # a lower bound of what it holds: enough to skip an idle pass
        if known is not None:
            mark = self._mark(i, path)      # before looking: a commit after this makes the next pass look
            if self._quiet.get((peer, i)) == (mark, known):
                return 0
            try:
                if not site.changes_for(path, known, 1):
                    self._quiet[(peer, i)] = (mark, known)
                    return 0
            except StateConflict:
                # We pruned what it lacked by that old vector: other neighbours' word that it holds
                # them is newer than our memory of it. Ask it (below) rather than fail every pass.
                pass
        # Connecting is what hangs on a cut link; answering may take a while on a busy site (the
        # vector reads the log after the writers' transactions). A slow answer holds up only
        # this neighbour's thread (PEER_WAIT).
        vec = _their_vector(self._http[peer].post("/v1/peer/sync/vector", json=self._who(i), timeout=(15.0, 1.0)))
        total = 0
        # Pipelined: the next batch is read (from the vector the neighbour will have once it applied
        # this one) while the neighbour applies this one; both sites work at once.
        batch = site.changes_for_wire(path, vec, BATCH)
        while batch["changes"] and not self._stop.is_set():
            answer = self._posting.submit(self._http[peer].post, "/v1/peer/sync/apply",
                                          msgpack={**self._who(i), "batch": batch})
            ahead = vec.join(_top(batch["changes"]))
            upcoming = site.changes_for_wire(path, ahead, BATCH)
            vec = _their_vector(answer.result())
            total += len(batch["changes"])
            if vec.covers(ahead):
                # what it holds beyond what it was sent (from other sites) is not sent again
                rows = [r for r in upcoming["changes"] if r[1] > vec.seq(r[0])]
                batch = {**upcoming, "changes": rows} if rows or not upcoming["changes"] else \
                    site.changes_for_wire(path, vec, BATCH)
            else:           # it holds less than it was sent (cannot happen: a refused batch raises)
                batch = site.changes_for_wire(path, vec, BATCH)
        self.their[peer][i] = vec
        site.record_peer(path, peer, vec)
        self.peer_state[peer]["sent"] += total
        return total

    def _who(self, i: int) -> dict[str, Any]:
        return {"database": self.name, "group": self.group_name, "site": self.site, "file": i,
                "files": len(self.db.files)}

    def _join(self, i: int) -> None:
        """This site has no copy yet: take a neighbour's, adopted under this site's id."""
        path = self.db.files[i]
        tried = []
        for peer in self.group.neighbours:
            tmp = f"{path}.bastion-join-{uuid.uuid4().hex[:8]}"
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(tmp, "wb") as fh:
                    self._http[peer].download("POST", "/v1/peer/sync/snapshot", fh, json=self._who(i), timeout=600.0)
                    fh.flush()
                    os.fsync(fh.fileno())
                site.adopt(tmp, self.site)
                # The copy is not a protected file yet: roll its WAL in before the rename (a -wal
                # never moves with it).
                con = connect.staged(tmp)
                try:
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    con.close()
                if os.path.exists(tmp + "-wal") and os.path.getsize(tmp + "-wal") > 0:
                    raise BastionError(f"{tmp}: the joined copy's WAL could not be rolled in")
                os.replace(tmp, path)
                from ..fsutil import fsync_dir
                fsync_dir(os.path.dirname(path) or ".")
                f = self.catalog.files.get(path)
                if f is not None:
                    f.protect()
                self.joined_from = peer
                log.warning("%s: joined sync group %s with a copy of %s's file", path, self.group_name, peer)
                return
            except (BastionError, OSError) as exc:
                tried.append(f"{peer}: {getattr(exc, 'message', None) or exc}")
            finally:
                for p in (tmp, tmp + "-wal", tmp + "-shm"):
                    if os.path.exists(p):
                        os.remove(p)
        raise BastionError(f"{path} does not exist and no neighbour gave a copy to join the group: "
                           + "; ".join(tried), hint="a new site joins with a copy of a current site's files")

    def _new_client(self, peer: str) -> PeerClient:
        # A transport error drops the pooled connections (peer.py): one kept alive across a cut
        # link retransmits with a growing back-off and may stay silent after the link is back.
        url = self.group.sites[peer]
        return PeerClient(url, token=self._token, verify=self._verify, timeout=(60.0, 3.0),
                          label=f"site {peer} ({url})")

    # -- receiving -------------------------------------------------------------------------------
    def _file(self, req: dict[str, Any]) -> str:
        if req.get("group") != self.group_name or req.get("site") not in self.group.sites:
            raise StateConflict(f"database {self.name} here is in sync group {self.group_name!r}; the request "
                                f"came for group {req.get('group')!r} from site {req.get('site')!r}",
                                hint="every site must list the same [sync_groups.NAME] sites")
        if req.get("site") == self.site:
            raise StateConflict(f"site {self.site!r} received a sync request from itself: two daemons use the "
                                "same [sync] site", hint="give every daemon its own site name")
        i = int(req.get("file", -1))
        if not 0 <= i < len(self.db.files) or int(req.get("files", -1)) != len(self.db.files):
            raise UsageError(f"database {self.name} has {len(self.db.files)} file(s) here; the request names file "
                             f"{i} of {req.get('files')}", hint="list the files in the same order on every site")
        path = self.db.files[i]
        if not self._installed:
            if not os.path.exists(path):
                raise StateConflict(f"{path} is not here yet (this site is joining the group)")
            self._install(path)
        return path

    def _install(self, path: str) -> None:
        site.install(path, self.site)
        site.configure(path, self.group.counters, self.group.keys, present_only=True)

    def check_report(self) -> dict[str, Any]:
        """This site's part of `bastion sync check`: vectors, row digests, invariant values."""
        from . import check
        return check.local_report(list(self.db.files), self.group.invariants)

    def check(self) -> dict[str, Any]:
        """Ask every site of the group (this one included) for its report, and compare."""
        from . import check
        reports: dict[str, Any] = {self.site: self.check_report()}

        def ask(peer: str) -> dict[str, Any]:
            try:
                if peer not in self._http:
                    self._http[peer] = self._new_client(peer)
                return self._http[peer].post("/v1/peer/sync/check", json=self._who(0))
            except BastionError as exc:
                return {"error": exc.message}
        for peer in sorted(p for p in self.group.sites if p != self.site):
            reports[peer] = ask(peer)
        return {"database": self.name, "group": self.group_name, "site": self.site,
                **check.compare(reports, self.group.invariants)}

    def vector(self, req: dict[str, Any]) -> dict[str, Any]:
        path = self._file(req)
        return {"database": self.name, "site": self.site, "vector": site.vector(path)}

    def apply(self, req: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        path = self._file(req)
        with self.apply_lock:
            res = site.apply(path, site.from_wire(batch, lazy=True), self.group.policy, peer=req["site"])
        if res.conflicts:
            log.warning("sync of %s from %s: %d conflict(s) recorded (bastion conflicts list %s)", self.name,
                        req["site"], res.conflicts, self.name)
        self._wake.set()      # forward what arrived to the other neighbours soon
        return {"database": self.name, "site": self.site, **res.to_dict()}     # its vector: this file's now

    def status(self) -> SyncerStatus:
        files = []
        for i, path in enumerate(self.db.files):
            f: SyncedFile = {"path": path}
            try:
                if os.path.exists(path) and site.is_installed(path):
                    st = site.status(path)
                    f.update({"vector": st["vector"], "log_entries": st["log_entries"],
                              "unresolved_conflicts": st["unresolved_conflicts"]})
                    f["peers"] = {p: {"their_vector": (self.their[p][i] or Vector()).to_json() or None,
                                      "lag_changes": _lag(st.get("vector") or {}, self.their[p][i])}
                                  for p in self.group.neighbours}
            except BastionError as exc:
                f["error"] = exc.message
            files.append(f)
        return {"database": self.name, "group": self.group_name, "site": self.site,
                "topology": self.group.topology, "neighbours": self.group.neighbours,
                "policy": self.group.policy.rule, "schedule": self.group.schedule,
                "sent": self.sent, "joined_from": self.joined_from, **self.loop_status().to_dict(),
                "peers": {p: cast(PeerStatus, {**s, "last_ok_at": iso(s["last_ok_at"])})
                          for p, s in self.peer_state.items()},
                "files": files}


class PeerFileStatus(TypedDict):
    their_vector: dict[str, int] | None    # the neighbour's vector as last known here
    lag_changes: int | None


class SyncedFile(TypedDict):
    path: str
    vector: NotRequired[dict[str, int]]
    log_entries: NotRequired[int]
    unresolved_conflicts: NotRequired[int]
    peers: NotRequired[dict[str, PeerFileStatus]]
    error: NotRequired[str]


class PeerStatus(TypedDict):
    sent: int
    last_error: str | None
    last_ok_at: str | None


class SyncerStatus(TypedDict):
    """`sync status` of one synced database (GET /v1/sync/status, as is)."""
    database: str
    group: str
    site: str
    topology: str
    neighbours: tuple[str, ...]
    policy: str
    schedule: str
    sent: int
    joined_from: str | None
    state: str                      # the LoopFields (passloop), spread in
    last_error: str | None
    last_error_at: str | None
    failures: int
    last_success_at: str | None
    peers: dict[str, PeerStatus]
    files: list[SyncedFile]


class SyncStatus(TypedDict):
    databases: list[SyncerStatus]
    verdict: Outcome


def _their_vector(answer: Any) -> Vector:
    """A neighbour's vector, checked: a broken or hostile answer is a UsageError, not a crash."""
    return Vector.from_json(answer.get("vector") if isinstance(answer, dict) else answer)


def _top(rows: list[list[Any]]) -> dict[str, int]:
    """Per origin, the highest change of a batch (wire rows: origin, oseq, ...)."""
    top: dict[str, int] = {}
    for r in rows:
        if top.get(r[0], 0) < r[1]:
            top[r[0]] = r[1]
    return top


def _lag(ours: dict[str, int], theirs: Vector | None) -> int | None:
    """Changes held here that the neighbour lacks, as far as its last known vector says."""
    return None if theirs is None else Vector(ours).lacking(theirs)


class Sync:
    """Every synced database of this daemon."""

    def __init__(self, config: Config, catalog: Catalog, contops: ContinuousOperations, token: str | None) -> None:
        """``token``: the peer token (Replication read it; the config makes sync groups need one)."""
        self.catalog, self.contops = catalog, contops
        self.staging_dir = os.path.join(config.data_dir, "sync")
        synced = [d for d in config.databases.values() if d.sync_group]
        if synced and not token:
            raise ConfigError("sync groups talk over the peer API: [replication] peer_token_file is needed",
                              hint="the same secret file on every site")
        self.syncers: dict[str, Syncer] = {
            d.name: Syncer(d, config.sync.groups[d.sync_group], config.sync.site, token or "",
                           config.replication.peer_ca_file, catalog) for d in synced if d.sync_group}

    def start(self) -> None:
        for s in self.syncers.values():
            s.start()

    def stop(self) -> None:
        for s in self.syncers.values():
            s.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No pass runs while this is held (restore --replace, recover --discard-changes)."""
        held = []
        try:
            for s in self.syncers.values():
                s.pass_lock.acquire()
                s.apply_lock.acquire()
                held.append(s)
            yield
        finally:
            for s in held:
                s._installed = False         # the files may have been replaced: install again
                s._unwatch()
                s.apply_lock.release()
                s.pass_lock.release()

    def get(self, name: str) -> Syncer:
        s = self.syncers.get(name)
        if s is None:
            raise UnknownTarget(f"database {name!r} is in no sync group here",
                                hint="synced databases: " + (", ".join(sorted(self.syncers)) or "none"))
        return s

    def status(self, name: str | None = None) -> SyncStatus:
        dbs = [self.get(name).status()] if name else [s.status() for s in self.syncers.values()]
        failing = any(d["failures"] for d in dbs)
        return {"databases": dbs, "verdict": Outcome.PARTIAL if failing else Outcome.OK}

    def snapshot(self, req: dict[str, Any]) -> str:
        """A consistent copy of one file for a joining site; returns the staged path (the caller
        streams it and removes it)."""
        from ..catalog import Targets
        from ..replication import seed
        s = self.get(req.get("database", ""))
        path = s._file({**req, "site": req.get("site")})
        files = self.catalog.resolve(Targets.of([s.name]))
        staging = os.path.join(self.staging_dir, f"{s.name}.snapshot-{uuid.uuid4().hex[:8]}")
        items = seed.take(self.contops, files, staging)
        i = int(req["file"])
        keep = items[i]["staged"]
        out = f"{staging}.file{i}"
        os.replace(keep, out)
        shutil.rmtree(staging, ignore_errors=True)
        assert path
        return out
