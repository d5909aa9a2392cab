"""SQL server benchmark (issue 6): reads through the server ÷ apsw in process, and durable
commits/s with group commit ÷ one fsync per commit, side by side in one run.

    .venv/bin/python bench/bench_sql.py [--seconds N] [--clients N] [--quick]

Starts its own daemon (temp dir, free port) serving two databases that differ only in
``group_commit``: ``gc`` (durable, group commit) and ``nogc`` (durable, SQLite's
synchronous=FULL: one fsync per commit). Clients are the real DB-API driver in
separate processes (4 processes × clients/4 threads), each committing one small INSERT
per transaction (one request each, autocommit); the windows alternate gc/nogc/gc/nogc and the ratio is of the medians.
Reads: a point SELECT by primary key, one client through the server vs the same query
on an apsw connection in this process, and then the server with all clients.
Prints one table and writes bench/out/sql.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT, PY, ROOT, Daemon, free_port, log, write_config

sys.path.insert(0, str(ROOT / "src"))


def worker(dsn: str, token: str, kind: str, threads: int, seconds: float, start_at: float, q: mp.Queue) -> None:
    import threading
    import bastion.client as bc
    counts = []

    def run(i: int) -> None:
        # one transaction per request (the driver's autocommit): the write lock is held only
        # while the server runs it, never across a network round trip
        con = bc.connect(dsn, token=token, autocommit=True)
        n = 0
        rnd = random.Random(i)
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.time() < end:
            if kind == "read":
                con.execute("SELECT v FROM kv WHERE id = ?", (rnd.randint(1, 10000),)).fetchone()
            else:
                con.execute("INSERT INTO log(client, at) VALUES (?, ?)", (i, time.time()))
            n += 1
        counts.append(n)
        con.close()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put(sum(counts))


def load(dsn: str, token: str, kind: str, clients: int, seconds: float) -> float:
    procs = min(4, clients)
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.5            # every client connected before the window opens
    ps = [mp.Process(target=worker, args=(dsn, token, kind, clients // procs + (i < clients % procs), seconds,
                                          start_at, q)) for i in range(procs)]
    for p in ps:
        p.start()
    total = sum(q.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds = 2.0, 1
    import apsw
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-sql-"))
    for name in ("gc", "nogc"):
        con = apsw.Connection(str(work / f"{name}.db"))
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT); "
                    "CREATE TABLE log(id INTEGER PRIMARY KEY, client INT, at REAL)")
        with con:
            con.executemany("INSERT INTO kv VALUES (?, ?)", ((i, f"value-{i}") for i in range(1, 10001)))
        con.close()
    port = free_port()
    daemon = Daemon(write_config(work, port, {"gc": [work / "gc.db"],
                                              "nogc": {"files": [work / "nogc.db"], "group_commit": False}}), port)
    try:
        daemon.start(20)
        token = daemon.token
        res: dict = {"clients": a.clients, "seconds_per_window": a.seconds}

        # reads: one client, server vs apsw in process
        log("reads: apsw in process")
        con = apsw.Connection(str(work / "gc.db"))
        rnd = random.Random(1)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            con.execute("SELECT v FROM kv WHERE id = ?", (rnd.randint(1, 10000),)).fetchone()
            n += 1
        res["reads_apsw_per_s"] = n / (time.perf_counter() - t0)
        con.close()
        log("reads: one client through the server")
        res["reads_server_1_per_s"] = load(f"bastion://127.0.0.1:{port}/gc", token, "read", 1, a.seconds)
        log(f"reads: {a.clients} clients through the server")
        res["reads_server_n_per_s"] = load(f"bastion://127.0.0.1:{port}/gc", token, "read", a.clients, a.seconds)

        gc, nogc = [], []
        for r in range(a.rounds):
            for name, acc in (("gc", gc), ("nogc", nogc)):
                log(f"durable commits, {a.clients} clients, {name} (round {r + 1})")
                acc.append(load(f"bastion://127.0.0.1:{port}/{name}", token, "write", a.clients, a.seconds))
        res["commits_group_per_s"] = gc
        res["commits_fsync_each_per_s"] = nogc
        status = json.loads(subprocess.run([PY, "-m", "bastion", "--config", str(work / "bastion.toml"), "status",
                                            "--json"], capture_output=True, text=True).stdout)
        res["group_commit_fsyncs"] = status["sql"]["databases"]["gc"]["fsyncs"]
        # fsync cost of this disk, for reading the figures
        fd = os.open(work / "fsync.probe", os.O_WRONLY | os.O_CREAT)
        t0 = time.perf_counter()
        for _ in range(50):
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        res["fsync_ms"] = (time.perf_counter() - t0) / 50 * 1000
        os.close(fd)
    finally:
        daemon.stop(30)
    g, f = statistics.median(res["commits_group_per_s"]), statistics.median(res["commits_fsync_each_per_s"])
    res["ratio_reads_server_over_apsw"] = res["reads_server_1_per_s"] / res["reads_apsw_per_s"]
    res["ratio_group_over_fsync_each"] = g / f
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sql.json").write_text(json.dumps(res, indent=2))
    print()
    print(f"SQL server benchmark ({a.clients} clients, {a.seconds:g} s windows, disk fsync {res['fsync_ms']:.2f} ms)")
    print(f"  point reads/s   apsw in process: {res['reads_apsw_per_s']:>10,.0f}")
    print(f"                  server, 1 client: {res['reads_server_1_per_s']:>9,.0f}   ratio "
          f"{res['ratio_reads_server_over_apsw']:.4f} (network round trip per query; for information)")
    print(f"                  server, {a.clients} clients: {res['reads_server_n_per_s']:>7,.0f}")
    print(f"  durable commits/s group commit: {g:>9,.0f}   one fsync per commit: {f:>7,.0f}")
    verdict = "PASS" if g / f >= 10 else "MISS"
    print(f"                  ratio {g / f:.2f}  (goal >= 10)  {verdict}")
    print(f"  fsyncs for all group-commit windows: {res['group_commit_fsyncs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
