"""SQL server benchmark (issues 6 and 16): the request path against its ceilings, side by side in one run.

    .venv/bin/python bench/bench_sql.py [--seconds N] [--clients N] [--rounds N] [--before REV]
                                        [--commits-before REV] [--only reads,commits,batch] [--quick]

Starts its own daemons (temp dirs, free ports). Clients are the real DB-API driver in separate
processes (up to 4 processes x clients/4 threads). Three ratios, each against a baseline run in
this same run (windows alternate; each ratio is the median of the rounds' ratios, and a round in
which a client process started late, as happens on a loaded machine, is left out):

* point reads/s (SELECT by primary key, one client): the daemon ÷ a bare ASGI app that reads the
  request and answers a constant result, served by the same server stack (uvicorn, uvloop,
  httptools, the daemon's socket setup) and read by the same driver: the framework ceiling.
  Goal >= 0.8. With ``--before REV`` (default: the commit before issue 16's lean path, if this
  checkout has it), the same reads against a daemon *and driver* of that revision: goal >= 3.
* durable commits/s, 16 clients, one INSERT per request: ``durability = "durable"`` with group
  commit ÷ ``durability = "fast"`` on the same disk (commits acknowledged without waiting for an
  fsync: in WAL mode SQLite's synchronous=NORMAL syncs only at checkpoints, so for commits it is
  synchronous=OFF). Goal >= 0.8. Printed beside it: commits per fsync and the daemon's CPU per
  commit on each side; ``--commits-before REV`` runs the same windows on a daemon of REV too.
* batch endpoint: rows/s inserted by one client with ``executemany`` (1,000 rows per request,
  one request = one atomic batch, durable). Goal >= 50,000.

Prints one table and writes bench/out/sql.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ENV, OUT, PY, ROOT, Daemon, free_port, log, wait_for, write_config

BEFORE = "a466284"      # the tree this work started from (issue 16's lean request path not yet there)
BATCH_ROWS = 1000

# the framework ceiling: an ASGI app answering a constant, on the daemon's own socket and uvicorn setup
BARE_APP = r"""
import json, sys, types
from bastion.daemon.server import _bind, _uvicorn
ANSWER = json.dumps({"database": "gc", "results": [{"columns": ["v"], "decltypes": ["TEXT"],
                     "rows": [["value-1"]], "rowcount": -1, "lastrowid": None}]}).encode()
HEALTH = json.dumps({"role": "active", "writable": True}).encode()   # the driver asks before its first query

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = HEALTH if scope["path"] == "/v1/health" else ANSWER
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})

port = int(sys.argv[1])
cfg = types.SimpleNamespace(listen_host="127.0.0.1", listen_port=port, listen=f"127.0.0.1:{port}",
                            tls_cert=None, tls_key=None)
sock = _bind(cfg)
_uvicorn(cfg, app).run(sockets=[sock])
"""


def worker(src: str, dsn: str, token: str, kind: str, threads: int, seconds: float, start_at: float,
           q: mp.Queue) -> None:
    # a spawned process: import the driver of the tree under test (this one, or --before's)
    sys.path.insert(0, src)
    for m in [m for m in sys.modules if m == "bastion" or m.startswith("bastion.")]:
        del sys.modules[m]
    import threading
    import bastion.client as bc
    counts = []

    def run(i: int) -> None:
        # autocommit: one transaction per request, the write lock held only while the server runs it
        con = bc.connect(dsn, token=token, autocommit=True)
        n = 0
        rnd = random.Random(i)
        rows = [(i, float(k)) for k in range(BATCH_ROWS)]
        while time.time() < start_at:
            time.sleep(0.001)
        if time.time() > start_at + 0.5:
            late.append(i)          # this window would not be the one measured: the round is dropped
        end = start_at + seconds
        while time.time() < end:
            if kind == "read":
                con.execute("SELECT v FROM kv WHERE id = ?", (rnd.randint(1, 10000),)).fetchone()
                n += 1
            elif kind == "write":
                con.execute("INSERT INTO log(client, at) VALUES (?, ?)", (i, time.time()))
                n += 1
            else:
                con.cursor().executemany("INSERT INTO log(client, at) VALUES (?, ?)", rows)
                n += len(rows)
        counts.append(n)
        con.close()

    late: list[int] = []
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put(None if late or len(counts) < threads else sum(counts))


def load(dsn: str, token: str, kind: str, clients: int, seconds: float, src: Path = ROOT / "src") -> float:
    ctx = mp.get_context("spawn")
    procs = min(4, clients)
    q = ctx.Queue()
    start_at = time.time() + 6.0            # every client started and connected before the window opens
    ps = [ctx.Process(target=worker, args=(str(src), dsn, token, kind, clients // procs + (i < clients % procs),
                                           seconds, start_at, q)) for i in range(procs)]
    for p in ps:
        p.start()
    got = [q.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join()
    if None in got:             # a client started late or failed (a loaded machine): no figure
        log("  a client missed the window: this round is left out")
        return float("nan")
    return sum(got) / seconds


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def cpu_seconds(d: Daemon) -> float:
    """The daemon process's CPU time so far (user + system), from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()  # type: ignore[union-attr]
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_db(path: Path) -> None:
    import apsw
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT); "
                "CREATE TABLE log(id INTEGER PRIMARY KEY, client INT, at REAL)")
    with con:
        con.executemany("INSERT INTO kv VALUES (?, ?)", ((i, f"value-{i}") for i in range(1, 10001)))
    con.close()


