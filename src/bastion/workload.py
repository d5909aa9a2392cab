"""A sample application: a bank that moves money between accounts, in its own process.

It uses Python's stdlib ``sqlite3`` (not Bastion, not apsw) like any unmodified
application would. Two files: ``bank.db`` (accounts, and a count of transfers)
and ``audit.db`` (one row per transfer), written in one transaction. Invariants
that any consistent copy keeps: the total balance never changes, and the
transfer count in bank.db equals the number of audit rows.

    python -m bastion.workload init DIR [--accounts N]
    python -m bastion.workload run DIR [--seconds S] [--stats FILE] [--checkpoint-every N] [--synchronous NORMAL]
    python -m bastion.workload check DIR      (exit 0 when consistent)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import sys
import time
from typing import Any

BALANCE = 1000


def paths(d: str) -> tuple[str, str]:
    return os.path.join(d, "bank.db"), os.path.join(d, "audit.db")


def init(d: str, accounts: int, pad: int = 0) -> None:
    os.makedirs(d, exist_ok=True)
    bank, audit = paths(d)
    for p in (bank, audit):
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(p + suffix):
                os.remove(p + suffix)
    con = sqlite3.connect(bank)
    con.executescript("""
        CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL, pad BLOB);
        CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """)
    con.executemany("INSERT INTO accounts VALUES(?, ?, ?, ?)",
                    ((i, f"owner-{i}", BALANCE, os.urandom(pad) if pad else None) for i in range(1, accounts + 1)))
    con.execute("INSERT INTO meta VALUES('transfers', 0)")
    con.execute("INSERT INTO meta VALUES('accounts', ?)", (accounts,))
    con.commit()
    con.close()
    con = sqlite3.connect(audit)
    con.execute("CREATE TABLE audit(seq INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER, at REAL)")
    con.commit()
    con.close()


class Runner:
    def __init__(self, d: str, busy_timeout: float, checkpoint_every: int, rate: float | None,
                 synchronous: str | None = None) -> None:
        bank, audit = paths(d)
        self.con = sqlite3.connect(bank, timeout=busy_timeout, isolation_level=None)
        self.con.execute("ATTACH DATABASE ? AS audit", (audit,))
        if synchronous:   # per schema: without one, the pragma sets main only (audit stayed FULL)
            for schema in ("main", "audit"):
                self.con.execute(f"PRAGMA {schema}.synchronous = {synchronous}")
        self.accounts = self.con.execute("SELECT value FROM meta WHERE key='accounts'").fetchone()[0]
        self.checkpoint_every = checkpoint_every
        self.rate = rate
        self.stop = False
        self.commits = 0
        self.errors: dict[str, int] = {}
        self.lat: list[float] = []
        self.slow: list[tuple[float, float]] = []   # (start time, seconds) of commits over 5 ms

    def transfer(self) -> None:
        src, dst = random.sample(range(1, self.accounts + 1), 2)
        amount = random.randint(1, 50)
        t0 = time.time()
        c = self.con
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
            c.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
            seq = c.execute("UPDATE meta SET value = value + 1 WHERE key='transfers' RETURNING value").fetchone()[0]
            c.execute("INSERT INTO audit.audit VALUES(?, ?, ?, ?, ?)", (seq, src, dst, amount, t0))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        dt = time.time() - t0
        self.commits += 1
        self.lat.append(dt)
        if dt > 0.005:
            self.slow.append((t0, dt))

    def run(self, seconds: float) -> dict[str, Any]:
        t_start = time.time()
        deadline = time.monotonic() + seconds
        interval = 1.0 / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        while not self.stop and time.monotonic() < deadline:
            try:
                self.transfer()
            except sqlite3.OperationalError as exc:
                self.errors[str(exc)] = self.errors.get(str(exc), 0) + 1
                time.sleep(0.001)
                continue
            if self.checkpoint_every and self.commits % self.checkpoint_every == 0:
                try:
                    self.con.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()
                    self.con.execute("PRAGMA audit.wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.OperationalError as exc:
                    self.errors[str(exc)] = self.errors.get(str(exc), 0) + 1
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        elapsed = time.time() - t_start
        lat = sorted(self.lat) or [0.0]
        return {"commits": self.commits, "seconds": elapsed, "commits_per_s": self.commits / elapsed,
                "max_latency_ms": lat[-1] * 1000, "p50_latency_ms": lat[len(lat) // 2] * 1000,
                "p99_latency_ms": lat[int(len(lat) * 0.99)] * 1000, "errors": self.errors,
                "slow": self.slow, "started_at": t_start}


def check(files: tuple[str, str]) -> dict[str, Any]:
    """Integrity and invariants of a bank/audit pair (the live files or a copy)."""
    bank, audit = files
    out: dict[str, Any] = {}
    con = sqlite3.connect(f"file:{bank}?mode=ro", uri=True)
    out["bank_integrity"] = con.execute("PRAGMA integrity_check").fetchone()[0]
    accounts = con.execute("SELECT value FROM meta WHERE key='accounts'").fetchone()[0]
    out["total"] = con.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
    out["expected_total"] = accounts * BALANCE
    out["transfers"] = con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
    con.close()
    con = sqlite3.connect(f"file:{audit}?mode=ro", uri=True)
    out["audit_integrity"] = con.execute("PRAGMA integrity_check").fetchone()[0]
    out["audit_rows"] = con.execute("SELECT count(*) FROM audit").fetchone()[0]
    out["audit_max_seq"] = con.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]
    con.close()
    out["ok"] = (out["bank_integrity"] == "ok" and out["audit_integrity"] == "ok"
                 and out["total"] == out["expected_total"]
                 and out["transfers"] == out["audit_rows"] == out["audit_max_seq"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bastion.workload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("dir")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--pad", type=int, default=0, help="bytes of random padding per account row")
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--rate", type=float, default=None, help="transfers per second (default: as fast as possible)")
    p.add_argument("--busy-timeout", type=float, default=30.0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="run wal_checkpoint(TRUNCATE) every N commits")
    p.add_argument("--synchronous", choices=["NORMAL", "FULL"], default=None,
                   help="PRAGMA synchronous for both files (default: SQLite's, FULL in Python's build); NORMAL "
                        "in WAL mode skips the fsync at each commit, as most applications do")
    p.add_argument("--stats", help="write run statistics as JSON to this file")
    p.add_argument("--ready", help="create this file once the first commit is done")
    p = sub.add_parser("check")
    p.add_argument("dir")
    args = ap.parse_args(argv)

    if args.cmd == "init":
        init(args.dir, args.accounts, args.pad)
    elif args.cmd == "run":
        r = Runner(args.dir, args.busy_timeout, args.checkpoint_every, args.rate, args.synchronous)
        signal.signal(signal.SIGTERM, lambda *_: setattr(r, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(r, "stop", True))
        if args.ready:
            r.transfer()
            open(args.ready, "w").close()
        stats = r.run(args.seconds)
        text = json.dumps(stats)
        if args.stats:
            tmp = args.stats + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, args.stats)
        else:
            print(text)
    else:
        res = check(paths(args.dir))
        print(json.dumps(res))
        sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
