"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

Almost everything is read at scrape time from what the daemon already keeps (the state
database, the catalog, replication/sync/cluster status, the repository's newest backup), by a
custom collector: no counter scattered through the code can drift from what `bastion status`
says. Only what nothing else records is counted here: SQL requests, their errors and latency
(an ASGI middleware), and, in the SQL server's committer and the cluster node, group-commit
batch sizes and lease renewals.

The route sits behind the same admin-token check as the admin API (Prometheus sends it with
``authorization: {credentials_file: ...}``); see docs/operations.md, "Metrics".
"""

from __future__ import annotations

import logging
import time
from typing import Any
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .state import epoch

log = logging.getLogger("bastion.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SQL_OPS = {"": "batch", "transactions": "begin", "commit": "commit", "rollback": "rollback"}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROLES = ("active", "passive", "promoting", "fenced")


class Metrics:
    """One per HTTP app: its own registry (a test may start several apps in one process)."""

    def __init__(self, daemon: Any, node: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        names = set(getattr(daemon.config, "databases", {}))
        self.sql_requests = Counter("bastion_sql_requests", "SQL API requests, by database, operation and "
                                    "HTTP status", ["database", "operation", "code"], registry=self.registry)
        self.sql_errors = Counter("bastion_sql_errors", "SQL API requests answered with an error (HTTP >= 400)",
                                  ["database", "operation"], registry=self.registry)
        self.sql_latency = Histogram("bastion_sql_request_duration_seconds", "SQL API request latency",
                                     ["database", "operation"], registry=self.registry,
                                     buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.known = names
        self.registry.register(DaemonCollector(daemon, node))

    def sql_labels(self, path: str) -> tuple[str, str] | None:
        """/v1/sql/DB[/transactions[/TID[/commit|rollback]]] -> (database, operation)."""
        parts = path.split("/")[3:]
        if not parts or not parts[0]:
            return None
        db = parts[0] if parts[0] in self.known else "other"    # bounded label values
        rest = parts[1:]
        if not rest:
            op = "batch"
        elif len(rest) == 1:
            op = "begin"
        elif len(rest) == 2:
            op = "work"
        else:
            op = _SQL_OPS.get(rest[2], "other")
        return db, op

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SQLMetricsMiddleware:
    """Counts and times every /v1/sql/ request (plain ASGI: it runs on every SQL request)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/sql/"):
            return await self.app(scope, receive, send)
        labels = self.metrics.sql_labels(scope["path"])
        if labels is None:
            return await self.app(scope, receive, send)
        status = [500]

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, watch)
        finally:
            m = self.metrics
            m.sql_latency.labels(*labels).observe(time.perf_counter() - t0)
            m.sql_requests.labels(*labels, str(status[0])).inc()
            if status[0] >= 400:
                m.sql_errors.labels(*labels).inc()


