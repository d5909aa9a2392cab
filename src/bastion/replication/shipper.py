"""The primary side: one thread per database ships its captured changes to the backup daemon.

Per file: capture is installed (origin = this daemon), the peer is asked which position
it holds (its own ``_bastion_applied``, written in the same transaction as each batch, is
the only record that counts), then every entry after it is read, sent as msgpack to
POST /v1/peer/apply, and pruned here once the peer acknowledged it. When the peer holds
nothing, or refuses a batch because something is missing (ChangesMissing) or the source needs it
(ReseedNeeded: errors keep their class across HTTP, see peer.py), the
whole database is seeded again from a consistent copy (seed.py).

Failures (peer down, network) never lose anything: entries stay in the control tables
until acknowledged; the thread retries with a growing back-off, and the configured
``on_failure`` command runs once per streak of failures.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from typing import Any, Literal, NotRequired, TypedDict
from collections.abc import Iterator

import apsw

from .. import capture
from ..catalog import Targets
from ..errors import BastionError, BusyError, ChangesMissing, ReseedNeeded
from ..peer import PeerClient
from ..position import Cut, Position
from ..state import iso
from ..tls import trust
from ..sqlite import pause_writers
from . import seed
from ..passloop import PassLoop
from .window import Timing
from ..sqlite import connect

log = logging.getLogger("bastion.replication.shipper")
BATCH = 2000
POLL = 0.05             # continuous mode: how often to look for new entries when caught up
CUT_PAUSE_TIMEOUT = 5.0  # pausing writers for a cut: how long to try before the pass fails and retries
PRUNE_EVERY = 1.0       # prune is a write transaction in the application's file: not after every batch


class _Writer:
    """pause_writers' view of one of the shipper's own connections: BEGIN IMMEDIATE on it
    holds that file's writers for as long as the cut is read."""

    def __init__(self, path: str, con: apsw.Connection) -> None:
        self.path, self.con = path, con

    def gate_begin(self, busy_ms: int) -> None:
        # Poll every half millisecond, like the daemon's own gate: SQLite's default back-off
        # sleeps ever longer and misses the short gaps between a busy writer's commits.
        deadline = time.monotonic() + max(0, busy_ms) / 1000

        def busy(_: int) -> bool:
            time.sleep(0.0005)
            return time.monotonic() < deadline
        self.con.set_busy_handler(busy)
        try:
            self.con.execute("BEGIN IMMEDIATE")
        finally:
            self.con.setbusytimeout(10_000)

    def gate_end(self) -> None:
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")


