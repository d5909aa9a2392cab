"""WAL archive RPO and cost: how far the archive lags the last commit, and what it costs the writer.

An application in its own process (stdlib sqlite3, WAL, synchronous=NORMAL, its own automatic
checkpoints) inserts ~100-byte rows, one per transaction, either paced at --rate tx/s or as fast as
it can. Rounds alternate side by side: without the archiver, then with it (the daemon's
FileArchiver loop, in this process, into a file:// repository on the same disk), same file size.

Lag: for every segment, from the moment the archiver saw its oldest commit to the moment the
segment was durable (its commits were seen at most one watch period, 10 ms, after they were
made): the archive's RPO. Printed: its median, p99 and max, the writer's achieved rate with and
without, and the archiver's CPU seconds per wall second.

    .venv/bin/python bench/bench_archive.py [--rate 1000] [--seconds 10] [--rounds 3] [--interval 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ and tests/ on the path)
from _common import PY, log

from bastion.backup.archive import FileArchiver

WRITER = r"""
import sqlite3, sys, time
path, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
con = sqlite3.connect(path, isolation_level=None)
con.execute("PRAGMA synchronous=NORMAL")
n = 0
t0 = time.perf_counter()
end = t0 + seconds
while True:
    now = time.perf_counter()
    if now >= end:
        break
    if rate > 0 and n >= (now - t0) * rate:
        time.sleep(0.0005)
        continue
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t(v) VALUES(?)", ("x" * 100,))
    con.execute("COMMIT")
    n += 1
print(n / (time.perf_counter() - t0))
"""


def _db(d: Path) -> Path:
    import sqlite3
    p = d / "app.db"
    con = sqlite3.connect(p)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    con.close()
    return p


def _round(base: Path, rate: float, seconds: float, archive: bool, interval: float) -> dict:
    d = Path(tempfile.mkdtemp(dir=base))
    db = _db(d)
    a = None
    if archive:
        a = FileArchiver(str(db), "app", "app.db", f"file://{d}/repo", interval)
        a.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    out = subprocess.run([PY, "-c", WRITER, str(db), str(rate), str(seconds)], capture_output=True, text=True,
                         check=True)
    res: dict = {"rate": float(out.stdout.strip())}
    if a is not None:
        time.sleep(interval * 1.5)    # the last segment
        a.stop()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        res["cpu"] = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (time.monotonic() - t0)
        res["lags"] = list(a.lags)
    shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    try:
        for rate in (args.rate, 0.0):
            label = f"paced {rate:g} tx/s" if rate else "as fast as it can"
            plain, arch, lags, cpu = [], [], [], []
            for r in range(args.rounds):
                plain.append(_round(base, rate, args.seconds, False, args.interval)["rate"])
                got = _round(base, rate, args.seconds, True, args.interval)
                arch.append(got["rate"])
                lags += got["lags"]
                cpu.append(got["cpu"])
                log(f"{label} round {r + 1}: without {plain[-1]:.0f} tx/s, with {arch[-1]:.0f} tx/s, "
                    f"max lag {max(got['lags']):.3f} s")
            lags.sort()
            ratios = [a / p for a, p in zip(arch, plain)]
            print(f"{label}: writer {statistics.median(plain):.0f} tx/s without the archiver, "
                  f"{statistics.median(arch):.0f} with (ratio {statistics.median(ratios):.3f}, rounds "
                  f"{', '.join(f'{x:.3f}' for x in ratios)}); archive lag over {len(lags)} segments: median "
                  f"{statistics.median(lags):.3f} s, p99 {lags[int(0.99 * (len(lags) - 1))]:.3f} s, max "
                  f"{lags[-1]:.3f} s (+ at most the 10 ms watch); archiver CPU {statistics.median(cpu):.3f} s/s")
        print(f"load: {os.getloadavg()}, interval {args.interval:g} s, {args.seconds:g} s per round, "
              f"Python {sys.version.split()[0]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