class DaemonCollector(Collector):
    """Reads the daemon's state at each scrape. A part that fails is logged and left out (and
    counted in bastion_scrape_errors): one broken repository must not blank the whole page."""

    def __init__(self, daemon: Any, node: Any = None) -> None:
        self.daemon, self.node = daemon, node
        self.errors = 0

    def collect(self) -> Iterable[Any]:
        out: list[Any] = []
        for part in (self._cluster, self._databases, self._backups, self._jobs, self._drills, self._replication,
                     self._sync, self._sql):
            try:
                out.extend(part())
            except Exception as exc:  # NotActive on a passive node, an unreachable repository...
                if type(exc).__name__ != "NotActive":
                    self.errors += 1
                    log.warning("metrics: %s: %s: %s", part.__name__, type(exc).__name__, exc)
        e = CounterMetricFamily("bastion_scrape_errors", "Parts of /metrics that could not be read")
        e.add_metric([], self.errors)
        out.append(e)
        return out

    def _cluster(self) -> list[Any]:
        role = GaugeMetricFamily("bastion_cluster_role", "1 for this node's current role", labels=["role"])
        node = self.node
        current = "active" if node is None else node.role
        for r in ROLES:
            role.add_metric([r], 1.0 if r == current else 0.0)
        out: list[Any] = [role]
        if node is not None:
            ren = CounterMetricFamily("bastion_cluster_lease_renewals", "Lease renewals by this node")
            ren.add_metric([], float(getattr(node, "renewals", 0)))
            tok = GaugeMetricFamily("bastion_cluster_fencing_token", "Fencing token of this node's lease "
                                    "(0 while it holds none)")
            tok.add_metric([], float(node.token or 0))
            out += [ren, tok]
        return out

    def _databases(self) -> list[Any]:
        d = self.daemon
        up = GaugeMetricFamily("bastion_daemon_start_time_seconds", "When this daemon started (epoch)")
        up.add_metric([], float(d.started_at))
        protected = GaugeMetricFamily("bastion_files_protected", "Files of the database protected now",
                                      labels=["database"])
        unprotected = GaugeMetricFamily("bastion_files_unprotected", "Files of the database not protected "
                                        "(missing, replaced, or an error)", labels=["database"])
        sessions = GaugeMetricFamily("bastion_contops_sessions", "Files in continuous operations (open or "
                                     "waiting for endbu/recover), by status", labels=["database", "status"])
        delta = GaugeMetricFamily("bastion_contops_delta_bytes", "Bytes held in the delta (-wal) while in "
                                  "continuous operations", labels=["database"])
        frozen = GaugeMetricFamily("bastion_freeze_holds", "Files frozen (writers held) or waiting for thaw",
                                   labels=["database", "status"])
        from .daemon.core import protection
        for name, files in sorted(d.catalog.database_names().items()):
            states = [protection(f)[0] for f in files]
            protected.add_metric([name], float(states.count("protected")))
            unprotected.add_metric([name], float(len(states) - states.count("protected")))
            paths = [f.path for f in files]
            held = 0
            counts: dict[str, int] = {}
            for r in d.state.open_files("contops", paths):
                counts[r["status"]] = counts.get(r["status"], 0) + 1
                f = d.catalog.files.get(r["path"])
                if f is not None and r["status"] == "active":
                    held += f.held_delta_bytes() or 0
            for status in ("active", "rolling_in", "interrupted", "expired"):
                sessions.add_metric([name, status], float(counts.get(status, 0)))
            delta.add_metric([name], float(held))
            fcounts: dict[str, int] = {}
            for r in d.state.open_files("freeze", paths):
                fcounts[r["status"]] = fcounts.get(r["status"], 0) + 1
            for status in ("active", "timed_out"):
                frozen.add_metric([name, status], float(fcounts.get(status, 0)))
        return [up, protected, unprotected, sessions, delta, frozen]

    def _backups(self) -> list[Any]:
        d = self.daemon
        now = time.time()
        last = GaugeMetricFamily("bastion_backup_last_success_timestamp_seconds",
                                 "Instant of the newest backup in the repository (epoch)", labels=["database"])
        age = GaugeMetricFamily("bastion_backup_last_success_age_seconds", "Age of the newest backup",
                                labels=["database"])
        ok = GaugeMetricFamily("bastion_verify_last_ok", "1 if the latest verify of the newest backup passed, "
                               "0 if it failed (absent: never verified)", labels=["database", "mode"])
        vage = GaugeMetricFamily("bastion_verify_last_age_seconds", "Age of the latest verify of the newest "
                                 "backup", labels=["database", "mode"])
        rerr = GaugeMetricFamily("bastion_backup_repository_error", "1 if the repository could not be read",
                                 labels=["database"])
        for name in sorted(d.config.databases):
            b = d.backups.latest(name)
            rerr.add_metric([name], 1.0 if b.get("error") else 0.0)
            t = epoch(b.get("instant"))
            if t is not None:
                last.add_metric([name], t)
                age.add_metric([name], max(0.0, now - t))
            v = b.get("verification")
            if v:
                at = epoch(v.get("at"))
                ok.add_metric([name, v.get("mode", "quick")], 1.0 if v.get("ok") else 0.0)
                if at is not None:
                    vage.add_metric([name, v.get("mode", "quick")], max(0.0, now - at))
        return [last, age, ok, vage, rerr]

    def _jobs(self) -> list[Any]:
        fails = GaugeMetricFamily("bastion_job_consecutive_failures", "Scheduled job failures in a row",
                                  labels=["job"])
        last_ok = GaugeMetricFamily("bastion_job_last_success_timestamp_seconds", "Last success of a scheduled "
                                    "job (epoch)", labels=["job"])
        for job in self.daemon.scheduler.jobs:
            s = self.daemon.state.job(job.name) or {}
            fails.add_metric([job.name], float(s.get("failures") or 0))
            if s.get("last_ok"):
                last_ok.add_metric([job.name], float(s["last_ok"]))
        return [fails, last_ok]

    def _drills(self) -> list[Any]:
        from . import drill
        ok = GaugeMetricFamily("bastion_drill_last_ok", "1 if the latest recovery drill passed",
                               labels=["database"])
        at = GaugeMetricFamily("bastion_drill_last_timestamp_seconds", "When the latest drill ran (epoch)",
                               labels=["database"])
        rto = GaugeMetricFamily("bastion_drill_rto_seconds", "Measured RTO of the latest drill: time to a "
                                "usable database", labels=["database"])
        rpo = GaugeMetricFamily("bastion_drill_rpo_seconds", "Measured RPO of the latest drill: age of the "
                                "newest data restored", labels=["database"])
        for name, r in sorted(drill.latest_all(self.daemon.state).items()):
            ok.add_metric([name], 1.0 if r["ok"] else 0.0)
            at.add_metric([name], float(r["started_at"]))
            if r.get("rto_seconds") is not None:
                rto.add_metric([name], float(r["rto_seconds"]))
            if r.get("rpo_seconds") is not None:
                rpo.add_metric([name], float(r["rpo_seconds"]))
        return [ok, at, rto, rpo]

    def _replication(self) -> list[Any]:
        lag_s = GaugeMetricFamily("bastion_replication_lag_seconds", "Age of the oldest change the replica "
                                  "has not applied", labels=["database", "peer"])
        lag_c = GaugeMetricFamily("bastion_replication_lag_changes", "Changes the replica has not applied",
                                  labels=["database", "peer"])
        state = GaugeMetricFamily("bastion_replication_state", "1 for the shipper's current state",
                                  labels=["database", "peer", "state"])
        fails = GaugeMetricFamily("bastion_replication_consecutive_failures", "Failed passes in a row",
                                  labels=["database", "peer"])
        degraded = GaugeMetricFamily("bastion_replication_degraded", "1 while replicated commits are "
                                     "acknowledged without the standby", labels=["database"])
        last_apply = GaugeMetricFamily("bastion_replica_last_apply_timestamp_seconds", "When this replica last "
                                       "applied changes (epoch)", labels=["database"])
        for r in self.daemon.replication.status()["databases"]:
            name = r["database"]
            if r.get("role") == "primary":
                peer = r.get("peer") or ""
                if r.get("lag_seconds") is not None:
                    lag_s.add_metric([name, peer], float(r["lag_seconds"]))
                if r.get("lag_changes") is not None:
                    lag_c.add_metric([name, peer], float(r["lag_changes"]))
                state.add_metric([name, peer, str(r.get("state"))], 1.0)
                fails.add_metric([name, peer], float(r.get("failures") or 0))
                degraded.add_metric([name], 1.0 if r.get("degraded") else 0.0)
            else:
                t = epoch(r.get("last_apply_at"))
                if t is not None:
                    last_apply.add_metric([name], t)
        return [lag_s, lag_c, state, fails, degraded, last_apply]

    def _sync(self) -> list[Any]:
        lag = GaugeMetricFamily("bastion_sync_lag_changes", "Changes held here that the neighbour lacks",
                                labels=["database", "peer"])
        last_ok = GaugeMetricFamily("bastion_sync_peer_last_success_timestamp_seconds", "Last successful "
                                    "exchange with the neighbour (epoch)", labels=["database", "peer"])
        conflicts = GaugeMetricFamily("bastion_sync_unresolved_conflicts", "Conflicts kept for review",
                                      labels=["database"])
        fails = GaugeMetricFamily("bastion_sync_consecutive_failures", "Failed passes in a row",
                                  labels=["database"])
        for r in self.daemon.sync.status()["databases"]:
            name = r["database"]
            per_peer: dict[str, float] = {}
            unresolved = 0
            for f in r.get("files", []):
                unresolved += f.get("unresolved_conflicts") or 0
                for p, s in (f.get("peers") or {}).items():
                    if s.get("lag_changes") is not None:
                        per_peer[p] = per_peer.get(p, 0.0) + s["lag_changes"]
            for p, n in sorted(per_peer.items()):
                lag.add_metric([name, p], n)
            for p, s in sorted((r.get("peers") or {}).items()):
                t = epoch(s.get("last_ok_at"))
                if t is not None:
                    last_ok.add_metric([name, p], t)
            conflicts.add_metric([name], float(unresolved))
            fails.add_metric([name], float(r.get("failures") or 0))
        return [lag, last_ok, conflicts, fails]

    def _sql(self) -> list[Any]:
        sql = self.daemon.sql
        open_tx = GaugeMetricFamily("bastion_sql_open_transactions", "Interactive SQL transactions open",
                                    labels=["database"])
        counts: dict[str, int] = {name: 0 for name in sql.databases}
        for t in sql.open_transactions():
            counts[t["database"]] = counts.get(t["database"], 0) + 1
        for name, n in sorted(counts.items()):
            open_tx.add_metric([name], float(n))
        fsyncs = CounterMetricFamily("bastion_sql_group_commit_fsyncs", "fsyncs made by group commit",
                                     labels=["database"])
        batch = HistogramMetricFamily("bastion_sql_group_commit_batch_size", "Commits made durable by one fsync",
                                      labels=["database"])
        for name, db in sorted(sql.databases.items()):
            c = db.committer
            fsyncs.add_metric([name], float(c.fsyncs))
            sizes = dict(c.batches)
            buckets, total, acc = [], sum(k * v for k, v in sizes.items()), 0
            for b in BATCH_BUCKETS:
                acc = sum(v for k, v in sizes.items() if k <= b)
                buckets.append((str(b), float(acc)))
            buckets.append(("+Inf", float(sum(sizes.values()))))
            batch.add_metric([name], buckets, float(total))
        return [open_tx, fsyncs, batch]
