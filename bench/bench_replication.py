"""Replication benchmark: lag from a primary daemon to a backup daemon, and catch-up rate.

    .venv/bin/python bench/bench_replication.py [--rate 1000] [--seconds 20] [--keep]

Two real daemons on loopback (`bastion serve`), the bank workload (its own process,
stdlib sqlite3) writing on the primary's files at a steady rate.

1. Lag, end to end: this process reads the transfer counter (meta.transfers) of the
   primary's bank.db and of the replica's copy every 5 ms (read-only, stdlib sqlite3).
   For every value seen on the primary, the lag is the time until the replica first
   showed at least that value. p50/p99/max over the run; goal p99 < 1 s.
2. Catch-up rate: the primary's schedule is manual; the workload writes as fast as it can
   for a while, then `bastion replicate run` ships everything: changes/s of read + msgpack
   + HTTP + apply + prune, end to end.

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
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(dir: Path, port: int, files: list[Path], token: Path, db_extra: str) -> Path:
    text = (f'[daemon]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{dir / "var"}"\n\n'
            f'[replication]\npeer_token_file = "{token}"\n\n'
            f'[databases.bank]\nfiles = {json.dumps([str(f) for f in files])}\n{db_extra}\n')
    p = dir / "bastion.toml"
    p.write_text(text)
    return p


class Daemon:
    def __init__(self, cfg: Path, port: int) -> None:
        self.cfg, self.port = cfg, port
        self.log = open(cfg.parent / "daemon.log", "w")
        self.proc = subprocess.Popen([PY, "-m", "bastion", "serve", "--config", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((cfg.parent / "daemon.log").read_text()[-3000:])
            time.sleep(0.05)

    def cli(self, *args: str) -> dict[str, Any]:
        p = subprocess.run([PY, "-m", "bastion", "--config", str(self.cfg), *args, "--json"],
                           capture_output=True, text=True, timeout=600)
        if p.returncode not in (0, 1):
            raise RuntimeError(p.stderr or p.stdout)
        return json.loads(p.stdout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def counter(path: Path) -> int | None:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT value FROM meta WHERE key = 'transfers'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def pair(base: Path, schedule: str) -> tuple[Daemon, Daemon, Path, Path]:
    app = base / "app"
    subprocess.run([PY, "-m", "bastion.workload", "init", str(app), "--accounts", "1000"], check=True)
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    copy = base / "backup" / "copy"
    (base / "backup").mkdir()
    (base / "primary").mkdir()
    bport, pport = free_port(), free_port()
    backup = Daemon(config(base / "backup", bport, [copy / "bank.db", copy / "audit.db"], token,
                           'replica_of = "bank"'), bport)
    primary = Daemon(config(base / "primary", pport, [app / "bank.db", app / "audit.db"], token,
                            f'replicate_to = "http://127.0.0.1:{bport}"\nreplicate_schedule = "{schedule}"'), pport)
    return primary, backup, app, copy


def wait_seeded(primary: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = primary.cli("replicate", "status")["databases"][0]
        if all(f["applied"] is not None for f in st["files"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not seeded: {st}")
        time.sleep(0.2)


def lag_run(base: Path, rate: float, seconds: float) -> dict[str, Any]:
    primary, backup, app, copy = pair(base, "continuous")
    try:
        wait_seeded(primary)
        stats_path = base / "stats.json"
        wl = subprocess.Popen([PY, "-m", "bastion.workload", "run", str(app), "--seconds", str(seconds),
                               "--rate", str(rate), "--stats", str(stats_path)])
        seen: dict[str, list[tuple[float, int]]] = {"p": [], "r": []}
        stop = threading.Event()

        def poll(key: str, path: Path) -> None:
            last = -1
            while not stop.is_set():
                v = counter(path)
                if v is not None and v != last:
                    seen[key].append((time.monotonic(), v))
                    last = v
                time.sleep(0.005)
        threads = [threading.Thread(target=poll, args=("p", app / "bank.db")),
                   threading.Thread(target=poll, args=("r", copy / "bank.db"))]
        for t in threads:
            t.start()
        wl.wait()
        deadline = time.monotonic() + 60
        final = counter(app / "bank.db")
        while counter(copy / "bank.db") != final and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        stats = json.loads(stats_path.read_text())
        rvals = [v for _, v in seen["r"]]
        lags = []
        for t, v in seen["p"]:
            i = bisect.bisect_left(rvals, v)
            if i < len(rvals):
                lags.append(max(0.0, seen["r"][i][0] - t))
        lags.sort()
        q = lambda x: lags[min(len(lags) - 1, int(len(lags) * x))] if lags else None   # noqa: E731
        return {"target_rate": rate, "achieved_commits_per_s": round(stats["commits_per_s"], 1),
                "samples": len(lags), "lag_p50_s": q(0.5), "lag_p99_s": q(0.99), "lag_max_s": lags[-1] if lags else None,
                "caught_up": counter(copy / "bank.db") == final}
    finally:
        primary.stop()
        backup.stop()


def catchup_run(base: Path, seconds: float) -> dict[str, Any]:
    primary, backup, app, copy = pair(base, "manual")
    try:
        primary.cli("replicate", "run", "bank")          # seed, empty log
        subprocess.run([PY, "-m", "bastion.workload", "run", str(app), "--seconds", str(seconds)], check=True,
                       capture_output=True)
        pending = primary.cli("replicate", "status")["databases"][0]["lag_changes"]
        t0 = time.monotonic()
        res = primary.cli("replicate", "run", "bank")
        dt = time.monotonic() - t0
        return {"changes": res["shipped"], "pending_before": pending, "seconds": round(dt, 3),
                "changes_per_s": round(res["shipped"] / dt), "same_counter": counter(app / "bank.db") == counter(
                    copy / "bank.db")}
    finally:
        primary.stop()
        backup.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-repl-"))
    try:
        (base / "lag").mkdir()
        (base / "catchup").mkdir()
        lag = lag_run(base / "lag", args.rate, args.seconds)
        cu = catchup_run(base / "catchup", min(args.seconds, 10))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    out = {"lag": lag, "catch_up": cu, "loadavg": load}
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores, shared)")
    print(f"{'measure':<44}{'value':>14}  goal")
    print(f"{'application commits/s (target ' + str(int(args.rate)) + ')':<44}{lag['achieved_commits_per_s']:>14}")
    for k in ("lag_p50_s", "lag_p99_s", "lag_max_s"):
        v = lag[k]
        goal = "p99 < 1 s " + ("ok" if v is not None and v < 1 else "MISS") if k == "lag_p99_s" else ""
        print(f"{'replication lag ' + k[4:7] + ' (s)':<44}{v if v is None else round(v, 4):>14}  {goal}")
    print(f"{'catch-up: changes/s (read+send+apply+prune)':<44}{cu['changes_per_s']:>14}  "
          f"({cu['changes']} changes in {cu['seconds']} s)")
    print(f"{'replica caught up / same counter':<44}{str(lag['caught_up'] and cu['same_counter']):>14}")
    os.makedirs(ROOT / "bench" / "out", exist_ok=True)
    (ROOT / "bench" / "out" / "replication.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
