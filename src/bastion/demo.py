"""`make demo`: the main job on the embedded default, start to finish.

Starts a daemon with no config file (data under ./var), a bank application in
another process that keeps writing two database files, takes a copy with
plain `tar` under continuous operations and another with `cp` under a freeze,
and checks what each copy proves. Stops everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from . import workload

PY = sys.executable
ROOT = Path("var") / "demo"
APP = ROOT / "app"
proved: list[tuple[bool, str]] = []


def say(text: str) -> None:
    print(text, flush=True)


def bastion(*args: str, check: bool = True) -> dict[str, Any]:
    say(f"$ bastion {' '.join(args)}")
    cut = args.index("--") if "--" in args else len(args)
    argv = [*args[:cut], "--json", *args[cut:]]
    p = subprocess.run([PY, "-m", "bastion", *argv], capture_output=True, text=True)
    if p.returncode != 0 and check:
        say(p.stderr)
        raise SystemExit(f"demo: `bastion {args[0]}` failed with exit code {p.returncode}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def claim(ok: bool, text: str) -> None:
    proved.append((ok, text))
    say(f"  {'OK  ' if ok else 'FAIL'} {text}")


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_daemon(proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo: the daemon exited at start (is another program using port 8750?)")
        p = subprocess.run([PY, "-m", "bastion", "status", "--json"], capture_output=True, text=True)
        if p.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("demo: the daemon did not start")


def stalls_between(stats: dict[str, Any], t0: float, t1: float) -> float:
    """The application's worst commit latency among commits that started in [t0, t1]."""
    worst = 0.0
    for start, secs in stats["slow"]:
        if t0 - 1 <= start <= t1:
            worst = max(worst, secs)
    return worst


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    say("== Bastion demo: protect a running application's SQLite databases ==")
    workload.init(str(APP), accounts=2000, pad=200)
    bank, audit = (APP / "bank.db").resolve(), (APP / "audit.db").resolve()
    files = [str(bank), str(audit)]
    say(f"created {bank} and {audit}: 2,000 accounts of {workload.BALANCE} each")

    daemon = subprocess.Popen([PY, "-m", "bastion", "serve"], start_new_session=True)
    app = None
    try:
        wait_for_daemon(daemon)
        bastion("protect", *files)
        stats_file = ROOT / "app-stats.json"
        app = subprocess.Popen([PY, "-m", "bastion.workload", "run", str(APP), "--stats", str(stats_file)])
        say("started the bank application (a separate process using Python's sqlite3): each transfer "
            "updates two accounts in bank.db and adds an audit row in audit.db, in one transaction")
        time.sleep(2)

        say("\n-- continuous operations: copy with plain tar while the application writes --")
        start = bastion("startbu", *files)
        before = [sha256(Path(f)) for f in files]
        n_start = _transfers(bank)
        tar_path = ROOT / "contops-copy.tar"
        say(f"$ tar -cf {tar_path} -C {APP} bank.db audit.db")
        subprocess.run(["tar", "-cf", str(tar_path), "-C", str(APP), "bank.db", "audit.db"], check=True)
        time.sleep(2)
        after = [sha256(Path(f)) for f in files]
        n_end = _transfers(bank)
        end = bastion("endbu", *files)
        claim(before == after, "main files unchanged byte for byte during continuous operations "
                               f"(sha256 before and after; the application committed {n_end - n_start} "
                               "transfers meanwhile)")
        restore = ROOT / "contops-restore"
        with tarfile.open(tar_path) as tf:
            tf.extractall(restore, filter="data")
        res = workload.check((str(restore / "bank.db"), str(restore / "audit.db")))
        claim(res["bank_integrity"] == "ok" and res["audit_integrity"] == "ok",
              "the tar copy passes PRAGMA integrity_check (both files)")
        claim(res["total"] == res["expected_total"],
              f"the copy keeps the invariant: total balance {res['total']:,} == {res['expected_total']:,}")
        claim(res["transfers"] == res["audit_rows"],
              f"both files captured at one instant: {res['transfers']:,} transfers in bank.db, "
              f"{res['audit_rows']:,} audit rows in audit.db")
        claim(end["consistent"] and all(f["roll_in"] == "complete" for f in end["files"]),
              f"endbu rolled the delta in: {end['delta_bytes']:,} bytes in "
              f"{max(f['roll_in_seconds'] for f in end['files']) * 1000:.1f} ms")

        say("\n-- freeze/thaw: a snapshot tool's copy, writers held, readers free --")
        snap = ROOT / "freeze-copy"
        snap.mkdir()
        fr = bastion("freeze", *files, "--", "cp", *files, str(snap))
        hold = fr["hold_seconds"]
        res2 = workload.check((str(snap / "bank.db"), str(snap / "audit.db")))
        complete = all(f["main_file_complete"] for f in fr["freeze"]["files"])
        claim(res2["ok"] and complete, f"the copy taken under freeze is consistent (integrity ok, invariant, "
                                       f"{res2['transfers']:,} transfers == {res2['audit_rows']:,} audit rows)")
        t_frozen = fr["freeze"]["frozen_at_epoch"]
        time.sleep(1)

        app.send_signal(signal.SIGTERM)
        app.wait(30)
        stats = json.loads(stats_file.read_text())
        app = None
        stall = stalls_between(stats, t_frozen, t_frozen + hold + 1)
        claim(stats["errors"] == {}, f"the application never saw an error ({stats['commits']:,} commits, "
                                     f"{stats['commits_per_s']:.0f}/s)")
        claim(stall <= hold + 0.25, f"writers waited through the freeze: held {hold * 1000:.1f} ms, "
                                    f"worst commit {stall * 1000:.1f} ms")
        live = workload.check((str(bank), str(audit)))
        claim(live["ok"] and live["transfers"] == stats["commits"],
              f"the live database is intact with every acknowledged commit ({live['transfers']:,})")
        say("\n-- figures --")
        say(f"  startbu: writers paused {start['writers_paused_ms']:.2f} ms, command latency "
            f"{start['latency_ms']:.1f} ms")
        say(f"  delta rolled in at endbu: {end['delta_bytes']:,} bytes")
        say(f"  freeze hold: {hold * 1000:.1f} ms; application p99 commit latency {stats['p99_latency_ms']:.1f} ms")
    finally:
        if app is not None and app.poll() is None:
            app.kill()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
    failed = [t for ok, t in proved if not ok]
    say(f"\n{len(proved) - len(failed)} of {len(proved)} claims proved; everything started was stopped.")
    if failed:
        raise SystemExit(1)


def _transfers(bank: Path) -> int:
    import sqlite3
    con = sqlite3.connect(bank, timeout=30)
    try:
        return con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
    finally:
        con.close()


if __name__ == "__main__":
    main()
