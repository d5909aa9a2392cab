"""A bounded in-memory history of replication and sync lag, for the dashboard's graphs.

Status calls answer "how far behind now"; people want to see "and over the last hour".
A thread samples every INTERVAL seconds into one ring per series (MAXLEN points: an hour
at the default), so memory stays bounded whatever runs for how long. Lost on restart on
purpose: it is a view, not a record (the state database keeps what must survive)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any
from collections.abc import Callable

log = logging.getLogger("bastion.dashboard")

INTERVAL = 5.0
MAXLEN = 720


class LagHistory:
    def __init__(self, source: Callable[[], Any], interval: float = INTERVAL, maxlen: int = MAXLEN) -> None:
        self._source = source            # returns the daemon (or None while a cluster node has none open)
        self.interval = interval
        self.maxlen = maxlen
        self._series: dict[tuple[str, str, str], deque[tuple[float, float | None]]] = {}
        self._lock = threading.Lock()
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bastion-dashboard-lag", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a graph must never take the daemon down
                log.debug("lag sample failed", exc_info=True)

    def add(self, key: tuple[str, str, str], value: float | None, at: float | None = None) -> None:
        with self._lock:
            ring = self._series.get(key)
            if ring is None:
                ring = self._series[key] = deque(maxlen=self.maxlen)
            ring.append((at if at is not None else time.time(), value))

    def sample(self, min_gap: float = 0.0) -> None:
        """One point per series now (skipped if the last was taken less than min_gap ago)."""
        now = time.time()
        if now - self._last < min_gap:
            return
        self._last = now
        d = self._source()
        if d is None or getattr(d, "state", None) is None:
            return
        for s in list(d.replication.shippers.values()):
            st = s.status()
            self.add(("replication", st["database"], "seconds"), st.get("lag_seconds"), now)
            self.add(("replication", st["database"], "changes"), st.get("lag_changes"), now)
        for name, syncer in list(d.sync.syncers.items()):
            st = syncer.status()
            per_peer: dict[str, int | None] = {}
            for f in st["files"]:
                for peer, p in (f.get("peers") or {}).items():
                    lag = p.get("lag_changes")
                    per_peer[peer] = None if lag is None and per_peer.get(peer) is None else \
                        (per_peer.get(peer) or 0) + (lag or 0)
            for peer, lag in per_peer.items():
                self.add(("sync", name, peer), lag, now)

    def series(self, kind: str, database: str) -> dict[str, list[tuple[float, float | None]]]:
        """name -> points, for one database ("seconds"/"changes" for replication, a peer for sync)."""
        with self._lock:
            return {k[2]: list(v) for k, v in sorted(self._series.items()) if k[0] == kind and k[1] == database}
