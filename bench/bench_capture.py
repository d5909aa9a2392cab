"""Change capture benchmark: what capture costs the application, and how fast a copy applies changes.

    .venv/bin/python bench/bench_capture.py [--quick] [--keep] [--dir DIR]

1. Application writes/s with capture installed / without, same workload. Two
   databases built the same way, one with capture installed. Windows alternate
   between them (the order flips every pair); each window is a fresh application
   process (stdlib sqlite3, `python -I`, WAL, synchronous=NORMAL, SQLite 3.40)
   that writes for a fixed time and counts rows written per second itself, by the
   wall clock and per CPU second it used (steadier when other work shares the
   machine). The median of the per-pair ratios is reported. Goal >= 0.6. Between
   windows the log is pruned, as a shipper that keeps up would. Three workloads:
   - small: bank-style transactions, 2 UPDATEs + 1 INSERT per commit;
   - bulk: 500-row INSERT transactions from Python (executemany);
   - sql: 5,000-row INSERT ... SELECT from a recursive CTE, no Python per row: the
     worst case for capture, as the trigger's cost is all there is to compare with.
2. Apply rate: a mix of inserts, updates (a third of them moving the key) and
   deletes written by the application, read with read_changes and applied to a copy
   in batches of 10,000, one transaction each. Rows/s of apply alone (goal >= 50,000),
   also per CPU second of apply, and of read + apply. The copy is then compared with
   the source, row by row. The load average is printed: read the wall-clock figures
   with it.

Prints one table and writes bench/out/capture.json. A goal missed is printed MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import apsw  # noqa: E402

from bastion import capture as cap  # noqa: E402

OUT = ROOT / "bench" / "out"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

SCHEMA = """
CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL);
CREATE TABLE history(id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER, at REAL, note TEXT);
CREATE TABLE items(id INTEGER PRIMARY KEY, k TEXT, price REAL, qty INTEGER, data BLOB);
"""

# The application: no Bastion, stdlib sqlite3 only; prints what it did.
APP = r'''
import json, os, random, sqlite3, sys, time
path, kind, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
con = sqlite3.connect(path, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA synchronous=NORMAL")
rnd = random.Random(os.getpid())
accounts = con.execute("SELECT count(*) FROM accounts").fetchone()[0]
rows = txns = 0
t0 = time.perf_counter()
c0 = time.process_time()
end = t0 + seconds
while True:
    now = time.perf_counter()
    if now >= end:
        break
    if kind == "small":
        a, b = rnd.randrange(1, accounts + 1), rnd.randrange(1, accounts + 1)
        amt = rnd.randint(1, 50)
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amt, a))
        con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amt, b))
        con.execute("INSERT INTO history(src, dst, amount, at, note) VALUES (?, ?, ?, ?, ?)",
                    (a, b, amt, time.time(), "transfer"))
        con.execute("COMMIT")
        rows += 3
    elif kind == "bulk":
        batch = [(f"k{rnd.random()}", rnd.random() * 100, rnd.randint(0, 1000), rnd.randbytes(64))
                 for _ in range(500)]
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT INTO items(k, price, qty, data) VALUES (?, ?, ?, ?)", batch)
        con.execute("COMMIT")
        rows += 500
    elif kind == "sql":
        con.execute("INSERT INTO items(k, price, qty, data) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
                    "SELECT x + 1 FROM c LIMIT 5000) SELECT 'k' || x, x * 0.5, x, randomblob(64) FROM c")
        rows += 5000
    elif kind == "mix":
        # For the apply benchmark: inserts, updates (some moving the key), deletes.
        n = int(seconds)
        ids = []
        next_id = 1
        for start in range(0, n, 1000):
            con.execute("BEGIN IMMEDIATE")
            for _ in range(min(1000, n - start)):
                r = rnd.random()
                if r < 0.6 or len(ids) < 100:
                    con.execute("INSERT INTO items(id, k, price, qty, data) VALUES (?, ?, ?, ?, ?)",
                                (next_id, f"k{next_id}", rnd.random(), rnd.randint(0, 9), rnd.randbytes(48)))
                    ids.append(next_id)
                    next_id += 1
                elif r < 0.8:
                    i = rnd.randrange(len(ids))
                    con.execute("UPDATE items SET price = ?, qty = qty + 1 WHERE id = ?", (rnd.random(), ids[i]))
                elif r < 0.9:
                    i = rnd.randrange(len(ids))
                    con.execute("UPDATE items SET id = ? WHERE id = ?", (next_id, ids[i]))
                    ids[i] = next_id
                    next_id += 1
                else:
                    i = rnd.randrange(len(ids))
                    con.execute("DELETE FROM items WHERE id = ?", (ids[i],))
                    ids[i] = ids[-1]
                    ids.pop()
                rows += 1
            con.execute("COMMIT")
        break
    txns += 1
secs = time.perf_counter() - t0
print(json.dumps({"rows": rows, "txns": txns, "seconds": secs, "cpu_seconds": time.process_time() - c0}))
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_app(db: Path, kind: str, seconds: float) -> dict[str, Any]:
    p = subprocess.run([PY, "-I", "-c", APP, str(db), kind, str(seconds)], capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"application failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def make_db(path: Path, accounts: int = 1000) -> Path:
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL").fetchall()
    con.execute(SCHEMA).fetchall()
    with con:
        con.executemany("INSERT INTO accounts VALUES (?, ?, 1000)", [(i, f"owner-{i}") for i in range(1, accounts + 1)])
    con.close()
    return path


def overhead(work: Path, kind: str, pairs: int, window: float) -> dict[str, Any]:
    plain, captured = make_db(work / f"{kind}-plain.db"), make_db(work / f"{kind}-captured.db")
    cap.install(captured, "bench")
    ratios, cpu_ratios, rates = [], [], {"plain": [], "captured": []}
    for i in range(pairs):
        order = [("plain", plain), ("captured", captured)]
        if i % 2:
            order.reverse()
        got, cpu = {}, {}
        for name, db in order:
            r = run_app(db, kind, window)
            got[name] = r["rows"] / r["seconds"]
            cpu[name] = r["rows"] / r["cpu_seconds"]
            rates[name].append(got[name])
            if name == "captured":
                cap.prune(captured, cap.position(captured).seq)   # a shipper that keeps up
        ratios.append(got["captured"] / got["plain"])
        cpu_ratios.append(cpu["captured"] / cpu["plain"])
        log(f"{kind} pair {i + 1}/{pairs}: plain {got['plain']:,.0f} rows/s, captured {got['captured']:,.0f} "
            f"rows/s, ratio {ratios[-1]:.3f} (per CPU second {cpu_ratios[-1]:.3f})")
    return {"ratio_median": statistics.median(ratios), "ratios": ratios,
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
            "plain_rows_s": statistics.median(rates["plain"]), "captured_rows_s": statistics.median(rates["captured"]),
            "pairs": pairs, "window_s": window}


def apply_rate(work: Path, n: int) -> dict[str, Any]:
    src, dst = make_db(work / "apply-src.db"), work / "apply-dst.db"
    cap.install(src, "A")
    s, d = apsw.Connection(str(src)), apsw.Connection(str(dst))
    with d.backup("main", s, "main") as b:
        b.step(-1)
    s.close()
    d.close()
    cap.remove(dst)
    cap.set_applied(dst, "A", cap.position(src).seq)
    r = run_app(src, "mix", n)
    log(f"application wrote {r['rows']:,} changes in {r['seconds']:.1f} s")
    s = apsw.Connection(str(src))
    d = apsw.Connection(str(dst))
    s.setbusytimeout(10_000)
    d.setbusytimeout(10_000)
    after = 0
    t_read = t_apply = cpu_apply = 0.0
    total = 0
    while True:
        t = time.perf_counter()
        batch = cap.read_changes(s, after, 10_000)
        t_read += time.perf_counter() - t
        if not batch:
            break
        t, c = time.perf_counter(), time.process_time()
        cap.apply(d, batch, "A")
        t_apply += time.perf_counter() - t
        cpu_apply += time.process_time() - c
        after = batch[-1].seq
        total += len(batch)
    rows = "SELECT * FROM items ORDER BY id"
    same = s.execute(rows).fetchall() == d.execute(rows).fetchall()
    s.close()
    d.close()
    return {"changes": total, "apply_s": t_apply, "read_s": t_read, "apply_rows_s": total / t_apply,
            "apply_rows_per_cpu_s": total / cpu_apply,
            "read_apply_rows_s": total / (t_read + t_apply), "copy_equal": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter windows and fewer changes")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    ap.add_argument("--dir", help="where to put the databases (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-capture-", dir=args.dir))
    pairs, window, n = (3, 1.5, 60_000) if args.quick else (11, 2.0, 200_000)
    app_version = subprocess.run([PY, "-I", "-c", "import sqlite3; print(sqlite3.sqlite_version)"],
                                 capture_output=True, text=True).stdout.strip()
    res: dict[str, Any] = {"mode": "quick" if args.quick else "full", "cpus": os.cpu_count(),
                           "sqlite_app": app_version,
                           "sqlite_daemon": apsw.sqlite_lib_version()}
    res["load_before"] = os.getloadavg()
    try:
        for kind in ("small", "bulk", "sql"):
            res[kind] = overhead(work, kind, pairs, window)
        res["apply"] = apply_rate(work, n)
        res["load_after"] = os.getloadavg()
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "capture.json").write_text(json.dumps(res, indent=2))

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"
    print(f"\nBastion change capture ({res['mode']}, {res['cpus']} CPUs, application SQLite {res['sqlite_app']}, "
          f"daemon SQLite {res['sqlite_daemon']})")
    print(f"load average before/after: {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f} "
          "(other work on the machine makes wall-clock rates noisy; per-CPU-second figures are steadier)")
    print(f"{'measure':<58}{'value':>14}{'goal':>10}  ")
    for kind, what in (("small", "bank transactions (2 UPDATE + 1 INSERT per commit)"),
                       ("bulk", "500-row INSERT transactions (Python executemany)"),
                       ("sql", "5,000-row INSERT ... SELECT (no Python per row)")):
        r = res[kind]
        print(f"{'writes/s with capture / without: ' + kind:<58}{r['ratio_median']:>14.3f}{'>= 0.6':>10}  "
              f"{mark(r['ratio_median'] >= 0.6)}")
        print(f"{'   same, rows per CPU second of the application':<58}{r['cpu_ratio_median']:>14.3f}")
        print(f"{'   ' + what:<58}{r['plain_rows_s']:>11,.0f} -> {r['captured_rows_s']:,.0f} rows/s")
    a = res["apply"]
    print(f"{'apply rate, rows/s (' + format(a['changes'], ',') + ' changes, 10,000 per batch)':<58}"
          f"{a['apply_rows_s']:>14,.0f}{'>= 50,000':>10}  {mark(a['apply_rows_s'] >= 50_000)}")
    print(f"{'   same, rows per CPU second of apply':<58}{a['apply_rows_per_cpu_s']:>14,.0f}")
    print(f"{'read + apply, rows/s':<58}{a['read_apply_rows_s']:>14,.0f}")
    print(f"{'copy equal to source after apply':<58}{a['copy_equal']!s:>14}")
    print(f"wrote {OUT / 'capture.json'}")
    return 0 if a["copy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
