"""Crash tests: the daemon is killed with SIGKILL while it protects a database in use.

The application is the bank workload in its own process (Python's stdlib sqlite3). The
daemon dies during continuous operations, during a copy, during roll-in, during a freeze,
under `bastion exec`, and before `bastion recover`. Whatever the moment: the application
goes on (writers that were held resume), nothing is corrupt (integrity_check and the
bank's invariants), no acknowledged commit is lost, and the next endbu/thaw/exec says
loudly (exit 2) that the copy cannot be trusted.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import PY, App, DaemonProc, check_bank, dump, free_port, sha256, write_config

FILES = ("bank.db", "audit.db")


# -- helpers -----------------------------------------------------------------------

def wait_for(pred: Callable[[], Any], timeout: float = 20.0, every: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s")
        time.sleep(every)


def keeps_writing(app: App, seconds: float = 10.0) -> None:
    """The application commits again (transfers rise) within ``seconds``."""
    n0 = app.transfers()
    wait_for(lambda: app.transfers() > n0 + 20, seconds, what="the application's commits rising")


def copy_main_files(app_dir: Path, dest: Path) -> Path:
    """What a backup tool does under continuous operations: copy the main files only."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(app_dir / name, dest / name)
    return dest


def state_rows(daemon: DaemonProc, kind: str) -> list[dict[str, Any]]:
    """The daemon's durable record of sessions, read from another process (the test's)."""
    con = sqlite3.connect(f"file:{daemon.data_dir / 'state.db'}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(
            "SELECT sf.*, s.kind FROM session_files sf JOIN sessions s ON s.id = sf.session_id "
            "WHERE s.kind = ? ORDER BY s.started_at, sf.path", (kind,))]
    finally:
        con.close()


def file_status(daemon: DaemonProc) -> dict[str, dict[str, Any]]:
    r = daemon.cli("status", "--json")
    assert r.code == 0, r.err
    return {f["path"]: f for db in r.json["databases"] for f in db["files"]}


