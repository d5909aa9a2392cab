"""Replication benchmark: Bastion's lag from a primary daemon to a backup daemon beside
Litestream's lag to a file replica, on the same workload; and Bastion's catch-up rate.

    .venv/bin/python bench/bench_replication.py [--rate 1000] [--seconds 20] [--synchronous NORMAL]
        [--litestream-variants 1s,100ms] [--photo-restores 60] [--no-litestream] [--keep]

The workload, in every phase: the bank (`python -m bastion.workload run`, its own process,
stdlib sqlite3, bank.db + audit.db written in one transaction, WAL) at a steady --rate for
--seconds, on its own fresh pair of files, with synchronous=NORMAL on both files by default
(--synchronous FULL or default for SQLite's own, FULL). Why NORMAL: with FULL every commit
waits for two fsyncs (one per WAL), and on the shared 2-core machine each wake-up after an
fsync waits for a CPU: at a load of 3-5 the workload alone, without any daemon, reaches only
~320 of 1,000 commits/s (1,000/s idle). NORMAL in WAL mode is what most applications run;
it is what keeps the 1,000/s figure at 1,000/s. The achieved rate is printed beside the target.

1. Bastion, end to end: two real daemons on loopback (`bastion serve`); the primary
   protects the files and ships continuously. This process reads the transfer counter
   (meta.transfers of bank.db) of the primary's bank.db and of the backup's copy every
   5 ms (read-only, stdlib sqlite3). For every counter value seen on the primary at time t,
   the lag is the first time the copy showed at least that value, minus t.
2. Litestream (the npm package @flydotio/litestream-linux-x64, cached in bench/out/tools):
   no Bastion daemon; `litestream replicate -config litestream.yml` replicates bank.db and
   audit.db to a file replica. Variants (--litestream-variants):
     1s     Litestream's defaults: sync-interval 1s (and monitor-interval 1s);
     100ms  sync-interval 100ms AND monitor-interval 100ms. Both: a replica only ships what
            the database's monitor has copied to the shadow WAL, which it does every
            monitor-interval, so sync-interval alone cannot go below 1 s;
     sync100ms  sync-interval 100ms alone (to show the above; not run by default).
   A file replica cannot be read as a database: it is read by restoring it. Two ways:
   a. live, as a reader of the replica would: `litestream restore -config ... -o DIR/bank.db`
      in a loop, back to back, niced (`nice -n 10`) so the reader takes CPU from neither the
      application nor Litestream; meta.transfers of the restored bank.db is the replica's
      counter. Same lag definition, with the observation time of a restore = its END: an
      UPPER BOUND on the lag (the restore read the replica somewhere between its start and
      its end). Restore durations are printed to judge it: every restore replays the replica
      from its snapshot (taken when replication started), so they grow as the run goes on
      (0.4 s median, 1 s at the end of a 20 s run at 1,000 tx/s).
   b. photos: this process lists the replica every 5 ms and, each time a file appeared in it,
      hard-links the files listed into a new directory, a frozen replica. Litestream writes
      each file as NAME.tmp and renames it, so a listed file is complete; a photo's new files
      were renamed between the start of the previous listing and the end of its own. After
      the run (Litestream stopped, nothing timed) photos are restored (`litestream restore
      -o ... file://PHOTO`, at most --photo-restores of them, evenly spaced, 2 at a time).
      For a counter value v: the first restored photo holding v bounds the time the replica
      held v from above (end of its listing), and the restored photo before it, which did
      not, bounds it from below; with every photo restored the bracket is one listing (a
      few ms) wide. Printed as "lower - upper" quantiles.
   Litestream replicates each file on its own: a restored bank.db and audit.db are not
   guaranteed to be from the same transaction. Only bank.db's counter is read, as for Bastion.
3. Bastion's catch-up rate: the primary's schedule is manual; the workload writes as fast
   as it can for a while, then `bastion replicate run` ships everything: changes/s of read
   + msgpack + HTTP + apply + prune, end to end.

When Litestream cannot be had (no npm, no network), the table says why and the rest runs.
Prints a table and writes bench/out/replication.json. The load average is printed: the
machine is shared, read the figures with it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, whatever the cwd
from _common import ENV, OUT, PY, Daemon, free_port, litestream_binary, log, write_config

# name -> (replica's sync-interval, database's monitor-interval); None = Litestream's default (1s)
LITESTREAM_VARIANTS: dict[str, tuple[str | None, str | None]] = {
    "1s": (None, None),
    "100ms": ("100ms", "100ms"),
    "sync100ms": ("100ms", None),
}


class ReplDaemon(Daemon):
    """A primary or a backup of the bank, started at once (30 s at most)."""

    def __init__(self, dir: Path, port: int, files: list[Path], token: Path, db: dict[str, str]) -> None:
        super().__init__(write_config(dir, port, {"bank": {"files": files, **db}},
                                      sections={"replication": {"peer_token_file": token}}), port)
        self.start(30)

    def report(self, *args: str) -> dict[str, Any]:
        """A CLI command's --json output (exit 0 or 1: a partial result is still a report)."""
        p = subprocess.run([PY, "-m", "bastion", "--config", str(self.config), *args, "--json"],
                           capture_output=True, text=True, timeout=600, env=ENV, check=False)
        if p.returncode not in (0, 1):
            raise RuntimeError(p.stderr or p.stdout)
        return json.loads(p.stdout)


