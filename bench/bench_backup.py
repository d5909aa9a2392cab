"""Backup benchmark: Bastion's backup, restore and incremental backup against cp, sqlite3 .backup and Litestream.

    .venv/bin/python bench/bench_backup.py [--quick] [--size-mb N] [--repeat N] [--no-litestream] [--keep]

Builds a database of random 1-4 KiB blobs with integer keys (WAL mode; 1 GB,
--quick 200 MB) in a temp dir, starts a Bastion daemon of its own (temp config
and data dir) protecting it, and measures in one run, side by side:

1. full backup throughput (logical bytes / wall seconds of `bastion backup NAME --json`)
   divided by that of `cp` of the same file (median of runs before and after; also cp + sync),
   and by that of `sqlite3 SRC ".backup DST"`. Goal >= 0.7 of cp.
2. Litestream (the npm package @flydotio/litestream-linux-x64): time to its first
   complete snapshot in a file replica, and `litestream restore -o` time, next to
   Bastion's backup and restore. Said plainly when the binary cannot be had.
3. incremental backups after an UPDATE of 1% of the rows, clustered (a contiguous key
   range) and random: stored_bytes_added of the incremental / that of the full backup.
   Goal <= 0.03. Also computed for other chunk sizes by replaying Bastion's chunking
   (fixed-size chunks, SHA-256, zstd level 3) over the same file states, with the size of the
   manifest's chunk list (every backup writes a whole manifest, so small chunks cost there).
4. restore throughput (`bastion restore ID --to DIR --json`) / cp. Goal >= 0.7.
And `bastion verify --full` time, for information. --repeat N times N full backups (the extra
ones into fresh repositories) and N restores and uses the medians: the machine is shared, so
single wall times are noisy; the load average at start and end is printed for that reason.

--format2 instead runs the repository-format comparison of issue 15, side by side in one run on
the same files (warm cache), for two databases: rows of random 1-4 KiB blobs and rows of ~100 B:
full backup MB/s / cp, / sqlite3 .backup and / format 1 (each into a fresh repository, --rounds
rounds, medians, format 1 and 2 alternating which goes first); restore / (cp + sync); the
incremental after updating 1% of random rows as a fraction of the full; the backup reader's peak
RSS. Writes bench/out/backup_format2.json.

Prints one table (a missed goal says MISS) and writes bench/out/backup.json. Page cache is warm for every
copy (the file was just written; 1 GB fits in RAM); every write side is either
fsynced by the tool itself (Bastion, sqlite3 .backup) or shown with and without a
following `sync` (cp, litestream restore).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, whatever the cwd
from _common import OUT, PY, ROOT, Daemon, free_port, litestream_binary, log, run, write_config

SQLITE3 = shutil.which("sqlite3") or "/usr/bin/sqlite3"
MB = 1_000_000
DB_NAME = "bench"
sys.path.insert(0, str(ROOT / "src"))   # this checkout's Bastion, as ENV gives the subprocesses
from bastion.backup.snapshot import DEFAULT_CHUNK as BASTION_CHUNK  # noqa: E402

CHUNK_SIZES = sorted({4096, 8192, 16384, 65536, 262144, 1048576, BASTION_CHUNK})   # replayed for incrementals


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
    sync()   # untimed: no dirty pages of one measurement leak into the next


# -- the database -----------------------------------------------------------------------------

def build_db(path: Path, target: int, smallest: int = 1024, spread: int = 3073,
             batch: int = 5_000) -> dict[str, Any]:
    """Rows of random blobs of smallest..smallest+spread-1 bytes (default 1-4 KiB) with integer keys,
    built without a journal, then WAL mode."""
    t = time.perf_counter()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA page_size=4096")
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    n = 0
    while path.stat().st_size < target:
        con.execute("BEGIN")
        con.execute("WITH RECURSIVE c(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
                    "INSERT INTO items SELECT i, randomblob(? + abs(random()) % ?) FROM c",
                    (n + 1, n + batch, smallest, spread))
        con.execute("COMMIT")
        n += batch
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    sync()
    return {"rows": n, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t, 2)}


def update_rows(path: Path, ids: list[int]) -> float:
    """New random bytes of the same length in each row (an in-place rewrite of the row), one transaction."""
    t = time.perf_counter()
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    con.execute("BEGIN IMMEDIATE")
    con.executemany("UPDATE items SET payload = randomblob(length(payload)) WHERE id = ?", [(i,) for i in ids])
    con.execute("COMMIT")
    con.close()
    return time.perf_counter() - t


# -- the daemon -------------------------------------------------------------------------------

class BackupDaemon(Daemon):
    def __init__(self, work: Path, db: Path) -> None:
        port = free_port()
        super().__init__(write_config(work, port, {DB_NAME: [db]}, extra='[contops]\ngate_timeout = "30s"\n'), port)

    def timed(self, *args: str, timeout: float = 1800) -> tuple[float, dict[str, Any]]:
        """(wall seconds, --json output) of a CLI command."""
        secs, p = run([PY, "-m", "bastion", "--config", str(self.config), *args], timeout=timeout)
        return secs, json.loads(p.stdout)


# -- reference copies -------------------------------------------------------------------------

def time_cp(src: Path, dst: Path) -> dict[str, float]:
    secs, _ = run(["cp", str(src), str(dst)], env=None)
    s = sync()
    out = {"cp_s": secs, "sync_s": s, "cp_sync_s": secs + s}
    rm(dst)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def time_sqlite_backup(src: Path, dst: Path) -> dict[str, float]:
    secs, _ = run([SQLITE3, str(src), f".backup '{dst}'"], env=None)
    s = sync()
    out = {"seconds": secs, "sync_after_s": s}
    rm(dst)
    return out


# -- chunking replay (Bastion's own scheme: fixed-size chunks, SHA-256 names, zstd level 3) ----

class ChunkReplay:
    """Per chunk size, the set of chunk digests stored so far, as Bastion's repository would hold them."""

    def __init__(self, sizes: list[int]) -> None:
        import zstandard
        self.sizes = sizes
        self.known: dict[int, set[bytes]] = {c: set() for c in sizes}
        self.cctx = zstandard.ZstdCompressor(level=3)

    def backup(self, path: Path) -> dict[int, dict[str, int]]:
        """Chunk the file at every size; returns per size {stored, chunks_new, chunks_total, manifest}."""
        res = {c: {"stored": 0, "chunks_new": 0, "chunks_total": 0} for c in self.sizes}
        lists: dict[int, list[list[Any]]] = {c: [] for c in self.sizes}
        block = max(self.sizes)
        with open(path, "rb") as fh:
            while True:
                data = fh.read(block)
                if not data:
                    break
                view = memoryview(data)
                for c in self.sizes:
                    r = res[c]
                    known = self.known[c]
                    for off in range(0, len(data), c):
                        piece = view[off:off + c]
                        d = hashlib.sha256(piece).digest()
                        lists[c].append([d.hex(), len(piece)])
                        r["chunks_total"] += 1
                        if d not in known:
                            known.add(d)
                            r["chunks_new"] += 1
                            r["stored"] += len(self.cctx.compress(piece))
        for c in self.sizes:   # every backup writes a whole new manifest: its chunk list grows as chunks shrink
            res[c]["manifest"] = len(json.dumps({"chunks": lists[c]}, indent=1).encode())
            res[c]["manifest_binary"] = 36 * len(lists[c])   # what a binary list would take: digest + size
        return res