def cli_bg(daemon: DaemonProc, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "bastion", "--config", str(daemon.config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_bank_ok(dir: Path, commits: int | None = None) -> dict[str, Any]:
    res = check_bank(dir)
    assert res["ok"], res
    if commits is not None:
        assert res["transfers"] == res["audit_rows"] == commits, (res, commits)
    return res


def audit_is_prefix(copy: Path, live: Path) -> None:
    """Content comparison of a copy with the live files: every audit row of the copy is the
    live row with the same seq (the copy is an earlier state of the same history)."""
    (name, rows), = dump(copy / "audit.db")
    (lname, lrows), = dump(live / "audit.db")
    assert name == lname == "audit"
    assert rows == lrows[:len(rows)]


# -- (1) kill -9 during continuous operations, while a copy is being taken ------------

def test_kill9_during_contops_and_copy(daemon, bank, tmp_path):
    bank.start()
    r = daemon.cli("startbu", "bank", "--json")
    assert r.code == 0, r.err
    session = r.json["session"]
    # a copy (a backup tool reading 4 KiB at a time) is half done when the daemon dies
    copy = tmp_path / "copy"
    copy.mkdir()
    half_done, go_on = threading.Event(), threading.Event()

    def copy_in_steps() -> None:
        for name in FILES:
            with open(bank.dir / name, "rb") as src, open(copy / name, "wb") as dst:
                while chunk := src.read(4096):
                    dst.write(chunk)
                    half_done.set()
                    go_on.wait(30)

    t = threading.Thread(target=copy_in_steps, daemon=True)
    t.start()
    assert half_done.wait(10)
    keeps_writing(bank)
    daemon.kill9()
    # the application goes on without the daemon: its commits keep increasing
    keeps_writing(bank)
    go_on.set()
    t.join(30)
    assert not t.is_alive()

    daemon.start()
    st = file_status(daemon)
    for name in FILES:
        co = st[str(bank.dir / name)]["contops"]
        assert co["status"] == "interrupted" and co["session"] == session, co
        assert "daemon stopped" in co["reason"]
    r = daemon.cli("status", "--json")
    seen = {(i["path"], i["session_id"], i["kind"]) for i in r.json["daemon"]["interrupted_at_startup"]}
    assert seen == {(str(bank.dir / n), session, "contops") for n in FILES}

    r = daemon.cli("endbu", "bank")
    assert r.code == 2, (r.out, r.err)
    assert "interrupted" in r.err and "is not consistent" in r.err, r.err
    # acknowledged: nothing open any more, and the next session works
    assert all(f["contops"] is None for f in file_status(daemon).values())
    r = daemon.cli("startbu", "bank", "--json")
    assert r.code == 0 and r.json["warnings"] == [], (r.out, r.err)
    copy2 = copy_main_files(bank.dir, tmp_path / "copy2")
    r = daemon.cli("endbu", "bank", "--json")
    assert r.code == 0 and r.json["consistent"], r.err

    stats = bank.stop()
    assert stats["errors"] == {}
    assert_bank_ok(bank.dir, stats["commits"])   # every acknowledged commit is in the live files
    assert_bank_ok(copy2)
    audit_is_prefix(copy2, bank.dir)


# -- (2) kill -9 during roll-in --------------------------------------------------------

READER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN")
n = con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
print(n, flush=True)
sys.stdin.read()          # hold the snapshot until the test closes our stdin
con.execute("COMMIT")
"""


class Reader:
    """A report in another process holding a read transaction (an old snapshot) open:
    no checkpoint can get past it, so a roll-in waits for it."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([PY, "-c", READER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.transfers = int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(10)
        self.proc.stdout.close()  # type: ignore[union-attr]
        assert self.proc.returncode == 0


def test_kill9_during_roll_in_held_by_a_reader(daemon, bank, tmp_path):
    bank.start()
    r = daemon.cli("startbu", "bank", "--json")
    assert r.code == 0, r.err
    session = r.json["session"]
    copy = copy_main_files(bank.dir, tmp_path / "copy")
    time.sleep(1.5)                               # a delta of tens of MB
    reader = Reader(bank.bank)
    try:
        keeps_writing(bank)                       # the reader's snapshot is now older than the last commit
        p = cli_bg(daemon, "endbu", "bank")
        wait_for(lambda: {r["status"] for r in state_rows(daemon, "contops")} == {"rolling_in"},
                 what="endbu releasing the holders")
        time.sleep(0.3)
        assert p.poll() is None, "the roll-in should be waiting for the reader"
        keeps_writing(bank)                       # the application writes on during roll-in
        daemon.kill9()
        _, err = p.communicate(timeout=30)
        assert p.returncode == 2 and "daemon" in err, err
        # a restart while the reader still holds its snapshot
        t0 = time.monotonic()
        daemon.start()
        assert time.monotonic() - t0 < 10, "the daemon's start waited for the roll-in"
    finally:
        reader.close()
    rows = wait_for(lambda: (rs := state_rows(daemon, "contops")) and all(r["status"] == "ended" for r in rs) and rs,
                    what="the roll-in completed after the restart")
    assert {r["session_id"] for r in rows} == {session}
    assert all("after a daemon restart" in r["reason"] for r in rows), rows
    assert all(f["contops"] is None for f in file_status(daemon).values())
    # the copy was consistent: endbu had released the holders before the daemon died
    r = daemon.cli("endbu", "bank")
    assert r.code == 2 and "not in continuous operations" in r.err and "ended" in r.err, r.err
    stats = bank.stop()
    assert stats["errors"] == {}
    assert_bank_ok(bank.dir, stats["commits"])
    res = assert_bank_ok(copy)
    assert res["transfers"] < reader.transfers
    audit_is_prefix(copy, bank.dir)