def before_tree(rev: str, work: Path, name: str = "before") -> Path | None:
    """rev's src/ exported into work (its daemon and driver), or None if this checkout lacks rev."""
    out = work / name
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True)
    if archive.returncode != 0:
        log(f"--{name} {rev}: not in this checkout ({archive.stderr.decode().strip()[:200]}); skipped")
        return None
    subprocess.run(["tar", "x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", default=BEFORE, help="git revision to compare reads with ('' to skip)")
    ap.add_argument("--commits-before", default="", metavar="REV",
                    help="also run the commit windows (durable and fast) on a daemon of REV, same run")
    ap.add_argument("--only", default="reads,commits,batch", help="comma list of: reads, commits, batch")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if "reads" not in only:
        a.before = ""
    if a.quick:
        a.seconds, a.rounds = 2.0, 1
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-sql-"))
    for name in ("gc", "fast"):
        make_db(work / f"{name}.db")
    port = free_port()
    daemon = Daemon(write_config(work, port, {"gc": [work / "gc.db"],
                                              "fast": {"files": [work / "fast.db"], "durability": "fast"}}), port)
    bare_port = free_port()
    bare = subprocess.Popen([PY, "-c", BARE_APP, str(bare_port)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    old = old_daemon = None
    if a.before:
        src = before_tree(a.before, work)
        if src is not None:
            (work / "old").mkdir()
            make_db(work / "old" / "gc.db")
            old_port = free_port()
            old_daemon = Daemon(write_config(work / "old", old_port, {"gc": [work / "old" / "gc.db"]}), old_port)
            old_daemon.env = {**os.environ, "PYTHONPATH": str(src)}
            old = (src, old_port)
    cold = None         # --commits-before: (src, daemon)
    if a.commits_before and "commits" in only:
        src = before_tree(a.commits_before, work, "commits-before")
        if src is not None:
            d = work / "cold"
            d.mkdir()
            for name in ("gc", "fast"):
                make_db(d / f"{name}.db")
            cport = free_port()
            cd = Daemon(write_config(d, cport, {"gc": [d / "gc.db"],
                                                "fast": {"files": [d / "fast.db"], "durability": "fast"}}), cport)
            cd.env = {**os.environ, "PYTHONPATH": str(src)}
            cold = (src, cd)
    res: dict = {"clients": a.clients, "seconds_per_window": a.seconds, "before": a.before if old else None,
                 "commits_before": a.commits_before if cold else None}

    def fsyncs(d: Daemon) -> int:
        out = subprocess.run([PY, "-m", "bastion", "--config", str(d.config), "status", "--json"],
                             capture_output=True, text=True, env=d.env)
        return int(json.loads(out.stdout)["sql"]["databases"]["gc"]["fsyncs"])
    try:
        daemon.start(30)
        if old_daemon:
            old_daemon.start(30)
        if cold:
            cold[1].start(30)
        wait_for(lambda: _listening(bare_port), timeout=20)
        token = daemon.token
        reads: dict[str, list[float]] = {"bastion": [], "bare": [], "before": []}
        commits: dict[str, list[float]] = {"gc": [], "fast": [], "gc_before": [], "fast_before": []}
        per_fsync: dict[str, list[float]] = {"gc": [], "gc_before": []}    # durable commits per fsync
        cpu_ms: dict[str, list[float]] = {k: [] for k in commits}     # the daemon's CPU ms per commit
        batch: list[float] = []
        for r in range(a.rounds):
            if "reads" in only:
                log(f"round {r + 1}: point reads, one client: daemon, bare ASGI" + (", before" if old else ""))
                reads["bastion"].append(load(f"bastion://127.0.0.1:{port}/gc", token, "read", 1, a.seconds))
                reads["bare"].append(load(f"bastion://127.0.0.1:{bare_port}/gc", "x", "read", 1, a.seconds))
                if old and old_daemon:
                    reads["before"].append(load(f"bastion://127.0.0.1:{old[1]}/gc", old_daemon.token, "read", 1,
                                                a.seconds, src=old[0]))
            if "commits" in only:
                sides = [("", daemon, ROOT / "src")] + ([("_before", cold[1], cold[0])] if cold else [])
                for suffix, d, src in sides:
                    for name in ("gc", "fast"):
                        log(f"round {r + 1}: commits, {a.clients} clients, {name}{suffix}")
                        f0 = fsyncs(d) if name == "gc" else 0
                        c0 = cpu_seconds(d)
                        rate = load(f"bastion://127.0.0.1:{d.port}/{name}", d.token, "write", a.clients,
                                    a.seconds, src=src)
                        commits[name + suffix].append(rate)
                        cpu_ms[name + suffix].append((cpu_seconds(d) - c0) * 1000 / (rate * a.seconds))
                        if name == "gc":
                            # (the fsyncs of the clients' start and end too: a slight underestimate)
                            n = fsyncs(d) - f0
                            per_fsync[name + suffix].append(rate * a.seconds / n if n else float("nan"))
            if "batch" in only:
                log(f"round {r + 1}: batch inserts, one client, {BATCH_ROWS} rows per request")
                batch.append(load(f"bastion://127.0.0.1:{port}/gc", token, "batch", 1, a.seconds))
        res.update({"reads_per_s": reads, "commits_per_s": commits, "batch_rows_per_s": batch,
                    "commits_per_fsync": per_fsync, "daemon_cpu_ms_per_commit": cpu_ms})
        res["group_commit_fsyncs"] = fsyncs(daemon)
        fd = os.open(work / "fsync.probe", os.O_WRONLY | os.O_CREAT)       # this disk's fsync, for reading
        t0 = time.perf_counter()
        for _ in range(50):
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        res["fsync_ms"] = (time.perf_counter() - t0) / 50 * 1000
        os.close(fd)
    finally:
        daemon.stop(30)
        if old_daemon:
            old_daemon.stop(30)
        if cold:
            cold[1].stop(30)
        os.killpg(bare.pid, 15)
        bare.wait(10)
    def median(v: list[float]) -> float | None:
        v = [x for x in v if x == x]        # rounds left out are NaN
        return statistics.median(v) if v else None
    med = {k: median(v) for k, v in
           {**{f"reads_{k}": v for k, v in reads.items()}, **{f"commits_{k}": v for k, v in commits.items()},
            "batch": batch, **{f"per_fsync_{k}": v for k, v in per_fsync.items()},
            **{f"cpu_ms_{k}": v for k, v in (cpu_ms if "commits" in only else {}).items()}}.items()}
    res["median"] = med
    def paired(a: list[float], b: list[float]) -> float | None:
        # the median of each round's ratio: both sides of a round ran minutes apart at most
        return median([x / y for x, y in zip(a, b) if y == y and y > 0])
    ratios = {"reads_over_bare": paired(reads["bastion"], reads["bare"]),
              "reads_over_before": paired(reads["bastion"], reads["before"]),
              "group_commit_over_fast": paired(commits["gc"], commits["fast"]),
              "group_commit_over_fast_before": paired(commits["gc_before"], commits["fast_before"]),
              "batch_rows_per_s": med["batch"]}
    res["ratios"] = ratios
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sql.json").write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)

    def f2(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def verdict(x: float | None, goal: float) -> str:
        return "n/a" if x is None else ("PASS" if x >= goal else "MISS")
    print()
    print(f"SQL server benchmark ({a.rounds} rounds of {a.seconds:g} s windows, medians; disk fsync "
          f"{res['fsync_ms']:.2f} ms)")
    def n0(x: float | None, width: int) -> str:
        return f"{'n/a':>{width}}" if x is None else f"{x:>{width},.0f}"
    if "reads" in only:
        print(f"  point reads/s, 1 client   daemon {n0(med['reads_bastion'], 9)}   bare ASGI "
              f"{n0(med['reads_bare'], 9)}   ratio {f2(ratios['reads_over_bare'])} (goal >= 0.8) "
              f"{verdict(ratios['reads_over_bare'], 0.8)}")
    if med["reads_before"]:
        print(f"                            before ({a.before}) {med['reads_before']:>9,.0f}"
              f"   ratio {f2(ratios['reads_over_before'])} (goal >= 3) {verdict(ratios['reads_over_before'], 3)}")
    if "commits" in only:
        print(f"  commits/s, {a.clients} clients    durable+group commit {n0(med['commits_gc'], 7)}   fast (no fsync) "
              f"{n0(med['commits_fast'], 7)}   ratio {f2(ratios['group_commit_over_fast'])} (goal >= 0.8) "
              f"{verdict(ratios['group_commit_over_fast'], 0.8)}   {f2(med['per_fsync_gc'])} commits per fsync")
        print(f"      daemon CPU ms per commit: durable {f2(med['cpu_ms_gc'])}, fast {f2(med['cpu_ms_fast'])}")
    if med["commits_gc_before"]:
        print(f"      before ({a.commits_before})  durable+group commit {n0(med['commits_gc_before'], 7)}   fast "
              f"(no fsync) {n0(med['commits_fast_before'], 7)}   ratio {f2(ratios['group_commit_over_fast_before'])}"
              f"   {f2(med['per_fsync_gc_before'])} commits per fsync")
        print(f"      daemon CPU ms per commit: durable {f2(med['cpu_ms_gc_before'])}, "
              f"fast {f2(med['cpu_ms_fast_before'])}")
    if "batch" in only:
        print(f"  batch inserts, 1 client   {n0(med['batch'], 9)} rows/s (goal >= 50,000) "
              f"{verdict(med['batch'] and med['batch'] / 50_000, 1)}")
    print(f"  group-commit fsyncs in all: {res['group_commit_fsyncs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
