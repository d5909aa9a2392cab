"""Encryption benchmark: backup and restore into an encrypted repository vs one in clear, side by side.

    .venv/bin/python bench/bench_crypto.py [--size-mb N] [--rounds N] [--keep]

Builds a database of random 1-4 KiB blobs (WAL mode; 200 MB by default) in a temp dir and
starts one Bastion daemon protecting it, with BASTION_REPO_PASSPHRASE in its environment.
Each round, in alternating order, takes a full backup (`bastion backup NAME --to URL --json`)
into a fresh repository in clear and into a fresh encrypted one (`bastion repo init --encrypt`),
then restores each (`bastion restore ID --to DIR --json`). Prints the medians and the
ratios encrypted / clear (goal from issue 15: backup throughput with encryption >= 0.8 of
without), the load average at start and end, and writes bench/out/crypto.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, whatever the cwd
from _common import ENV, OUT, PY, Daemon, free_port, log, run, write_config

PASS = "bench passphrase, not a secret"


def build(db: Path, size_mb: int) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, data BLOB)")
    rng = random.Random(15)
    done = 0
    while done < size_mb * 1024 * 1024:
        rows = [(rng.randbytes(n),) for n in (rng.randint(1024, 4096) for _ in range(2000))]
        con.executemany("INSERT INTO blobs(data) VALUES(?)", rows)
        done += sum(len(r[0]) for r in rows)
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    load0 = os.getloadavg()
    env = {**ENV, "BASTION_REPO_PASSPHRASE": PASS}
    daemon = None
    try:
        db = tmp / "app" / "data.db"
        db.parent.mkdir()
        log(f"building a {a.size_mb} MB database")
        build(db, a.size_mb)
        size = db.stat().st_size
        port = free_port()
        cfg = write_config(tmp, port, {"data": [str(db)]})
        daemon = Daemon(cfg, port)
        daemon.env = env
        daemon.start()
        cli = [PY, "-m", "bastion", "--config", str(cfg)]
        times: dict[str, list[float]] = {"backup clear": [], "backup encrypted": [], "restore clear": [],
                                         "restore encrypted": []}
        for r in range(a.rounds):
            for kind in (("clear", "encrypted") if r % 2 == 0 else ("encrypted", "clear")):
                repo = tmp / f"repo-{kind}-{r}"
                url = f"file://{repo}"
                init = [*cli, "repo", "init", url, "--json"] + (["--encrypt"] if kind == "encrypted" else [])
                # the clear repository is made without the secret in the environment
                run(init, env=env if kind == "encrypted" else ENV)
                secs, p = run([*cli, "backup", "data", "--to", url, "--json"], env=env)
                times[f"backup {kind}"].append(secs)
                bid = json.loads(p.stdout)["backup"]
                out = tmp / f"restored-{kind}-{r}"
                secs, _ = run([*cli, "restore", bid, "--to", str(out), "--from", url, "--json"], env=env)
                times[f"restore {kind}"].append(secs)
                shutil.rmtree(out)
                shutil.rmtree(repo)
                log(f"round {r} {kind}: backup {times[f'backup {kind}'][-1]:.2f} s, "
                    f"restore {times[f'restore {kind}'][-1]:.2f} s")
        med = {k: statistics.median(v) for k, v in times.items()}
        mbs = {k: size / 1e6 / v for k, v in med.items()}
        ratio = {op: mbs[f"{op} encrypted"] / mbs[f"{op} clear"] for op in ("backup", "restore")}
        load1 = os.getloadavg()
        print(f"database {size / 1e6:.0f} MB, {a.rounds} rounds (medians); load average {load0[0]:.2f} at start, "
              f"{load1[0]:.2f} at end")
        print(f"{'operation':<10} {'clear MB/s':>11} {'encrypted MB/s':>15} {'ratio':>7}  goal")
        for op in ("backup", "restore"):
            goal = ">= 0.80 " + ("ok" if ratio[op] >= 0.8 else "MISS") if op == "backup" else "(information)"
            print(f"{op:<10} {mbs[op + ' clear']:>11.1f} {mbs[op + ' encrypted']:>15.1f} {ratio[op]:>7.2f}  {goal}")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "crypto.json").write_text(json.dumps({"size_bytes": size, "rounds": a.rounds, "seconds": times,
                                                     "mb_per_s": mbs, "ratio": ratio, "load": [load0, load1],
                                                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                    indent=1))
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