# -- repository format 2 against format 1 (--format2) ---------------------------------------

def build_small_rows(path: Path, target: int) -> dict[str, Any]:
    """Rows of 80-120 random bytes (a typical OLTP row), same schema as build_db, then WAL mode."""
    return build_db(path, target, smallest=80, spread=41, batch=100_000)


def _manifest(url: str, bid: str) -> dict[str, Any]:
    return json.loads(Path(url[len("file://"):], "manifests", f"{bid}.json").read_text())


def _fresh_repo(url: str, fmt: int) -> None:
    from bastion.backup.repository import Repository
    Repository.open(url, create=True, format=fmt)


def format2_run(work: Path, size_mb: int, rounds: int) -> dict[str, Any]:
    """Format 1 and format 2 side by side on the same files; see the module docstring."""
    builds = {"1-4 KiB rows": build_db, "~100 B rows": build_small_rows}
    dbs: dict[str, Path] = {}
    out: dict[str, Any] = {}
    for i, (kind, build) in enumerate(builds.items()):
        dbs[kind] = work / f"db{i}" / "bench.db"
        dbs[kind].parent.mkdir()
        log(f"building a {size_mb} MB database of {kind}")
        out[kind] = {"db": build(dbs[kind], size_mb * MB)}
    port = free_port()
    names = {kind: f"db{i}" for i, kind in enumerate(dbs)}
    cfg = write_config(work, port, {names[k]: [p] for k, p in dbs.items()}, extra='[contops]\ngate_timeout = "30s"\n')
    daemon = Daemon(cfg, port).start()
    scratch = work / "scratch"
    scratch.mkdir()
    try:
        for kind, db in dbs.items():
            name, size = names[kind], db.stat().st_size
            r: dict[str, Any] = {"bytes": size, "cp": [], "sqlite3": [], "full": {1: [], 2: []},
                                 "restore": {1: [], 2: []}, "stored": {}, "rss_kb": {}}
            kept: dict[int, str] = {}
            for rnd in range(rounds):
                r["cp"].append(time_cp(db, scratch / "cp.db"))
                if shutil.which("sqlite3"):
                    r["sqlite3"].append(time_sqlite_backup(db, scratch / "sq.db")["seconds"])
                for fmt in ((1, 2) if rnd % 2 == 0 else (2, 1)):
                    url = f"file://{work / f'repo-{name}-f{fmt}-{rnd}'}"
                    _fresh_repo(url, fmt)
                    log(f"{kind}, round {rnd + 1}: format {fmt} full backup")
                    secs, p = run([PY, "-m", "bastion", "--config", str(cfg), "backup", name, "--to", url, "--json"])
                    b = json.loads(p.stdout)
                    assert b["verified"], b
                    r["full"][fmt].append(secs)
                    r["stored"][fmt] = b["stored_bytes_added"]
                    r["rss_kb"][fmt] = _manifest(url, b["backup"]).get("reader_peak_rss_kb")
                    dest = scratch / "restored"
                    secs, _ = run([PY, "-m", "bastion", "restore", b["backup"], "--from", url, "--to", str(dest),
                                   "--json"])
                    secs += sync()
                    r["restore"][fmt].append(secs)
                    assert file_sha256(dest / "bench.db") == file_sha256(db)     # untimed
                    rm(dest)
                    if rnd == rounds - 1:
                        kept[fmt] = url
                    else:
                        rm(Path(url[len("file://"):]))
            n1 = max(1, out[kind]["db"]["rows"] // 100)
            log(f"{kind}: update {n1} random rows, incremental backups")
            update_rows(db, random.Random(7).sample(range(1, out[kind]["db"]["rows"] + 1), n1))
            r["incremental"] = {}
            for fmt, url in kept.items():
                secs, p = run([PY, "-m", "bastion", "--config", str(cfg), "backup", name, "--to", url, "--json"])
                b = json.loads(p.stdout)
                r["incremental"][fmt] = {"stored_bytes_added": b["stored_bytes_added"], "wall_s": secs,
                                         "ratio": b["stored_bytes_added"] / r["stored"][fmt]}
                rm(Path(url[len("file://"):]))
            out[kind]["runs"] = r
    finally:
        daemon.stop()
    return out


def format2_report(res: dict[str, Any]) -> None:
    med = statistics.median
    print(f"Repository format 2 vs format 1, {res['size_mb']} MB databases, {res['rounds']} round(s), warm page "
          f"cache, {res['cpus']} CPUs, load average {res['loadavg_start'][0]:.1f} at start, "
          f"{res['loadavg_end'][0]:.1f} at end")
    head = ("measure", *res["kinds"])
    rows: list[tuple[str, ...]] = []

    def row(label: str, f: Any) -> None:
        rows.append((label, *(f(res["results"][k]["runs"]) for k in res["kinds"])))
    mbps = lambda r, s: r["bytes"] / MB / s   # noqa: E731
    cp = lambda r: med(c["cp_s"] for c in r["cp"])   # noqa: E731
    cps = lambda r: med(c["cp_sync_s"] for c in r["cp"])   # noqa: E731
    row("format 2 full backup MB/s", lambda r: f"{mbps(r, med(r['full'][2])):.0f}")
    row("format 1 full backup MB/s", lambda r: f"{mbps(r, med(r['full'][1])):.0f}")
    row("cp MB/s", lambda r: f"{mbps(r, cp(r)):.0f}")
    row("format 2 full / cp", lambda r: f"{cp(r) / med(r['full'][2]):.3f}")
    row("format 2 full / (cp + sync)", lambda r: f"{cps(r) / med(r['full'][2]):.3f}")
    row("format 2 full / sqlite3 .backup",
        lambda r: f"{med(r['sqlite3']) / med(r['full'][2]):.3f}" if r["sqlite3"] else "no sqlite3")
    row("format 2 full / format 1 full", lambda r: f"{med(r['full'][1]) / med(r['full'][2]):.2f}")
    row("format 2 stored / format 1 stored (full)", lambda r: f"{r['stored'][2] / r['stored'][1]:.3f}")
    row("incremental 1% random rows / full, format 2", lambda r: f"{r['incremental'][2]['ratio']:.4f}")
    row("incremental 1% random rows / full, format 1", lambda r: f"{r['incremental'][1]['ratio']:.4f}")
    row("format 2 restore / (cp + sync)", lambda r: f"{cps(r) / med(r['restore'][2]):.3f}")
    row("format 1 restore / (cp + sync)", lambda r: f"{cps(r) / med(r['restore'][1]):.3f}")
    row("backup reader peak RSS MB, format 2", lambda r: f"{(r['rss_kb'][2] or 0) / 1024:.0f}")
    row("backup reader peak RSS MB, format 1", lambda r: f"{(r['rss_kb'][1] or 0) / 1024:.0f}")
    w = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    line = lambda x: "  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip()   # noqa: E731
    print(line(head))
    print(line(tuple("-" * x for x in w)))
    for x in rows:
        print(line(x))
    print("(full backup and restore: wall time of the CLI command, medians; restore includes its fsync, "
          "integrity_check and, for format 1, the content digests; + a `sync` after it)")


def format2_main(args: argparse.Namespace) -> int:
    size_mb = args.size_mb or (100 if args.quick else 500)
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-format2-"))
    res: dict[str, Any] = {"size_mb": size_mb, "rounds": args.rounds, "cpus": os.cpu_count(),
                           "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        res["results"] = format2_run(work, size_mb, args.rounds)
        res["kinds"] = list(res["results"])
    finally:
        res["loadavg_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backup_format2.json").write_text(json.dumps(res, indent=1, default=str))
    format2_report(res)
    return 0


# -- Litestream -------------------------------------------------------------------------------

def run_litestream(binary: str, db: Path, work: Path) -> dict[str, Any]:
    replica = work / "ls-replica"
    url = f"file://{replica}"
    out: dict[str, Any] = {"version": run([binary, "version"], env=None)[1].stdout.strip()}
    lslog = work / "litestream.log"
    t0 = time.perf_counter()
    with open(lslog, "w") as fh:
        proc = subprocess.Popen([binary, "replicate", str(db), url], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        snap = None
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"litestream replicate exited {proc.returncode}: {lslog.read_text()[-1500:]}")
            # `litestream snapshots` lists only renamed (complete) snapshot files
            _, p = run([binary, "snapshots", url], check=False, env=None)
            rows = [ln for ln in p.stdout.splitlines()[1:] if ln.strip()]
            if rows:
                snap = rows[0]
                break
            time.sleep(0.1)
        out["first_snapshot_s"] = time.perf_counter() - t0
        out["snapshot_row"] = snap
        files = [f for f in replica.rglob("*") if f.is_file()]
        out["replica_bytes"] = sum(f.stat().st_size for f in files)
        out["snapshot_bytes"] = sum(f.stat().st_size for f in files if ".snapshot" in f.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    sync()
    dst = work / "ls-restored.db"
    secs, _ = run([binary, "restore", "-o", str(dst), url], env=None)
    s = sync()
    out.update(restore_s=secs, restore_sync_s=secs + s, restored_bytes=dst.stat().st_size)
    rm(dst)
    rm(replica)
    return out


# -- the run ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 200 MB database instead of 1 GB")
    ap.add_argument("--size-mb", type=int, default=None, help="database size in MB (overrides --quick)")
    ap.add_argument("--no-litestream", action="store_true", help="skip the Litestream comparison")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="full backups and restores to time (extra ones into fresh repositories); medians are used")
    ap.add_argument("--format2", action="store_true",
                    help="compare repository formats 1 and 2 instead (1-4 KiB and ~100 B rows; 500 MB each)")
    ap.add_argument("--rounds", type=int, default=3, help="--format2: full backups and restores per format")
    args = ap.parse_args()
    if args.format2:
        return format2_main(args)
    size_mb = args.size_mb or (200 if args.quick else 1000)
    mode = "quick" if args.quick and not args.size_mb else ("full" if not args.size_mb else f"custom {size_mb} MB")
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-backup-"))
    res: dict[str, Any] = {"mode": mode, "size_mb_target": size_mb, "cpus": os.cpu_count(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": PY,
                           "loadavg_start": os.getloadavg()}
    daemon: Daemon | None = None
    t_all = time.perf_counter()
    try:
        db_dir = work / "db"
        db_dir.mkdir()
        db = db_dir / "bench.db"
        log(f"building a {size_mb} MB database in {db}")
        res["db"] = build_db(db, size_mb * MB)
        size = db.stat().st_size
        log(f"built {res['db']}")
        daemon = BackupDaemon(work, db).start()
        scratch = work / "scratch"
        scratch.mkdir()

        # 1. full backup vs cp (before and after) and sqlite3 .backup
        log("cp (before)")
        cp = [time_cp(db, scratch / "cp.db")]
        log("sqlite3 .backup")
        sq = time_sqlite_backup(db, scratch / "sq.db")
        log("bastion backup (full)")
        wall, full = daemon.timed("backup", DB_NAME, "--json")
        full_sync = sync()
        assert full["verified"] and full["logical_bytes"] == size, full
        log(f"full backup {full['backup']}: {wall:.1f} s wall, {full['seconds']} s reading")
        log("cp (after)")
        cp.append(time_cp(db, scratch / "cp.db"))

        # where the backup's wall time goes: the child's read phase (hash, compress, store, digests),
        # the content digests alone, the quick verify of the new chunks alone
        from bastion.backup.digest import file_digests
        t = time.perf_counter()
        file_digests(str(db), immutable=True)
        digests_s = time.perf_counter() - t
        vq_wall, vq = daemon.timed("verify", full["backup"], "--json")

        # chunking replay of the full backup's file state
        log("replaying the chunking of the full backup at other chunk sizes")
        replay = ChunkReplay(CHUNK_SIZES)
        t = time.perf_counter()
        rp_full = replay.backup(db)
        replay_s = time.perf_counter() - t

        # 4. restore vs cp; verify --full
        log("bastion restore")
        dest = scratch / "restored"
        r_wall, rest = daemon.timed("restore", full["backup"], "--to", str(dest), "--json")
        r_sync = sync()
        restored = dest / "bench.db"
        same = file_sha256(restored) == file_sha256(db)   # untimed: the restore is the file, byte for byte
        rm(dest)
        log("cp (after restore)")
        cp.append(time_cp(db, scratch / "cp.db"))
        full_walls, restore_walls = [wall], [r_wall]
        for i in range(1, args.repeat):   # again, into a fresh repository each time: a full backup again
            url = f"file://{work / f'repeat-{i}'}"
            log(f"repeat {i}: bastion backup (full) into {url}, restore from it, cp")
            w, again = daemon.timed("backup", DB_NAME, "--to", url, "--json")
            sync()
            assert again["verified"] and again["stored_bytes_added"] == full["stored_bytes_added"], again
            full_walls.append(w)
            w, _ = daemon.timed("restore", again["backup"], "--from", url, "--to", str(dest), "--json")
            restore_walls.append(w)
            rm(dest)
            rm(work / f"repeat-{i}")
            cp.append(time_cp(db, scratch / "cp.db"))
        log("bastion verify --full")
        vf_wall, vf = daemon.timed("verify", full["backup"], "--full", "--json")
        assert vf["ok"], vf

        # 3. incremental: 1% of rows, clustered then random
        rows = res["db"]["rows"]
        n1 = max(1, rows // 100)
        manifests = daemon.data_dir / "backups" / "manifests"
        full_manifest = (manifests / f"{full['backup']}.json").stat().st_size
        rng = random.Random(42)
        start = rng.randint(1, rows - n1)
        incr: dict[str, Any] = {}
        for kind, ids in (("clustered", list(range(start, start + n1))),
                          ("random", rng.sample(range(1, rows + 1), n1))):
            log(f"update {n1} rows ({kind}), incremental backup")
            upd_s = update_rows(db, ids)
            w, b = daemon.timed("backup", DB_NAME, "--json")
            assert b["verified"], b
            rp = replay.backup(db)   # the file as backed up: checkpointed at startbu, nothing written since
            incr[kind] = {"rows_updated": n1, "update_s": round(upd_s, 3), "wall_s": round(w, 3),
                          "read_s": b["seconds"], "stored_bytes_added": b["stored_bytes_added"],
                          "chunks_new": b["chunks_new"], "chunks_total": b["chunks_total"],
                          "ratio": b["stored_bytes_added"] / full["stored_bytes_added"],
                          "logical_bytes": b["logical_bytes"],
                          "manifest_bytes": (manifests / f"{b['backup']}.json").stat().st_size,
                          "replay": {str(c): {**rp[c], "ratio": rp[c]["stored"] / rp_full[c]["stored"],
                                              "ratio_with_manifest": (rp[c]["stored"] + rp[c]["manifest"])
                                              / (rp_full[c]["stored"] + rp_full[c]["manifest"]),
                                              "ratio_with_binary_manifest":
                                              (rp[c]["stored"] + rp[c]["manifest_binary"])
                                              / (rp_full[c]["stored"] + rp_full[c]["manifest_binary"])}
                                     for c in CHUNK_SIZES}}
        last_backup = b["backup"]
        daemon.stop()
        daemon = None

        # 2. Litestream on the same database (the daemon stopped: Litestream runs its own checkpoints)
        ls: dict[str, Any]
        if args.no_litestream:
            ls = {"status": "skipped (--no-litestream)"}
        else:
            log("Litestream: fetching the binary")
            binary, tried = litestream_binary(work)
            if binary is None:
                ls = {"status": "blocked: could not obtain or run the binary", "tried": tried}
            else:
                log("Litestream: replicate to a file replica, restore")
                try:
                    ls = {"status": "ok", "binary": binary, **run_litestream(binary, db, work)}
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    ls = {"status": f"failed: {exc}", "tried": tried}

        cp_s = statistics.median(c["cp_s"] for c in cp)
        cps_s = statistics.median(c["cp_sync_s"] for c in cp)
        res.update({
            "db_bytes": size,
            "cp": cp, "cp_median_s": cp_s, "cp_sync_median_s": cps_s,
            "sqlite3_backup": sq,
            "full_backup": {"wall_s": statistics.median(full_walls), "walls_s": full_walls,
                            "sync_after_s": full_sync, "result": full, "manifest_bytes": full_manifest,
                            "breakdown": {"first_wall_s": wall, "child_read_s": full["seconds"],
                                          "content_digests_s": digests_s,
                                          "quick_verify_cli_wall_s": vq_wall,
                                          "rest_s": wall - full["seconds"]}},
            "restore": {"wall_s": statistics.median(restore_walls), "walls_s": restore_walls,
                        "sync_after_s": r_sync, "result": rest, "identical": same},
            "verify_full": {"wall_s": vf_wall, "ok": vf["ok"]},
            "verify_quick": {"wall_s": vq_wall, "ok": vq["ok"]},
            "incremental": incr,
            "replay": {"seconds": replay_s,
                       "full": {str(c): rp_full[c] for c in CHUNK_SIZES},
                       "bastion_chunk": BASTION_CHUNK,
                       "check_stored_equals_bastion": rp_full[BASTION_CHUNK]["stored"] == full["stored_bytes_added"]},
            "litestream": ls,
            "last_backup": last_backup,
        })
    finally:
        if daemon:
            daemon.stop()
        res["total_s"] = round(time.perf_counter() - t_all, 1)
        res["loadavg_end"] = os.getloadavg()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backup.json").write_text(json.dumps(res, indent=1, default=str))
    report(res)
    return 0


def report(res: dict[str, Any]) -> None:
    size = res["db_bytes"]
    mbps = lambda s: size / MB / s   # noqa: E731
    fb = res["full_backup"]
    bk = mbps(fb["wall_s"])
    cp, cps = mbps(res["cp_median_s"]), mbps(res["cp_sync_median_s"])
    sq = mbps(res["sqlite3_backup"]["seconds"])
    rs = mbps(res["restore"]["wall_s"])
    ok = lambda good: "met" if good else "MISS"   # noqa: E731
    rows: list[tuple[str, str, str, str, str]] = []
    rows.append(("full backup / cp", f"{bk:.0f} MB/s", f"{cp:.0f} MB/s", f"{bk / cp:.3f}",
                 f">=0.7 {ok(bk / cp >= 0.7)}"))
    rows.append(("full backup / (cp + sync)", f"{bk:.0f} MB/s", f"{cps:.0f} MB/s", f"{bk / cps:.3f}", "info"))
    rows.append(("full backup / sqlite3 .backup", f"{bk:.0f} MB/s", f"{sq:.0f} MB/s", f"{bk / sq:.3f}", "info"))
    rows.append(("restore / cp", f"{rs:.0f} MB/s", f"{cp:.0f} MB/s", f"{rs / cp:.3f}", f">=0.7 {ok(rs / cp >= 0.7)}"))
    rows.append(("restore / (cp + sync)", f"{rs:.0f} MB/s", f"{cps:.0f} MB/s", f"{rs / cps:.3f}", "info"))
    for kind, inc in res["incremental"].items():
        rows.append((f"incremental, 1% rows {kind} (stored bytes)", f"{inc['stored_bytes_added'] / MB:.1f} MB",
                     f"{fb['result']['stored_bytes_added'] / MB:.1f} MB", f"{inc['ratio']:.4f}",
                     f"<=0.03 {ok(inc['ratio'] <= 0.03)}"))
    for kind, inc in res["incremental"].items():
        a = inc["stored_bytes_added"] + inc["manifest_bytes"]
        b = fb["result"]["stored_bytes_added"] + fb["manifest_bytes"]
        rows.append((f"  {kind}, manifest included", f"{a / MB:.1f} MB", f"{b / MB:.1f} MB", f"{a / b:.4f}", "info"))
    ls = res["litestream"]
    if ls.get("status") == "ok":
        rows.append(("full backup time / Litestream first snapshot", f"{fb['wall_s']:.1f} s",
                     f"{ls['first_snapshot_s']:.1f} s", f"{fb['wall_s'] / ls['first_snapshot_s']:.3f}",
                     "info (<1: Bastion faster)"))
        rows.append(("restore time / litestream restore", f"{res['restore']['wall_s']:.1f} s",
                     f"{ls['restore_s']:.1f} s", f"{res['restore']['wall_s'] / ls['restore_s']:.3f}",
                     "info (<1: Bastion faster)"))
        rows.append(("restore time / (litestream restore + sync)", f"{res['restore']['wall_s']:.1f} s",
                     f"{ls['restore_sync_s']:.1f} s", f"{res['restore']['wall_s'] / ls['restore_sync_s']:.3f}", "info"))
    else:
        rows.append(("Litestream", ls.get("status", "?"), "", "", "not measured"))
    rows.append(("verify --full (wall)", f"{res['verify_full']['wall_s']:.1f} s", "", "", "info"))

    head = ("measure", "Bastion", "reference", "ratio", "goal")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()   # noqa: E731
    note = " (QUICK: 200 MB database, not the 1 GB of a full run)" if res["mode"] == "quick" else ""
    la0, la1 = res["loadavg_start"][0], res["loadavg_end"][0]
    print(f"Bastion backup benchmark, {res['mode']} run{note}: {size / MB:.0f} MB database, "
          f"{res['db']['rows']} rows of random 1-4 KiB blobs, WAL, warm page cache, {res['cpus']} CPUs, "
          f"load average {la0:.1f} at start, {la1:.1f} at end")
    if max(la0, la1) > (res["cpus"] or 1):
        print(f"NOTE: the machine was busy with other work (load > {res['cpus']} CPUs): "
              "wall times and ratios are noisy")
    print(line(head))
    print(line(tuple("-" * x for x in w)))
    for r in rows:
        print(line(r))
    cpl = ", ".join(f"{c['cp_s']:.2f}/{c['cp_sync_s']:.2f}" for c in res["cp"])
    print(f"\ncp runs (cp s / cp+sync s; medians used): {cpl}; "
          f"sqlite3 .backup {res['sqlite3_backup']['seconds']:.2f} s")
    print("full backup runs (wall s): " + ", ".join(f"{x:.2f}" for x in fb["walls_s"])
          + "; restore runs (wall s): " + ", ".join(f"{x:.2f}" for x in res["restore"]["walls_s"])
          + f"; restored file identical to the source: {res['restore']['identical']}")
    bd = fb["breakdown"]
    print(f"first full backup {bd['first_wall_s']:.2f} s wall = child read/hash/compress/store/digest "
          f"{bd['child_read_s']:.2f} s "
          f"(content digests alone, overlapped inside it: {bd['content_digests_s']:.2f} s) + contops, "
          f"quick verify of new chunks, CLI/HTTP {bd['rest_s']:.2f} s "
          f"(a separate `bastion verify` of it: {bd['quick_verify_cli_wall_s']:.2f} s); "
          f"{fb['result']['chunks_total']} chunks, {fb['result']['stored_bytes_added'] / MB:.0f} MB stored")
    print(f"restore {res['restore']['wall_s']:.2f} s wall, median (includes fsync, integrity_check, content digests); "
          f"verify --full {res['verify_full']['wall_s']:.2f} s; quick verify {res['verify_quick']['wall_s']:.2f} s")
    if ls.get("status") == "ok":
        print(f"Litestream {ls['version']}: first snapshot complete {ls['first_snapshot_s']:.2f} s after start "
              f"(snapshot {ls['snapshot_bytes'] / MB:.0f} MB lz4), restore {ls['restore_s']:.2f} s "
              f"(+sync {ls['restore_sync_s']:.2f} s)")
    elif ls.get("tried"):
        print("Litestream tried: " + "; ".join(ls["tried"]))
    print("\nincremental stored bytes / full stored bytes, by chunk size (replay of Bastion's chunking on the "
          f"same file states; {BASTION_CHUNK // 1024} KiB is Bastion's DEFAULT_CHUNK; 'manifest MB' is the chunk list "
          "of one backup's manifest as Bastion writes it, JSON; '+manif.' counts it in both backups' bytes, "
          "'+bin.manif.' counts a binary list of 36 bytes a chunk instead)")
    kinds = list(res["incremental"])
    print("  chunk      chunks/GB  full stored MB  manifest MB  " + "  ".join(f"{k:>10}" for k in kinds)
          + "  " + "  ".join(f"{k + '+manif.':>17}" for k in kinds)
          + "  " + "  ".join(f"{k + '+bin.manif.':>21}" for k in kinds))
    for c in CHUNK_SIZES:
        f = res["replay"]["full"][str(c)]
        per_gb = f["chunks_total"] / (size / 1e9)
        vals = "  ".join(f"{res['incremental'][k]['replay'][str(c)]['ratio']:>10.4f}" for k in kinds)
        withm = "  ".join(f"{res['incremental'][k]['replay'][str(c)]['ratio_with_manifest']:>17.4f}" for k in kinds)
        withb = "  ".join(f"{res['incremental'][k]['replay'][str(c)]['ratio_with_binary_manifest']:>21.4f}"
                          for k in kinds)
        print(f"  {c // 1024:>5} KiB  {per_gb:>9.0f}  {f['stored'] / MB:>14.1f}  {f['manifest'] / MB:>11.1f}  "
              f"{vals}  {withm}  {withb}")
    print(f"  (replay at {BASTION_CHUNK // 1024} KiB stores exactly what Bastion stored: "
          f"{res['replay']['check_stored_equals_bastion']})")
    print(f"\nwrote {OUT / 'backup.json'}; total {res['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
