"""Continuous operations and freeze benchmark: what protecting a database costs the application.

    .venv/bin/python bench/bench_contops.py [--quick] [--keep]

Starts a Bastion daemon of its own (temp config, data dir and free loopback port)
protecting databases built in a temp dir: `bank` (the bank workload's bank.db +
audit.db), `loop` and `loopfull` (one table each), `big` (1 GB of random blobs;
--quick 200 MB) and `small` (10 MB). Applications
run in their own processes (stdlib sqlite3). In one run, side by side:

1. application writes/s while in continuous operations / writes/s without. The
   application runs throughout; windows alternate A B A B ... A (A: nothing,
   B: startbu at its start, endbu -- roll-in included -- at its end; the 0.5 s
   after endbu count in neither, their rate is shown apart). Each B is
   compared with the mean of the A before and after it (cancels a linear drift);
   the goal (>= 0.95) is judged on the median of those ratios; their p25-p75 and
   how much the baseline moved are printed, to show how far to trust it on a
   shared machine. Done for three applications: the bank workload (fsync-bound,
   two files per transaction), an insert loop with synchronous=NORMAL (CPU-bound)
   and the same with FULL (fsync-bound, one fsync per commit). Commits per window
   are counted from the rows' timestamps after the run, so nothing reads the
   databases during it.
2. startbu latency of `big` / that of `small`: wall time of POST /v1/contops/start
   (keep-alive HTTP client), alternating big and small, each followed by endbu;
   median and p90, plus the daemon's own latency_ms and writers_paused_ms.
   Goals: ratio of medians <= 1.5, p90 of big < 100 ms.
3. roll-in throughput (delta bytes / roll-in seconds reported by endbu) / that of
   `cp` of a file of the delta's size, and of cp followed by `sync`. The delta is
   written into `big` during continuous operations by a child process: appended
   rows, then updates of random rows. No goal: for information.
4. the application's worst write stall during a freeze minus the hold time the
   freeze reports. A bank workload (default busy handler, busy timeout 30 s)
   commits small transactions in a loop and records each slow commit's start and
   latency; `bastion freeze bank --json -- sleep 0.5` runs several times. For each
   freeze: max latency of a commit overlapping the freeze (from its request to its
   thaw), minus hold_seconds.
   Worst and median are reported. Goal <= 20 ms. For diagnosis the same is done
   (freeze and thaw through the API) with a workload that retries every
   millisecond itself (busy timeout 0): there the stall is the longest gap
   between commits, and what exceeds the hold is Bastion's part alone.

Prints one table and writes bench/out/contops.json. A goal missed is printed MISS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ENV, OUT, PY, Daemon, free_port, log, write_config

MB = 1_000_000

GOAL_THROUGHPUT = 0.95     # writes/s with contops / without, at least
GOAL_STARTBU_RATIO = 1.5   # startbu 1 GB / 10 MB, at most
GOAL_STARTBU_MS = 100.0    # startbu of 1 GB (p90), below
GOAL_STALL_MS = 20.0       # worst stall - hold, at most


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with few samples, a value that was measured."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


# -- databases ----------------------------------------------------------------------------------

def build_blob_db(path: Path, target: int) -> dict[str, Any]:
    """Rows of 4000 random bytes: built without a journal in big transactions, then WAL mode."""
    t = time.perf_counter()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    n, batch = 0, 10_000
    while path.stat().st_size < target:
        k = min(batch, max(1, (target - path.stat().st_size) // 4100 + 1))
        con.execute("BEGIN")
        con.execute("WITH RECURSIVE c(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
                    "INSERT INTO items SELECT i, randomblob(4000) FROM c", (n + 1, n + k))
        con.execute("COMMIT")
        n += k
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    sync()
    return {"rows": n, "bytes": path.stat().st_size, "build_s": round(time.perf_counter() - t, 2)}


def write_delta(db: str, kind: str, target: int) -> None:
    """Child process: write about ``target`` bytes of WAL into a blob db (appended rows or random updates)."""
    import random
    con = sqlite3.connect(db, isolation_level=None, timeout=60)
    top = con.execute("SELECT max(id) FROM items").fetchone()[0]
    wal = db + "-wal"
    start = os.path.getsize(wal) if os.path.exists(wal) else 0
    rng = random.Random(7)
    while (os.path.getsize(wal) if os.path.exists(wal) else 0) - start < target:
        con.execute("BEGIN IMMEDIATE")
        if kind == "append":
            con.execute("WITH RECURSIVE c(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
                        "INSERT INTO items SELECT i, randomblob(4000) FROM c", (top + 1, top + 2500))
            top += 2500
        else:
            con.executemany("UPDATE items SET payload = randomblob(length(payload)) WHERE id = ?",
                            [(rng.randint(1, top),) for _ in range(2500)])
        con.execute("COMMIT")
    con.close()


# -- the daemon ---------------------------------------------------------------------------------

class ContopsDaemon(Daemon):
    def __init__(self, work: Path, databases: dict[str, list[Path]]) -> None:
        port = free_port()
        super().__init__(write_config(work, port, databases, extra='[contops]\ngate_timeout = "30s"\n'), port)
        self.http: Any = None

    def start(self, timeout: float = 60) -> ContopsDaemon:
        import httpx
        super().start(timeout)
        # One keep-alive client: the wall times measured are the daemon's, not TCP set-up.
        self.http = httpx.Client(base_url=self.url, timeout=600, headers={"Authorization": f"Bearer {self.token}"})
        return self

    def post(self, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        r = self.http.post(path, json=body)
        wall = time.perf_counter() - t
        data = r.json()
        if r.status_code != 200 or data.get("verdict", "ok") != "ok":
            raise RuntimeError(f"POST {path} {body}: {r.status_code} {json.dumps(data)[:2000]}")
        return wall, data

    def startbu(self, name: str) -> tuple[float, dict[str, Any]]:
        return self.post("/v1/contops/start", {"targets": [name]})

    def endbu(self, name: str) -> tuple[float, dict[str, Any]]:
        return self.post("/v1/contops/end", {"targets": [name], "wait": True})

    def timed(self, *args: str) -> tuple[float, float, dict[str, Any]]:
        """(start, end) as time.time() around the call, and its --json output."""
        t0 = time.time()
        p = subprocess.run([PY, "-m", "bastion", "--config", str(self.config), *args], env=ENV,
                           capture_output=True, text=True, timeout=300)
        t1 = time.time()
        if p.returncode != 0:
            raise RuntimeError(f"bastion {' '.join(args)} exited {p.returncode}: {p.stdout[-1500:]} {p.stderr[-1500:]}")
        return t0, t1, json.loads(p.stdout)

    def stop(self, timeout: float = 30) -> None:
        if self.http is not None:
            self.http.close()
        super().stop(timeout)


# -- the application ----------------------------------------------------------------------------

class Bank:
    """The bank workload (python -m bastion.workload run) in its own process."""

    def __init__(self, d: Path, *extra: str) -> None:
        self.dir = d
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Bank:
        n = time.time_ns()
        self.stats = self.dir.parent / f"stats-{n}.json"
        ready = self.dir.parent / f"ready-{n}"
        self.proc = subprocess.Popen([PY, "-m", "bastion.workload", "run", str(self.dir), "--seconds", "3600",
                                      "--stats", str(self.stats), "--ready", str(ready), *self.extra], env=ENV)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bank workload did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the bank workload exited {self.proc.returncode}")
        return json.loads(self.stats.read_text())

    def commit_starts(self) -> list[float]:
        """Start time of every committed transfer (audit.at), in order: read after the run."""
        con = sqlite3.connect(f"file:{self.dir / 'audit.db'}?mode=ro", uri=True, timeout=30)
        try:
            return [r[0] for r in con.execute("SELECT at FROM audit ORDER BY seq")]
        finally:
            con.close()

    def check(self) -> dict[str, Any]:
        p = subprocess.run([PY, "-m", "bastion.workload", "check", str(self.dir)], env=ENV,
                           capture_output=True, text=True, timeout=300)
        return json.loads(p.stdout)


class InsertLoop:
    """The simplest application: one small INSERT per transaction, as fast as it can, in its own
    process (stdlib sqlite3). With synchronous=NORMAL (as many applications set it) it is
    CPU-bound: what continuous operations costs each commit in CPU shows. With FULL (the
    default) it is fsync-bound: what it costs each commit's fsync shows."""

    def __init__(self, db: Path, synchronous: str) -> None:
        self.db = db
        self.synchronous = synchronous
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def init(db: Path) -> None:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE log(id INTEGER PRIMARY KEY, at REAL NOT NULL, v BLOB)")
        con.close()

    def start(self) -> InsertLoop:
        n = time.time_ns()
        self.stats = self.db.parent / f"stats-{n}.json"
        ready = self.db.parent / f"ready-{n}"
        self.proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "_insert_loop", str(self.db),
                                      str(self.stats), str(ready), self.synchronous], env=ENV)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the insert loop did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the insert loop exited {self.proc.returncode}")
        return json.loads(self.stats.read_text())

    def commit_starts(self) -> list[float]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return [r[0] for r in con.execute("SELECT at FROM log ORDER BY id")]
        finally:
            con.close()

    def check(self) -> dict[str, Any]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return {"ok": con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"}
        finally:
            con.close()


def insert_loop(db: str, stats: str, ready: str, synchronous: str) -> None:
    """Child process of InsertLoop: commit until SIGTERM, then write stats."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute(f"PRAGMA synchronous={synchronous}")
    errors: dict[str, int] = {}
    worst, n = 0.0, 0
    first = True
    while not stop:
        t0 = time.time()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO log(at, v) VALUES(?, randomblob(100))", (t0,))
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            errors[str(exc)] = errors.get(str(exc), 0) + 1
            if con.in_transaction:
                con.execute("ROLLBACK")
            continue
        n += 1
        worst = max(worst, time.time() - t0)
        if first:
            open(ready, "w").close()
            first = False
    con.close()
    with open(stats + ".tmp", "w") as fh:
        json.dump({"commits": n, "errors": errors, "max_latency_ms": worst * 1000}, fh)
    os.replace(stats + ".tmp", stats)


def count_between(starts: list[float], a: float, b: float) -> int:
    import bisect
    return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)


# -- 1. throughput ------------------------------------------------------------------------------

def measure_throughput(daemon: Daemon, name: str, app: Any, pairs: int, window: float,
                       settle: float = 0.5) -> dict[str, Any]:
    """Windows A B A B ... A on database `name`, written by `app` throughout. After each B,
    `settle` seconds count in neither window (the application refills the WAL that the
    roll-in truncated): its rate there is reported on its own, not hidden in a baseline."""
    app.start()
    windows: list[dict[str, Any]] = []
    try:
        time.sleep(1.0)   # let the application reach its pace
        for i in range(2 * pairs + 1):
            w: dict[str, Any] = {"kind": "A" if i % 2 == 0 else "B", "t0": time.time()}
            if w["kind"] == "A":
                time.sleep(window)
            else:
                s_wall, s = daemon.startbu(name)
                w["held_from"] = time.time()
                time.sleep(max(0.0, w["t0"] + window - time.time()))
                w["held_to"] = time.time()
                e_wall, e = daemon.endbu(name)
                w["settle_from"] = time.time()
                w.update(startbu_wall_ms=s_wall * 1000, startbu_latency_ms=s["latency_ms"],
                         writers_paused_ms=s["writers_paused_ms"], startbu_attempts=s["attempts"],
                         endbu_wall_ms=e_wall * 1000, delta_bytes=e["delta_bytes"],
                         roll_in_s=sum(f["roll_in_seconds"] for f in e["files"]))
            w["t1"] = time.time()
            if w["kind"] == "B":
                w["t1"] = w["settle_from"]
                time.sleep(settle)
                w["settle_to"] = time.time()
            windows.append(w)
            log(f"{name}: window {i + 1}/{2 * pairs + 1} {w['kind']}")
    finally:
        stats = app.stop()
    starts = app.commit_starts()
    for w in windows:
        w["commits"] = count_between(starts, w["t0"], w["t1"])
        w["rate"] = w["commits"] / (w["t1"] - w["t0"])
        if w["kind"] == "B":
            span = w["held_to"] - w["held_from"]
            w["rate_while_held"] = count_between(starts, w["held_from"], w["held_to"]) / span
            w["rate_after"] = (count_between(starts, w["settle_from"], w["settle_to"])
                               / (w["settle_to"] - w["settle_from"]))
    ratios, held_ratios, after_ratios = [], [], []
    for i in range(1, len(windows), 2):
        base = (windows[i - 1]["rate"] + windows[i + 1]["rate"]) / 2   # both neighbours: cancels a linear drift
        ratios.append(windows[i]["rate"] / base)
        held_ratios.append(windows[i]["rate_while_held"] / base)
        after_ratios.append(windows[i]["rate_after"] / base)
    a = [w["rate"] for w in windows if w["kind"] == "A"]
    bw = [w for w in windows if w["kind"] == "B"]
    return {
        "window_s": window, "pairs": pairs, "ratios": ratios, "ratio_median": statistics.median(ratios),
        "ratio_p25": pct(ratios, 25), "ratio_p75": pct(ratios, 75),
        "ratio_while_held_median": statistics.median(held_ratios),
        "ratio_after_endbu_median": statistics.median(after_ratios), "settle_s": settle,
        # how much the baseline itself moved: (max - min) / median of the A windows
        "baseline_spread": (max(a) - min(a)) / statistics.median(a),
        "rate_without_median": statistics.median(a), "rate_with_median": statistics.median(w["rate"] for w in bw),
        "startbu_under_load_wall_ms": [round(w["startbu_wall_ms"], 2) for w in bw],
        "writers_paused_under_load_ms": [w["writers_paused_ms"] for w in bw],
        "delta_bytes": [w["delta_bytes"] for w in bw], "roll_in_s": [w["roll_in_s"] for w in bw],
        "endbu_wall_ms": [round(w["endbu_wall_ms"], 1) for w in bw],
        "app_errors": stats["errors"], "app_max_latency_ms": stats["max_latency_ms"],
        "check_ok": app.check()["ok"], "windows": windows,
    }


# -- 2. startbu latency -------------------------------------------------------------------------

def measure_startbu(daemon: Daemon, reps: int, cli_reps: int) -> dict[str, Any]:
    res: dict[str, Any] = {"reps": reps, "first_call": {}}
    for name in ("big", "small"):   # the first call of each opens what it needs: shown, not counted
        wall, s = daemon.startbu(name)
        daemon.endbu(name)
        res["first_call"][name] = {"wall_ms": round(wall * 1000, 2), "latency_ms": s["latency_ms"]}
    samples: dict[str, dict[str, list[float]]] = {n: {"wall_ms": [], "latency_ms": [], "writers_paused_ms": [],
                                                      "endbu_wall_ms": []} for n in ("big", "small")}
    for i in range(reps):
        for name in (("big", "small") if i % 2 == 0 else ("small", "big")):
            wall, s = daemon.startbu(name)
            e_wall, _ = daemon.endbu(name)
            d = samples[name]
            d["wall_ms"].append(wall * 1000)
            d["latency_ms"].append(s["latency_ms"])
            d["writers_paused_ms"].append(s["writers_paused_ms"])
            d["endbu_wall_ms"].append(e_wall * 1000)
    for name, d in samples.items():
        res[name] = {k: {"median": statistics.median(v), "p90": pct(v, 90), "max": max(v)} for k, v in d.items()}
        res[name]["wall_ms_all"] = [round(x, 2) for x in d["wall_ms"]]
    # The CLI, for information: its Python start-up is most of its wall time.
    cli = []
    for _ in range(cli_reps):
        t0, t1, s = daemon.timed("startbu", "big", "--json")
        daemon.timed("endbu", "big", "--json")
        cli.append({"wall_ms": round((t1 - t0) * 1000, 1), "latency_ms": s["latency_ms"]})
    res["cli_big"] = cli
    res["ratio_median"] = res["big"]["wall_ms"]["median"] / res["small"]["wall_ms"]["median"]
    return res


# -- 3. roll-in ---------------------------------------------------------------------------------

def time_cp(src: Path, dst: Path) -> tuple[float, float]:
    sync()
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    cp_s = time.perf_counter() - t
    sync_s = sync()
    dst.unlink()
    sync()
    return cp_s, sync_s


def measure_rollin(daemon: Daemon, big: Path, scratch: Path, delta_target: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("append", "update"):
        daemon.startbu("big")
        t = time.perf_counter()
        subprocess.run([PY, str(Path(__file__).resolve()), "_write", str(big), kind, str(delta_target)],
                       env=ENV, check=True)
        write_s = time.perf_counter() - t
        sync()   # untimed: the roll-in pays for its own writes only
        wall, e = daemon.endbu("big")
        f = e["files"][0]
        delta, secs = f["delta_bytes"], f["roll_in_seconds"]
        src = scratch / "delta-sized"
        with open(src, "wb") as fh:   # random bytes: no file system compresses or dedups them
            left = delta
            while left > 0:
                n = min(left, 8 * MB)
                fh.write(os.urandom(n))
                left -= n
        cps = [time_cp(src, scratch / "cp-dst") for _ in range(3)]
        src.unlink()
        cp_s = statistics.median(c[0] for c in cps)
        cp_sync_s = statistics.median(c[0] + c[1] for c in cps)
        out[kind] = {"delta_bytes": delta, "roll_in_s": secs, "endbu_wall_s": round(wall, 3),
                     "write_s": round(write_s, 2), "wal_truncated": f["wal_truncated"],
                     "roll_in_MBps": delta / secs / MB, "cp_s": cp_s, "cp_sync_s": cp_sync_s,
                     "cp_MBps": delta / cp_s / MB, "cp_sync_MBps": delta / cp_sync_s / MB,
                     "ratio_cp": cp_s / secs, "ratio_cp_sync": cp_sync_s / secs}
        log(f"roll-in {kind}: {delta / MB:.0f} MB in {secs:.2f} s; cp {cp_s:.2f} s, cp+sync {cp_sync_s:.2f} s")
    return out


# -- 4. freeze stall ----------------------------------------------------------------------------

def measure_freeze(daemon: Daemon, bank_dir: Path, reps: int, hold: float, self_retry: bool) -> dict[str, Any]:
    """Freeze the bank `reps` times while the workload runs; per freeze, the worst commit stall."""
    extra = ["--busy-timeout", "0"] if self_retry else []
    app = Bank(bank_dir, *extra).start()
    freezes = []
    try:
        for _i in range(reps):
            time.sleep(0.7)
            if not self_retry:   # the command a user would run around a snapshot
                t0, t1, r = daemon.timed("freeze", "bank", "--json", "--", "sleep", str(hold))
                fr, th = r["freeze"], r["thaw"]
            else:                # the API: no CLI start-up to wait for (this run is a diagnosis)
                t0 = time.time()
                _, fr = daemon.post("/v1/freeze", {"targets": ["bank"], "timeout": 30})
                time.sleep(hold)
                _, th = daemon.post("/v1/thaw", {"targets": ["bank"]})
                t1 = time.time()
            freezes.append({"cli_from": t0, "cli_to": t1, "frozen_at": fr["frozen_at_epoch"],
                            "hold_s": th["hold_seconds"], "pause_ms": fr["pause_ms"]})
        time.sleep(0.3)
    finally:
        stats = app.stop()
    starts = app.commit_starts()
    for f in freezes:
        thawed = f["frozen_at"] + f["hold_s"]
        # The freeze's own span: from (no later than) the request -- pause_ms runs from it to the
        # response, so frozen_at - pause_ms is earlier -- to the thaw. Not the whole CLI call:
        # under load its start-up alone takes seconds, and a machine stall then is not the freeze's.
        lo, hi = f["frozen_at"] - f["pause_ms"] / 1000, thawed
        if self_retry:
            # Each failed attempt returns at once, so no commit is slow: the stall is the gap
            # between two commits (its end: the start of the first commit after it).
            gaps = [(b - a, a, b) for a, b in itertools.pairwise(starts) if a < hi and b > lo]
            worst, a, b = max(gaps) if gaps else (0.0, 0.0, 0.0)
            f["worst_stall_ms"] = worst * 1000
            f["waited_from_freeze_ms"] = (a - f["frozen_at"]) * 1000 if gaps else None
            f["resumed_after_thaw_ms"] = (b - thawed) * 1000 if gaps else None
        else:
            # Commits over 5 ms as (start, seconds), from the workload; those overlapping the freeze.
            over = sorted((dt, s) for s, dt in stats["slow"] if s < hi and s + dt > lo)
            dt, s = over[-1] if over else (0.0, 0.0)
            f["worst_stall_ms"] = dt * 1000
            f["second_worst_ms"] = over[-2][0] * 1000 if len(over) > 1 else None
            f["waited_from_freeze_ms"] = (s - f["frozen_at"]) * 1000 if over else None
            f["resumed_after_thaw_ms"] = (s + dt - thawed) * 1000 if over else None
        f["stall_minus_hold_ms"] = f["worst_stall_ms"] - f["hold_s"] * 1000
        log(f"freeze{' (self-retrying app)' if self_retry else ''}: hold {f['hold_s'] * 1000:.1f} ms, "
            f"worst stall {f['worst_stall_ms']:.1f} ms")
    excess = [f["stall_minus_hold_ms"] for f in freezes]
    return {"reps": reps, "hold_requested_s": hold, "worst_ms": max(excess), "median_ms": statistics.median(excess),
            "app_errors": stats["errors"], "app_p50_latency_ms": stats["p50_latency_ms"],
            "check_ok": app.check()["ok"], "freezes": freezes}


# -- the table ----------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


APPS = (("throughput", "bank workload"), ("throughput_loop", "insert loop, sync NORMAL"),
        ("throughput_loop_full", "insert loop, sync FULL"))


def goals(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal, the figure it is judged on, and whether it was met."""
    out = {}
    for key, label in APPS:
        v = res[key]["ratio_median"]
        out[f"{key}_ratio"] = {"app": label, "goal": f">= {GOAL_THROUGHPUT}", "value": v,
                               "judged_on": "median over pairs of B / mean(A before, A after)",
                               "pass": v >= GOAL_THROUGHPUT}
    sb = res["startbu"]
    out["startbu_ratio"] = {"goal": f"<= {GOAL_STARTBU_RATIO}", "value": sb["ratio_median"],
                            "judged_on": "median wall time big / median wall time small",
                            "pass": sb["ratio_median"] <= GOAL_STARTBU_RATIO}
    out["startbu_big_p90_ms"] = {"goal": f"< {GOAL_STARTBU_MS}", "value": sb["big"]["wall_ms"]["p90"],
                                 "judged_on": "p90 of the big database's wall times",
                                 "pass": sb["big"]["wall_ms"]["p90"] < GOAL_STARTBU_MS}
    out["freeze_stall_minus_hold_ms"] = {"goal": f"<= {GOAL_STALL_MS}", "value": res["freeze"]["worst_ms"],
                                         "judged_on": "worst over the freezes of (longest commit - hold)",
                                         "pass": res["freeze"]["worst_ms"] <= GOAL_STALL_MS}
    return out


def table(res: dict[str, Any]) -> str:
    sb, ri, fz, fz2 = res["startbu"], res["rollin"], res["freeze"], res["freeze_self_retry"]
    g = res["goals"]
    big_mb = res["databases"]["big"]["bytes"] / MB
    small_mb = res["databases"]["small"]["bytes"] / MB
    rows = [("measure", "Bastion", "baseline", "ratio / figure", "goal", "result")]
    for n, (key, label) in zip(("1", "1b", "1c"), APPS):
        tp = res[key]
        rows.append((f"{n} {label}: writes/s, contops / none",
                     f"{tp['rate_with_median']:.0f}/s", f"{tp['rate_without_median']:.0f}/s",
                     f"{tp['ratio_median']:.3f}", f">= {GOAL_THROUGHPUT}", verdict(g[f"{key}_ratio"]["pass"])))
        rows.append((f"   ratios p25-p75 (baseline moved {tp['baseline_spread'] * 100:.0f}%)", "", "",
                     f"{tp['ratio_p25']:.2f}-{tp['ratio_p75']:.2f}", "", "info"))
        rows.append(("   same, while held only (no startbu/endbu)", "", "",
                     f"{tp['ratio_while_held_median']:.3f}", "", "info"))
        rows.append((f"   same, in the {tp['settle_s']:g} s after endbu (not in A or B)", "", "",
                     f"{tp['ratio_after_endbu_median']:.3f}", "", "info"))
    b, s = sb["big"]["wall_ms"], sb["small"]["wall_ms"]
    rows.append((f"2 startbu wall, {big_mb:.0f} MB vs {small_mb:.0f} MB (median)",
                 f"{b['median']:.1f} ms", f"{s['median']:.1f} ms", f"{sb['ratio_median']:.2f}",
                 f"<= {GOAL_STARTBU_RATIO}", verdict(g["startbu_ratio"]["pass"])))
    rows.append((f"  startbu wall p90, {big_mb:.0f} MB (vs {small_mb:.0f} MB)", f"{b['p90']:.1f} ms",
                 f"{s['p90']:.1f} ms", f"{b['p90']:.1f} ms", f"< {GOAL_STARTBU_MS:.0f} ms",
                 verdict(g["startbu_big_p90_ms"]["pass"])))
    bl, sl = sb["big"]["latency_ms"], sb["small"]["latency_ms"]
    rows.append(("  daemon's latency_ms (median)", f"{bl['median']:.1f} ms", f"{sl['median']:.1f} ms", "", "",
                 "info"))
    bp, spd = sb["big"]["writers_paused_ms"], sb["small"]["writers_paused_ms"]
    rows.append(("  daemon's writers_paused_ms (median)", f"{bp['median']:.2f} ms", f"{spd['median']:.2f} ms",
                 "", "", "info"))
    for kind in ("append", "update"):
        r = ri[kind]
        rows.append((f"3 roll-in {r['delta_bytes'] / MB:.0f} MB ({kind}) vs cp",
                     f"{r['roll_in_MBps']:.0f} MB/s", f"{r['cp_MBps']:.0f} MB/s", f"{r['ratio_cp']:.2f}",
                     "none", "info"))
        rows.append(("  same vs cp + sync", "", f"{r['cp_sync_MBps']:.0f} MB/s", f"{r['ratio_cp_sync']:.2f}",
                     "none", "info"))
    holds = [f["hold_s"] * 1000 for f in fz["freezes"]]
    rows.append((f"4 freeze: worst stall - hold (worst of {fz['reps']})", f"{fz['worst_ms']:.1f} ms",
                 f"hold {min(holds):.0f}-{max(holds):.0f} ms", f"median {fz['median_ms']:.1f} ms",
                 f"<= {GOAL_STALL_MS:.0f} ms", verdict(g["freeze_stall_minus_hold_ms"]["pass"])))
    rows.append((f"  same, app retrying every 1 ms itself ({fz2['reps']})", f"{fz2['worst_ms']:.1f} ms", "",
                 f"median {fz2['median_ms']:.1f} ms", "", "info"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_write":   # the delta writer's child process
        write_delta(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_insert_loop":   # InsertLoop's child process
        insert_loop(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 MB instead of 1 GB, shorter windows, fewer repeats")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    args = ap.parse_args()
    q = args.quick
    big_mb = 200 if q else 1000
    pairs, window = (4, 2.0) if q else (6, 5.0)
    loop_pairs, loop_window = (3, 1.5) if q else (5, 3.0)
    startbu_reps = 8 if q else 15
    delta_mb = 50 if q else 200
    freeze_reps = 5 if q else 7
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-contops-"))
    res: dict[str, Any] = {"mode": "quick" if q else "full", "cpus": os.cpu_count(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "sqlite_app": sqlite3.sqlite_version}
    daemon: Daemon | None = None
    t_all = time.perf_counter()
    try:
        bank_dir = work / "app"
        subprocess.run([PY, "-m", "bastion.workload", "init", str(bank_dir), "--accounts", "1000"], env=ENV,
                       check=True)
        loops = [work / d / "loop.db" for d in ("loop", "loopfull")]
        for db in loops:
            db.parent.mkdir()
            InsertLoop.init(db)
        (work / "big").mkdir()
        (work / "small").mkdir()
        big, small = work / "big" / "big.db", work / "small" / "small.db"
        log(f"building {big_mb} MB and 10 MB databases in {work}")
        res["databases"] = {"big": build_blob_db(big, big_mb * MB), "small": build_blob_db(small, 10 * MB)}
        daemon = ContopsDaemon(work, {"bank": [bank_dir / "bank.db", bank_dir / "audit.db"],
                                      **{db.parent.name: [db] for db in loops},
                                      "big": [big], "small": [small]}).start()

        log(f"1. throughput: {2 * pairs + 1} windows of {window:g} s")
        res["throughput"] = measure_throughput(daemon, "bank", Bank(bank_dir), pairs, window)
        for key, sync, db in (("throughput_loop", "NORMAL", loops[0]), ("throughput_loop_full", "FULL", loops[1])):
            log(f"1b. throughput of an insert loop (synchronous={sync}): {2 * loop_pairs + 1} windows "
                f"of {loop_window:g} s")
            res[key] = measure_throughput(daemon, db.parent.name, InsertLoop(db, sync), loop_pairs, loop_window)
            res[key]["synchronous"] = sync
        log(f"2. startbu latency: {startbu_reps} x big and small")
        res["startbu"] = measure_startbu(daemon, startbu_reps, 1 if q else 3)
        log(f"3. roll-in of about {delta_mb} MB")
        scratch = work / "scratch"
        scratch.mkdir()
        res["rollin"] = measure_rollin(daemon, big, scratch, delta_mb * MB)
        log(f"4. freeze stalls: {freeze_reps} freezes")
        res["freeze"] = measure_freeze(daemon, bank_dir, freeze_reps, 0.5, self_retry=False)
        res["freeze_self_retry"] = measure_freeze(daemon, bank_dir, 3 if q else 5, 0.5, self_retry=True)
    finally:
        if daemon is not None:
            daemon.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    res["goals"] = goals(res)
    text = table(res)
    res["table"] = text
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "contops.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nBastion continuous operations and freeze ({res['mode']}, {res['cpus']} CPUs, "
          f"app SQLite {res['sqlite_app']}, {res['total_s']} s)\n")
    print(text)
    print()
    for key, _ in APPS:
        tp = res[key]
        print(f"{key}: {tp['pairs']} pairs of {tp['window_s']:g} s; B/A {', '.join(f'{r:.2f}' for r in tp['ratios'])};"
              f" delta per window {', '.join(f'{d / MB:.0f}' for d in tp['delta_bytes'])} MB;"
              f" startbu under load {', '.join(f'{x:.0f}' for x in tp['startbu_under_load_wall_ms'])} ms")
    fz = res["freeze"]
    print("freeze (hold / worst stall / its wait began after the freeze / it ended after the thaw, ms): " + "; ".join(
        f"{f['hold_s'] * 1000:.0f}/{f['worst_stall_ms']:.0f}/{f['waited_from_freeze_ms'] or 0:.0f}/"
        f"{f['resumed_after_thaw_ms'] or 0:.0f}" for f in fz["freezes"]))
    print(f"wrote {OUT / 'contops.json'}")
    # A missed goal is a result, not a failure; an application database that fails its check is one.
    checks = [res[k]["check_ok"] for k in [a for a, _ in APPS] + ["freeze", "freeze_self_retry"]]
    if not all(checks):
        print("error: an application's databases failed their integrity/invariant check", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