class Shipper(PassLoop):
    poll = POLL

    def __init__(self, daemon: Any, name: str, origin: str, token: str) -> None:
        db = daemon.config.databases[name]
        super().__init__(name, f"replication of {name} to {db.replicate_to}",
                         Timing.parse(db.replicate_schedule, db.blackout), db.on_failure,
                         {"BASTION_DATABASE": name, "BASTION_PEER": db.replicate_to or ""})
        self.daemon = daemon
        self.db = db
        self.origin = origin
        self.peer = db.replicate_to
        self._http = PeerClient(
            self.peer, token=token, timeout=60.0, verify=trust(daemon.config.replication.peer_ca_file),
            label=f"backup daemon {self.peer}", hint="changes queue on the primary and catch up when it answers",
            tls_hint="set [replication] peer_ca_file to the CA certificate that signed the backup daemon's "
                     "tls_cert; changes queue meanwhile")
        n = len(db.files)
        self._cons: list[apsw.Connection | None] = [None] * n
        self.acked: Cut | None = None                  # the cut the peer holds, as it last said (None: none)
        self.shipped: list[int | None] = [None] * n   # last position sent
        self._known = False                            # acked is current (asked since the last failure)
        self._installed = False
        self._last_prune = [0.0] * n
        self.seeded_at: float | None = None
        self.seeds = 0
        self.degraded_commits = 0     # replicated commits acknowledged while the standby was down
        self._waiter_woke = 0.0
        self.down_since = time.time()  # when the standby last went missing (start, failure, seed)
        self.cut_pause_max = 0.0       # longest hold of the writers to read a cut (several files)

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:  # type: ignore[override]
        super().start(f"bastion-ship-{self.name}")

    def stop(self) -> None:
        super().stop()
        self._close_cons()
        self._http.close()

    def wait_applied(self, positions: Cut, timeout: float) -> None:
        """Return once the backup server has applied every change up to ``positions`` (one
        capture position per file): `durability = "replicated"`. Wakes the loop so that
        a waiting commit does not sit out a poll interval."""
        from ..errors import NotReplicated
        deadline = time.monotonic() + timeout
        while True:
            acked = self.acked
            if self._known and acked is not None and acked.covers(positions):
                return
            if self.db.standby_optional and self.standby_down() and self._may_degrade():
                self.degraded_commits += 1     # shown by status: durable here only, for now
                return
            if time.monotonic() > deadline:
                raise NotReplicated(
                    f"database {self.name}: committed and durable here, but the backup server {self.peer} did "
                    f"not apply it within {timeout:g} s ({self.last_error or self.state})",
                    hint="it stays queued and is shipped when the backup server is back; see "
                         "`bastion replicate status`")
            # A waiting commit cuts a failing pass's back-off short, but at most twice a second:
            # many waiters must not turn the retries into a busy loop against a dead peer.
            now = time.monotonic()
            if not self.failures or now - self._waiter_woke > 0.5:
                self._waiter_woke = now
                self._wake.set()
            time.sleep(0.002)

    def standby_down(self) -> bool:
        """The peer is unreachable, refusing, or being seeded (a replicated cluster degrades then)."""
        return self.failures > 0 or self.state in ("starting", "seeding")

    def _may_degrade(self) -> bool:
        # "The standby is down" looks the same from a primary that is itself cut off, which the
        # standby is about to replace: acknowledge without the standby only once the lease was
        # renewed by a request that began after the standby went missing (then nobody can take
        # over before this node fences itself), and while this node may still write.
        check = getattr(self.daemon, "renewed_after", None)
        return check is not None and check(self.down_since)

    # -- the loop (passloop.PassLoop) ---------------------------------------------------
    def _after_pass(self) -> None:
        self._close_cons()

    def _after_failure(self) -> None:
        if not self.failures:
            self.down_since = time.time()
        self._known = False
        self._installed = False      # e.g. the file was replaced: install again (idempotent)

    def _close_cons(self) -> None:
        # Held only during a pass: between passes nothing of ours is open on the application's
        # files, so restore --replace and recover --discard-changes can prove exclusive access.
        for i, c in enumerate(self._cons):
            if c is not None:
                c.close()
                self._cons[i] = None

    def _con(self, i: int) -> apsw.Connection:
        if self._cons[i] is None:
            self._cons[i] = connect.app_file(self.db.files[i])
        return self._cons[i]   # type: ignore[return-value]

    def _cycle(self) -> dict[str, Any]:
        if self.timing.in_blackout():
            self.state = "blackout"
            return {"database": self.name, "shipped": 0, "blackout": True}
        if not self._installed:
            for i in range(len(self.db.files)):
                capture.install(self._con(i), self.origin)
            self._installed = True
        seeded = False
        if not self._known:
            self.acked = self._positions()
            self._known = True
        if self.acked is not None and not Cut.of(capture.position(self._con(i))
                                                 for i in range(len(self.db.files))).covers(self.acked):
            # a file went back in time (restored from a backup?): new changes would reuse
            # positions the peer already holds, and be skipped there as already applied
            log.warning("%s: capture position is behind the replica's %s: seeding it again", self.name, self.acked)
            self.acked = None
        if self.acked is None:
            self._seed()
            seeded = True
        self.state = "shipping"
        shipped = 0
        reseeds = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            if self.acked is None:       # the peer answered a cut with a file it holds nothing of
                self._seed()
                seeded = True
            try:
                sent = self._ship_cut()
            except (ReseedNeeded, ChangesMissing) as why:   # the peer cannot go on from what it holds
                reseeds += 1
                if reseeds > 2:
                    raise BastionError(f"the replica of {self.name} still refuses changes after a new seed: "
                                       f"{why}") from None
                log.warning("replica of %s needs a new seed: %s", self.name, why)
                self._seed()
                seeded = True
                continue
            shipped += sent
            if not sent:
                break
            if time.monotonic() - t0 > 5 and self.timing.mode == "continuous":
                break   # let status and run requests see progress
        for i in range(len(self.db.files)):
            self._prune(i, force=True)
        self.state = "caught up" if not self._stop.is_set() else "stopping"
        return {"database": self.name, "shipped": shipped, "seeded": seeded,
                "positions": self._acked_json(), "more": bool(shipped) and self.timing.mode == "continuous"}

    def _acked_json(self) -> list[int | None]:
        return self.acked.to_json() if self.acked is not None else [None] * len(self.db.files)

    def _cut(self) -> Cut:
        """Each file's last position at one commit boundary of the primary.

        A batch must end where a transaction ended, or the copy shows half of one. One
        file: the last position a read transaction sees. Several files: an application's
        transaction may span them, and its commit reaches them one by one, so every
        writer is paused (write locks, an instant) while the positions are read."""
        n = len(self.db.files)
        if n == 1:
            return Cut.of([capture.position(self._con(0))])
        out: list[Position] = []

        def read() -> None:
            out[:] = [capture.position(self._con(i)) for i in range(n)]
        frozen = [self.daemon.catalog.files.get(p) for p in self.db.files]
        if all(f is not None and f.gated_since is not None for f in frozen):
            read()      # a freeze holds every writer already: the positions are one instant
            return Cut.of(out)
        # The write locks are taken on the shipper's own connections, not through the daemon's
        # gate: startbu and freeze need that gate for themselves and must not find it taken.
        writers = [_Writer(p, self._con(i)) for i, p in enumerate(self.db.files)]
        held = pause_writers(writers, CUT_PAUSE_TIMEOUT, step=read).resume()  # type: ignore[arg-type]
        self.cut_pause_max = max(self.cut_pause_max, held)
        return Cut.of(out)

    def _chunks(self, cut: Cut) -> Iterator[tuple[int, list[capture.Change]]]:
        assert self.acked is not None
        for i, (pos, held) in enumerate(zip(cut, self.acked)):
            after, end = held.seq, pos.seq
            while after < end:
                changes = [c for c in capture.read_changes(self._con(i), after, BATCH) if c.seq <= end]
                if not changes:
                    break
                yield i, changes
                after = changes[-1].seq

    def _ship_cut(self) -> int:
        """Send every change up to one cut, in chunks; the peer applies the cut as one unit."""
        n = len(self.db.files)
        assert self.acked is not None
        # A look first (it also logs a schema change), so that an idle database pauses no writer.
        if not any(capture.read_changes(self._con(i), self.acked[i].seq, 1) for i in range(n)):
            return 0
        cut = self._cut()
        cid = uuid.uuid4().hex
        chunks = self._chunks(cut)
        nxt = next(chunks, None)
        k = sent = 0
        res: dict[str, Any] = {}
        while nxt is not None:
            i, changes = nxt
            nxt = next(chunks, None)
            res = self._http.post("/v1/peer/apply", msgpack={
                "database": self.name, "origin": self.origin, "files": n, "cut": cid, "chunk": k,
                "final": nxt is None, "file": i, "batch": capture.to_wire(changes)})
            self.shipped[i] = changes[-1].seq
            k += 1
            sent += len(changes)
        if not k:
            return 0
        self.acked = Cut.held(res["positions"], files=n)
        self._progress()
        for i in range(n):
            self._prune(i)
        return sent

    def _prune(self, i: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.acked is None or (not force and now - self._last_prune[i] < PRUNE_EVERY):
            return
        a = self.acked[i].seq
        self._last_prune[i] = now
        con = self._con(i)
        # A busy application may hold the write lock back to back: never queue behind it for
        # long (SQLite's busy handler can starve for seconds); the next pass prunes instead.
        con.setbusytimeout(100)
        try:
            capture.prune(con, a)
        except BusyError:
            pass
        finally:
            con.setbusytimeout(10_000)

    # -- talking to the peer --------------------------------------------------------------
    def _positions(self) -> Cut | None:
        n = len(self.db.files)
        res = self._http.post("/v1/peer/positions", json={"database": self.name, "origin": self.origin, "files": n})
        return Cut.held(res["files"], files=n)

    def _seed(self) -> None:
        """A consistent copy of every file, uploaded, then swapped in on the peer at once."""
        self.down_since = time.time()
        self.state = "seeding"
        files = self.daemon.catalog.resolve(Targets.of([self.name]))
        staging = os.path.join(self.daemon.config.data_dir, "replication", f"{self.name}.seed")
        items = seed.take(self.daemon.contops, files, staging)
        sid = uuid.uuid4().hex
        n = len(files)
        cut = Cut.of(it["position"] for it in items)     # one instant: continuous operations
        try:
            for i, it in enumerate(items):
                with open(it["staged"], "rb") as fh:
                    self._http.post("/v1/peer/seed/upload", content=_chunks(fh),
                                  params={"database": self.name, "files": n, "file": i, "seed": sid},
                                  headers={"Content-Type": "application/octet-stream"})
            self._http.post("/v1/peer/seed/commit", json={
                "database": self.name, "origin": self.origin, "seed": sid, "files": n,
                "positions": cut.to_json(clock=True)})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.acked = cut
        self.shipped = list(cut.seqs)
        self._known = True
        self.seeded_at = time.time()
        self.seeds += 1
        self._progress()
        for i in range(n):
            self._prune(i, force=True)
        log.info("seeded the replica of %s on %s at %s", self.name, self.peer, cut)

    # -- status ------------------------------------------------------------------------
    def status(self) -> PrimaryStatus:
        files = []
        now = time.time()
        for i, path in enumerate(self.db.files):
            a = self.acked[i].seq if self.acked is not None else None
            f: ShippedFile = {"path": path, "position": None, "shipped": self.shipped[i],
                                 "applied": a, "lag_changes": None, "lag_seconds": None}
            try:
                if capture.is_installed(path):
                    f["position"] = capture.position(path).seq
                    f["lag_changes"] = capture.pending(path, a if a is not None else 0)
                    first = capture.read_changes(path, a if a is not None else 0, 1, auto_refresh=False)
                    f["lag_seconds"] = round(max(0.0, now - first[0].time), 3) if first else 0.0
            except BastionError as exc:
                f["error"] = exc.message
            files.append(f)
        lags = [lag for f in files if (lag := f["lag_seconds"]) is not None]
        counts = [n for f in files if (n := f["lag_changes"]) is not None]
        return {"database": self.name, "role": "primary", "peer": self.peer, "origin": self.origin,
                "schedule": self.db.replicate_schedule, "blackout": list(self.db.blackout),
                "lag_changes": sum(counts) if counts else None, "lag_seconds": max(lags) if lags else None,
                **self.loop_status().to_dict(),
                "seeded_at": iso(self.seeded_at), "seeds": self.seeds,
                "degraded": bool(self.db.standby_optional and self.standby_down()),
                "degraded_commits": self.degraded_commits,
                "cut_pause_max_ms": round(self.cut_pause_max * 1000, 3), "files": files}


class ShippedFile(TypedDict):
    """One file of a primary: its capture position, what was shipped and what the replica applied."""
    path: str
    position: int | None
    shipped: int | None
    applied: int | None
    lag_changes: int | None
    lag_seconds: float | None
    error: NotRequired[str]


class PrimaryStatus(TypedDict):
    """`replicate status` of a database this daemon ships (GET /v1/replication/status, as is)."""
    database: str
    role: Literal["primary"]
    peer: str
    origin: str
    schedule: str
    blackout: list[Any]
    lag_changes: int | None
    lag_seconds: float | None
    state: str                      # the LoopFields (passloop), spread in
    last_error: str | None
    last_error_at: str | None
    failures: int
    last_success_at: str | None
    seeded_at: str | None
    seeds: int
    degraded: bool
    degraded_commits: int
    cut_pause_max_ms: float
    files: list[ShippedFile]


def _chunks(fh: Any, size: int = 1 << 20) -> Any:
    while True:
        data = fh.read(size)
        if not data:
            return
        yield data