def counter(path: Path) -> int | None:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT value FROM meta WHERE key = 'transfers'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None


class Poller(threading.Thread):
    """Reads a file's transfer counter every 5 ms; keeps (monotonic time, value) at each change."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = -1
        while not self.halt.is_set():
            v = counter(self.path)
            if v is not None and v != last:
                self.seen.append((time.monotonic(), v))
                last = v
            time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def quantiles(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    def q(x: float) -> float | None:
        return v[min(len(v) - 1, int(len(v) * x))] if v else None
    return {"p50": q(0.5), "p99": q(0.99), "max": v[-1] if v else None, "n": len(v)}


def lags(primary: list[tuple[float, int]], replica: list[tuple[float, int]]) -> list[float]:
    """For each (t, v) seen on the primary: first replica time with a value >= v, minus t.
    replica: (observation time, value), values non-decreasing."""
    rvals = [v for _, v in replica]
    out = []
    for t, v in primary:
        i = bisect.bisect_left(rvals, v)
        if i < len(rvals):
            out.append(max(0.0, replica[i][0] - t))
    return out


def start_workload(app: Path, rate: float | None, seconds: float, sync: str, stats: Path,
                   quiet: bool = False) -> subprocess.Popen:
    cmd = [PY, "-m", "bastion.workload", "run", str(app), "--seconds", str(seconds), "--stats", str(stats)]
    if rate:
        cmd += ["--rate", str(rate)]
    if sync != "default":
        cmd += ["--synchronous", sync]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL if quiet else None)


def init_bank(app: Path) -> None:
    subprocess.run([PY, "-m", "bastion.workload", "init", str(app), "--accounts", "1000"], check=True, env=ENV)


def workload_stats(stats_path: Path, rate: float) -> dict[str, Any]:
    st = json.loads(stats_path.read_text())
    return {"target_rate": rate, "achieved_commits_per_s": round(st["commits_per_s"], 1), "commits": st["commits"],
            "commit_latency_p99_ms": round(st["p99_latency_ms"], 2), "errors": st["errors"]}


# -- Bastion ----------------------------------------------------------------------------------

def pair(base: Path, schedule: str) -> tuple[ReplDaemon, ReplDaemon, Path, Path]:
    app = base / "app"
    init_bank(app)
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    copy = base / "backup" / "copy"
    (base / "backup").mkdir()
    (base / "primary").mkdir()
    bport, pport = free_port(), free_port()
    backup = ReplDaemon(base / "backup", bport, [copy / "bank.db", copy / "audit.db"], token, {"replica_of": "bank"})
    primary = ReplDaemon(base / "primary", pport, [app / "bank.db", app / "audit.db"], token,
                         {"replicate_to": f"http://127.0.0.1:{bport}", "replicate_schedule": schedule})
    return primary, backup, app, copy


def wait_seeded(primary: ReplDaemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = primary.report("replicate", "status")["databases"][0]
        if all(f["applied"] is not None for f in st["files"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not seeded: {st}")
        time.sleep(0.2)


def bastion_lag_run(base: Path, rate: float, seconds: float, sync: str) -> dict[str, Any]:
    primary, backup, app, copy = pair(base, "continuous")
    try:
        wait_seeded(primary)
        stats_path = base / "stats.json"
        pp, rp = Poller(app / "bank.db"), Poller(copy / "bank.db")
        pp.start()
        rp.start()
        start_workload(app, rate, seconds, sync, stats_path).wait()
        deadline = time.monotonic() + 60
        final = counter(app / "bank.db")
        while counter(copy / "bank.db") != final and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        pp.stop()
        rp.stop()
        return {**workload_stats(stats_path, rate), "lag_s": quantiles(lags(pp.seen, rp.seen)),
                "caught_up": counter(copy / "bank.db") == final}
    finally:
        primary.stop()
        backup.stop()


def catchup_run(base: Path, seconds: float, sync: str) -> dict[str, Any]:
    primary, backup, app, copy = pair(base, "manual")
    try:
        primary.report("replicate", "run", "bank")          # seed, empty log
        start_workload(app, None, seconds, sync, base / "stats.json", quiet=True).wait()
        pending = primary.report("replicate", "status")["databases"][0]["lag_changes"]
        t0 = time.monotonic()
        res = primary.report("replicate", "run", "bank")
        dt = time.monotonic() - t0
        return {"changes": res["shipped"], "pending_before": pending, "seconds": round(dt, 3),
                "changes_per_s": round(res["shipped"] / dt), "same_counter": counter(app / "bank.db") == counter(
                    copy / "bank.db")}
    finally:
        primary.stop()
        backup.stop()


# -- Litestream -------------------------------------------------------------------------------

class Restorer(threading.Thread):
    """Restores the file replica of bank.db back to back; keeps (start, end, counter) per restore."""

    def __init__(self, binary: str, cfg: Path, db: Path, scratch: Path) -> None:
        super().__init__(daemon=True)
        self.binary, self.cfg, self.db, self.scratch = binary, cfg, db, scratch
        self.obs: list[tuple[float, float, int]] = []
        self.failed: list[str] = []
        self.halt = threading.Event()

    def once(self) -> tuple[float, float, int | None, str]:
        d = self.scratch / f"r{len(self.obs) + len(self.failed)}"
        d.mkdir()
        t0 = time.monotonic()
        p = subprocess.run(["nice", "-n", "10", self.binary, "restore", "-config", str(self.cfg),
                            "-o", str(d / "bank.db"), str(self.db)], capture_output=True, text=True, timeout=120,
                           check=False)
        t1 = time.monotonic()
        v = counter(d / "bank.db") if p.returncode == 0 else None
        shutil.rmtree(d, ignore_errors=True)
        return t0, t1, v, (p.stderr or p.stdout).strip()[-300:]

    def run(self) -> None:
        while not self.halt.is_set():
            t0, t1, v, err = self.once()
            if v is None:
                self.failed.append(err)
            else:
                self.obs.append((t0, t1, v))

    def last(self) -> int | None:
        return self.obs[-1][2] if self.obs else None

    def stop(self) -> None:
        self.halt.set()
        self.join()


class Photographer(threading.Thread):
    """Lists a file replica every 5 ms; whenever a file is new, hard-links the files listed into a
    new photo directory (a replica of its own, frozen). Litestream writes each file as NAME.tmp
    and renames it, so a listed NAME is complete. Per photo (lo, hi, dir): its new files were
    renamed in (lo, hi]: lo = start of the previous listing (without them), hi = end of this one."""

    def __init__(self, replica: Path, dest: Path) -> None:
        super().__init__(daemon=True)
        self.replica, self.dest = replica, dest
        self.photos: list[tuple[float, float, Path]] = []
        self.known: set[str] = set()
        self.halt = threading.Event()

    def listing(self) -> set[str]:
        return {os.path.relpath(os.path.join(d, f), self.replica)
                for d, _, files in os.walk(self.replica) for f in files if not f.endswith(".tmp")}

    def run(self) -> None:
        prev_start = float("-inf")
        while not self.halt.is_set():
            t0 = time.monotonic()
            names = self.listing()
            t1 = time.monotonic()
            if names - self.known:
                d = self.dest / f"{len(self.photos):05d}"
                try:
                    for n in names:
                        (d / n).parent.mkdir(parents=True, exist_ok=True)
                        os.link(self.replica / n, d / n)
                    self.photos.append((prev_start, t1, d))
                    self.known |= names
                except FileNotFoundError:   # removed since listed (retention): next listing instead
                    shutil.rmtree(d, ignore_errors=True)
            prev_start = t0
            time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def restore_photos(binary: str, photos: list[tuple[float, float, Path]], budget: int) -> dict[int, int | None]:
    """Counter of each photo, restored now (after the run: no timing at stake). Over budget, evenly
    spaced photos and the last; 2 at a time (2 cores)."""
    n = len(photos)
    picks = sorted({round(k * (n - 1) / (budget - 1)) for k in range(budget)}) if n > budget else list(range(n))

    def one(k: int) -> int | None:
        d = photos[k][2]
        out = d.parent / f"restored-{k}"
        out.mkdir()
        p = subprocess.run([binary, "restore", "-o", str(out / "bank.db"), f"file://{d}"], capture_output=True,
                           timeout=300, check=False)
        v = counter(out / "bank.db") if p.returncode == 0 else None
        shutil.rmtree(out, ignore_errors=True)
        return v
    with ThreadPoolExecutor(2) as ex:
        return dict(zip(picks, ex.map(one, picks)))


def photo_lags(primary: list[tuple[float, int]], photos: list[tuple[float, float, Path]],
               values: dict[int, int | None]) -> tuple[list[float], list[float], int]:
    """Per primary counter value (t, v): the first restored photo N with a value >= v holds it, so
    the replica did by hi_N; the restored photo M before N does not, so v came with a file renamed
    after lo of photo M+1 (every photo holds all files renamed before its listing began). With
    every photo restored, M+1 = N: the bracket is one listing wide. Returns (lower, upper) lags
    in seconds and how many photo values went down (they must not: the bracket is then void)."""
    ks = sorted(k for k, v in values.items() if v is not None)
    vals = [values[k] for k in ks]
    decreasing = sum(b < a for a, b in pairwise(vals))
    lower, upper = [], []
    for t, v in primary:
        i = bisect.bisect_left(vals, v)
        if i == len(vals):
            continue
        hi = photos[ks[i]][1]
        lo = photos[ks[i - 1] + 1][0] if i > 0 else float("-inf")
        upper.append(max(0.0, hi - t))
        lower.append(min(max(0.0, lo - t), upper[-1]))
    return lower, upper, decreasing


def litestream_yml(path: Path, app: Path, replica: Path, sync_interval: str | None,
                   monitor_interval: str | None) -> None:
    lines = ["dbs:"]
    for name in ("bank", "audit"):
        lines.append(f"  - path: {app / (name + '.db')}")
        if monitor_interval:
            lines.append(f"    monitor-interval: {monitor_interval}")
        lines += ["    replicas:", "      - type: file", f"        path: {replica / name}"]
        if sync_interval:
            lines.append(f"        sync-interval: {sync_interval}")
    path.write_text("\n".join(lines) + "\n")


def litestream_lag_run(base: Path, binary: str, variant: str, rate: float, seconds: float,
                       sync: str, photo_budget: int) -> dict[str, Any]:
    sync_interval, monitor_interval = LITESTREAM_VARIANTS[variant]
    app = base / "app"
    init_bank(app)
    for f in ("bank.db", "audit.db"):   # WAL before Litestream starts, as the Bastion daemon does
        con = sqlite3.connect(app / f)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    cfg = base / "litestream.yml"
    litestream_yml(cfg, app, base / "replica", sync_interval, monitor_interval)
    scratch = base / "restores"
    scratch.mkdir()
    lslog = base / "litestream.log"
    with open(lslog, "w") as fh:
        ls = subprocess.Popen([binary, "replicate", "-config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                              start_new_session=True)
    restorer = Restorer(binary, cfg, app / "bank.db", scratch)
    try:
        deadline = time.monotonic() + 30   # until the first snapshot is in the replica
        while restorer.once()[2] is None:
            if ls.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no restorable replica: {lslog.read_text()[-1500:]}")
            time.sleep(0.2)
        stats_path = base / "stats.json"
        (base / "photos").mkdir()
        pp, camera = Poller(app / "bank.db"), Photographer(base / "replica" / "bank", base / "photos")
        camera.start()
        pp.start()
        restorer.start()
        start_workload(app, rate, seconds, sync, stats_path).wait()
        final = counter(app / "bank.db")
        deadline = time.monotonic() + 60
        while restorer.last() != final and time.monotonic() < deadline and restorer.is_alive():
            time.sleep(0.05)
        pp.stop()
        restorer.stop()
        camera.stop()
    finally:
        ls.send_signal(signal.SIGTERM)
        try:
            ls.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ls.pid, signal.SIGKILL)
            ls.wait(10)
    obs = restorer.obs
    end_upper = lags(pp.seen, [(t1, v) for _, t1, v in obs])
    log(f"Litestream {variant}: restoring {min(len(camera.photos), photo_budget)} of {len(camera.photos)} "
        "photos of the replica")
    values = restore_photos(binary, camera.photos, photo_budget)
    lower, upper, decreasing = photo_lags(pp.seen, camera.photos, values)
    log_text = lslog.read_text()
    return {**workload_stats(stats_path, rate),
            "variant": variant, "sync_interval": sync_interval or "default (1s)",
            "monitor_interval": monitor_interval or "default (1s)",
            "litestream_log_says": [ln.split("msg=", 1)[-1] for ln in log_text.splitlines() if "replicating to" in ln],
            "lag_upper_s": quantiles(end_upper), "lag_photo_lower_s": quantiles(lower),
            "lag_photo_upper_s": quantiles(upper), "photos": len(camera.photos),
            "photos_restored": sum(v is not None for v in values.values()),
            "photo_restores_failed": sum(v is None for v in values.values()), "photo_values_decreasing": decreasing,
            "restores": len(obs), "restores_failed": len(restorer.failed), "restore_errors": restorer.failed[:3],
            "restore_s": quantiles([t1 - t0 for t0, t1, _ in obs]),
            "caught_up": restorer.last() == final}


def litestream_runs(base: Path, variants: list[str], rate: float, seconds: float, sync: str,
                    photo_budget: int) -> dict[str, Any]:
    log("Litestream: fetching the binary")
    binary, tried = litestream_binary(base)
    if binary is None:
        return {"status": "blocked: could not obtain or run the Litestream binary", "tried": tried}
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=False).stdout.strip()
    out: dict[str, Any] = {"status": "ok", "binary": binary, "version": version, "runs": {}}
    for v in variants:
        log(f"Litestream {version}, variant {v}: {rate:g} tx/s for {seconds:g} s")
        (base / f"ls-{v}").mkdir()
        try:
            out["runs"][v] = litestream_lag_run(base / f"ls-{v}", binary, v, rate, seconds, sync, photo_budget)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            out["runs"][v] = {"status": f"failed: {exc}"}
    return out


# -- report -----------------------------------------------------------------------------------

def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(res: dict[str, Any]) -> None:
    a = res["args"]
    bl, ls, cu = res["bastion"], res["litestream"], res["catch_up"]
    runs = {k: r for k, r in ls.get("runs", {}).items() if "lag_upper_s" in r}
    load = res["loadavg_end"]
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end, {res['loadavg_start'][0]:.2f} at start "
          f"(2 cores, shared)")
    print(f"workload: bank (bank.db + audit.db, one transaction), target {a['rate']:g} tx/s for {a['seconds']:g} s, "
          f"WAL, synchronous={a['synchronous']}")
    head = ["measure", "Bastion"] + [f"Litestream {k}" for k in runs] + ["goal"]
    rows = [[f"application commits/s (target {a['rate']:g})", f"{bl['achieved_commits_per_s']:g}"]
            + [f"{r['achieved_commits_per_s']:g}" for r in runs.values()] + [""]]
    for k in ("p50", "p99", "max"):
        goal = ""
        if k == "p99":
            v = bl["lag_s"]["p99"]
            goal = "p99 < 1 s: Bastion " + ("ok" if v is not None and v < 1 else "MISS")
        rows.append([f"replication lag {k} (s)", fmt(bl["lag_s"][k])]
                    + [fmt(r["lag_upper_s"][k]) + " *" for r in runs.values()] + [goal])
    if runs:
        for k in ("p50", "p99", "max"):
            rows.append([f"  Litestream lag {k} from replica photos (s)", ""]
                        + [f"{fmt(r['lag_photo_lower_s'][k])} - {fmt(r['lag_photo_upper_s'][k])}"
                           for r in runs.values()] + [""])
        rows.append(["  restores (count), duration p50 / max (s)", ""]
                    + [f"{r['restores']}, {fmt(r['restore_s']['p50'], 2)} / {fmt(r['restore_s']['max'], 2)}"
                       for r in runs.values()] + [""])
    rows.append(["lag samples (primary counter values)", str(bl["lag_s"]["n"])]
                + [str(r["lag_upper_s"]["n"]) for r in runs.values()] + [""])
    rows.append(["replica caught up at the end", str(bl["caught_up"])]
                + [str(r["caught_up"]) for r in runs.values()] + [""])
    rows.append(["catch-up: changes/s (read+send+apply+prune)", str(cu["changes_per_s"])]
                + ["" for _ in runs] + [f"{cu['changes']} changes in {cu['seconds']} s"])
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) if i < len(r) - 1 else c
                         for i, c in enumerate(r)).rstrip()
    print(line(head))
    print(line(["-" * x for x in w]))
    for r in rows:
        print(line(r))
    low = [f"{k}: {r['achieved_commits_per_s']:g}" for k, r in {"Bastion": bl, **runs}.items()
           if r["achieved_commits_per_s"] < 0.95 * a["rate"]]
    if low:
        print(f"NOTE: below 95 % of the target rate ({', '.join(low)}): lags were measured at that rate")
    if runs:
        print("* Litestream's lag is an UPPER BOUND: the replica is read by `litestream restore` in a loop and "
              "observed at the END of each restore.\n  'from replica photos': the replica was hard-linked into a "
              "photo each time a file appeared in it (listed every 5 ms);\n  the photos were restored after the "
              "run. Lower - upper bound per value (quantiles of each). Variants: "
              + "; ".join(f"{k} = sync-interval {r['sync_interval']}, monitor-interval {r['monitor_interval']}"
                          for k, r in runs.items()))
    if ls.get("status") != "ok":
        print(f"Litestream: {ls.get('status')}" + (f" ({'; '.join(ls['tried'])})" if ls.get("tried") else ""))
    for k, r in ls.get("runs", {}).items():
        if k not in runs:
            print(f"Litestream {k}: {r.get('status')}")
            continue
        if r["restores_failed"]:
            print(f"Litestream {k}: {r['restores_failed']} restores failed, e.g. {r['restore_errors'][:1]}")
        if r["photo_restores_failed"] or r["photo_values_decreasing"]:
            print(f"Litestream {k}: {r['photo_restores_failed']} photo restores failed, "
                  f"{r['photo_values_decreasing']} photo values went down: the photo rows are not reliable")
        if r["photos_restored"] < r["photos"]:
            print(f"Litestream {k}: {r['photos_restored']} of {r['photos']} photos restored (--photo-restores): "
                  "the photo bracket is as wide as the gaps between them")
    print(f"wrote {OUT / 'replication.json'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0, help="transfers per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each lag run (default 20)")
    ap.add_argument("--synchronous", choices=["NORMAL", "FULL", "default"], default="NORMAL",
                    help="the workload's PRAGMA synchronous (default NORMAL; 'default' leaves SQLite's, FULL)")
    ap.add_argument("--litestream-variants", default="1s,100ms",
                    help=f"comma-separated, of {', '.join(LITESTREAM_VARIANTS)} (default 1s,100ms)")
    ap.add_argument("--photo-restores", type=int, default=60,
                    help="at most this many photos of each Litestream replica are restored after the run "
                         "(default 60; 2 at a time)")
    ap.add_argument("--no-litestream", action="store_true", help="skip the Litestream runs")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    args = ap.parse_args()
    variants = [v for v in args.litestream_variants.split(",") if v]
    bad = [v for v in variants if v not in LITESTREAM_VARIANTS]
    if bad:
        ap.error(f"unknown Litestream variant {bad}: choose among {', '.join(LITESTREAM_VARIANTS)}")
    base = Path(tempfile.mkdtemp(prefix="bench-repl-"))
    res: dict[str, Any] = {"args": {"rate": args.rate, "seconds": args.seconds, "synchronous": args.synchronous},
                           "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        for d in ("lag", "catchup", "litestream"):
            (base / d).mkdir()
        log(f"Bastion: {args.rate:g} tx/s for {args.seconds:g} s, primary daemon -> backup daemon")
        res["bastion"] = bastion_lag_run(base / "lag", args.rate, args.seconds, args.synchronous)
        log("Bastion: catch-up")
        res["catch_up"] = catchup_run(base / "catchup", min(args.seconds, 10), args.synchronous)
        res["litestream"] = ({"status": "skipped (--no-litestream)"} if args.no_litestream else
                             litestream_runs(base / "litestream", variants, args.rate, args.seconds,
                                             args.synchronous, max(2, args.photo_restores)))
    finally:
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "replication.json").write_text(json.dumps(res, indent=2))
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
