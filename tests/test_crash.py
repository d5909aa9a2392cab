"""Crash tests: the daemon is killed with SIGKILL while it protects a database in use.

The application is the bank workload in its own process (Python's stdlib sqlite3), or the
Debian sqlite3 shell run once per transfer. The daemon dies during continuous operations,
during a copy, during roll-in, during a freeze, under `bastion exec`, and before `bastion
recover` (roll in, or --discard-changes back to the startbu instant, refused when another
process has a file open or a checkpoint ran). Whatever the moment: the application goes on
(writers that were held resume), nothing is corrupt (integrity_check and the bank's
invariants), no acknowledged commit is lost, and the next endbu/thaw/exec says loudly
(exit 2) that the copy cannot be trusted.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest

from support import PY, App, DaemonProc, check_bank, dump, sha256, wait_for

FILES = ("bank.db", "audit.db")


# -- helpers -----------------------------------------------------------------------

def keeps_writing(app: App, seconds: float = 10.0) -> None:
    """The application commits again (transfers rise) within ``seconds``."""
    n0 = app.transfers()
    wait_for(lambda: app.transfers() > n0 + 20, seconds, every=0.02, what="the application's commits rising")


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
                 timeout=20, every=0.02, what="endbu releasing the holders")
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
                    timeout=20, every=0.02, what="the roll-in completed after the restart")
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


# -- helpers for the tests below ----------------------------------------------------

def touch(path: Path) -> None:
    path.write_text("")


def main_hashes(app_dir: Path) -> tuple[str, str]:
    """SHA-256 of the main files, read in the test's process (never the daemon's)."""
    return sha256(app_dir / "bank.db"), sha256(app_dir / "audit.db")


def contops_of(daemon: DaemonProc) -> dict[str, Any]:
    return {p: f["contops"] for p, f in file_status(daemon).items()}


def frozen_of(daemon: DaemonProc) -> dict[str, Any]:
    return {p: f["frozen"] for p, f in file_status(daemon).items()}


@contextlib.contextmanager
def cli_under_way(daemon: DaemonProc, flag: Path, go: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A CLI command in the background, yielded once its user command created ``flag``; that
    command waits for ``go``. On the way out (also on failure) go is given and the CLI reaped."""
    p = cli_bg(daemon, *args)
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            if p.poll() is not None:
                raise AssertionError(f"{args} ended early ({p.returncode}): {p.communicate()}")
            assert time.monotonic() < deadline, f"{args}: the command did not start"
            time.sleep(0.02)
        yield p
    finally:
        touch(go)
        if p.returncode is None:
            p.communicate(timeout=60)


# Under the freeze: copy main files and WALs (the snapshot), say so, wait for the test's go.
SNAPSHOT_CMD = r"""
import os, shutil, sys, time
src, dest, done, go = sys.argv[1:]
os.makedirs(dest)
for name in ("bank.db", "audit.db"):
    for suffix in ("", "-wal"):
        if os.path.exists(os.path.join(src, name + suffix)):
            shutil.copyfile(os.path.join(src, name + suffix), os.path.join(dest, name + suffix))
open(done, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
"""

# A slow backup tool: copies the main files 4 KiB at a time and stops after the first
# block until the test says go (the daemon is killed meanwhile).
SLOW_COPY_CMD = r"""
import os, sys, time
src, dest, started, go = sys.argv[1:]
os.makedirs(dest)
for name in ("bank.db", "audit.db"):
    with open(os.path.join(src, name), "rb") as s, open(os.path.join(dest, name), "wb") as d:
        while block := s.read(4096):
            d.write(block)
            if not os.path.exists(started):
                open(started, "w").close()
                deadline = time.monotonic() + 60
                while not os.path.exists(go) and time.monotonic() < deadline:
                    time.sleep(0.01)
"""


# -- (3) kill -9 during a freeze: the held writers resume ------------------------------

def test_kill9_during_freeze(daemon, bank, tmp_path):
    bank.start()
    keeps_writing(bank)
    snap, done, go = tmp_path / "snap", tmp_path / "snapshot-taken", tmp_path / "go"
    with cli_under_way(daemon, done, go, "freeze", "bank", "--timeout", "60", "--",
                       PY, "-c", SNAPSHOT_CMD, str(bank.dir), str(snap), str(done), str(go)) as p:
        fr = frozen_of(daemon)
        assert {f["status"] for f in fr.values()} == {"active"}, fr
        freeze_id = fr[str(bank.bank)]["freeze"]
        # the hold is on: readers go on, no commit goes through
        n0 = bank.transfers()
        time.sleep(0.5)
        assert bank.transfers() == n0, "an application commit went through during the freeze"

        t_kill = time.time()
        daemon.kill9()
        keeps_writing(bank)                  # the writers that were waiting go on at once
        touch(go)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 2, err
    assert "no Bastion daemon is listening" in err and "cannot be trusted" in err, err

    daemon.start()
    fr = frozen_of(daemon)
    assert {(f["status"], f["freeze"]) for f in fr.values()} == {("interrupted", freeze_id)}, fr
    r = daemon.cli("thaw", "bank")
    assert r.code == 2, (r.out, r.err)
    for path in (bank.bank, bank.audit):
        assert f"the freeze of {path} failed" in r.err, r.err
    assert "daemon stopped while this session was open" in r.err, r.err
    assert "a snapshot taken under this freeze" in r.err and "cannot be trusted" in r.err, r.err
    assert all(f is None for f in frozen_of(daemon).values())    # acknowledged: not frozen any more
    # the daemon freezes again, without warnings
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0 and r.json["warnings"] == [], (r.out, r.err)
    r = daemon.cli("thaw", "bank", "--json")
    assert r.code == 0 and r.json["consistent"], (r.out, r.err)

    stats = bank.stop()
    assert stats["errors"] == {}             # writers waited, none failed
    # one commit started before the kill and went through only once the daemon was gone
    assert any(t0 < t_kill <= t0 + dt for t0, dt in stats["slow"]), "no commit waited through the freeze"
    assert_bank_ok(bank.dir, stats["commits"])
    res = assert_bank_ok(snap)               # taken under an intact hold: consistent
    assert res["transfers"] == n0
    audit_is_prefix(snap, bank.dir)


# -- (4) kill -9 while `bastion exec` runs a backup command ----------------------------

@pytest.mark.parametrize("restart_before_command_ends", [False, True], ids=["daemon-down", "daemon-restarted"])
def test_kill9_during_exec(daemon, bank, tmp_path, restart_before_command_ends):
    bank.start()
    keeps_writing(bank)
    copy, started, go = tmp_path / "copy", tmp_path / "copy-started", tmp_path / "go"
    with cli_under_way(daemon, started, go, "exec", "bank", "--",
                       PY, "-c", SLOW_COPY_CMD, str(bank.dir), str(copy), str(started), str(go)) as p:
        rows = state_rows(daemon, "contops")
        assert {r["status"] for r in rows} == {"active"} and len({r["session_id"] for r in rows}) == 1, rows
        session = rows[0]["session_id"]
        at_startbu = main_hashes(bank.dir)
        keeps_writing(bank)
        assert main_hashes(bank.dir) == at_startbu      # held while the daemon lives

        daemon.kill9()
        # the holds died with the daemon: the application's own checkpoints reach the main files
        wait_for(lambda: main_hashes(bank.dir) != at_startbu, 20, "the main files changing after the kill", every=0.02)
        if restart_before_command_ends:
            daemon.start()
        touch(go)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 2, (out, err)
    if restart_before_command_ends:
        # endbu reached the new daemon, which knows the session was interrupted
        assert f"continuous operations on {bank.bank} was interrupted" in err, err
        assert "is not consistent" in err, err
        assert "the copy taken since startbu is consistent" not in out
        assert all(c is None for c in contops_of(daemon).values())   # exec's endbu acknowledged it
    else:
        assert "no Bastion daemon is listening" in err and "copy taken since startbu cannot be trusted" in err, err
        daemon.start()
        r = daemon.cli("status", "--json")
        co = [f["contops"] for db in r.json["databases"] for f in db["files"]]
        assert {(c["status"], c["session"]) for c in co} == {("interrupted", session)}, co
        seen = {(i["path"], i["session_id"]) for i in r.json["daemon"]["interrupted_at_startup"]}
        assert seen == {(str(bank.dir / n), session) for n in FILES}
        r = daemon.cli("endbu", "bank", "--json")
        assert r.code == 2, (r.out, r.err)
        assert {(f["session"], f["consistent"]) for f in r.json["files"]} == {(session, False)}
        assert all("is not consistent" in f["message"] for f in r.json["files"])
    # the next exec works and its copy is consistent
    copy2 = tmp_path / "copy2"
    copy2.mkdir()
    r = daemon.cli("exec", "bank", "--json", "--", "cp", str(bank.bank), str(bank.audit), str(copy2))
    assert r.code == 0 and r.json["endbu"]["consistent"], (r.out, r.err)
    assert r.json["startbu"]["warnings"] == []

    stats = bank.stop()
    assert stats["errors"] == {}
    assert_bank_ok(bank.dir, stats["commits"])
    assert_bank_ok(copy2)
    audit_is_prefix(copy2, bank.dir)


# -- (5) the sqlite3 shell as the application -------------------------------------------

def shell_transfer(i: int) -> tuple[int, int, int]:
    """The i-th transfer of the shell application: (src, dst, amount), known to the test."""
    return i % 200 + 1, (i * 7 + 3) % 200 + 1, i % 50 + 1


SHELL_LOOP = r"""
i=0
while [ ! -e "$STOP" ]; do
  i=$((i + 1))
  src=$((i % 200 + 1)); dst=$(((i * 7 + 3) % 200 + 1)); amount=$((i % 50 + 1))
  sqlite3 -bail -cmd ".timeout 10000" "$BANK" "ATTACH DATABASE '$AUDIT' AS audit; BEGIN IMMEDIATE;
    UPDATE accounts SET balance = balance - $amount WHERE id = $src;
    UPDATE accounts SET balance = balance + $amount WHERE id = $dst;
    UPDATE meta SET value = value + 1 WHERE key = 'transfers';
    INSERT INTO audit.audit SELECT value, $src, $dst, $amount, julianday('now') FROM meta WHERE key = 'transfers';
    COMMIT;" || exit 1
  echo "$i"
done
"""


class ShellLoop:
    """A shell script that runs the Debian `sqlite3` shell once per transfer (each one opens
    the files, commits and closes them: with the daemon gone, each close is the last one and
    checkpoints). A transfer is acknowledged once its sqlite3 exited 0 and its number is printed."""

    def __init__(self, app_dir: Path, stop: Path) -> None:
        env = {"PATH": "/usr/bin:/bin", "BANK": str(app_dir / "bank.db"), "AUDIT": str(app_dir / "audit.db"),
               "STOP": str(stop)}
        self.stop_flag = stop
        self.proc = subprocess.Popen(["sh", "-c", SHELL_LOOP], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.acked = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.acked = int(line)

    def keeps_committing(self, n: int = 20, timeout: float = 20) -> None:
        a0 = self.acked
        wait_for(lambda: self.acked >= a0 + n or self.proc.poll() is not None, timeout,
                 every=0.02, what="the sqlite3 application's commits rising")
        assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]

    def stop(self) -> str:
        touch(self.stop_flag)
        self.proc.wait(60)
        self._reader.join(10)
        self.proc.stdout.close()  # type: ignore[union-attr]
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        self.proc.stderr.close()  # type: ignore[union-attr]
        assert self.proc.returncode == 0, err
        return err


def test_kill9_with_the_sqlite3_shell_as_application(daemon, bank, tmp_path):
    app = ShellLoop(bank.dir, tmp_path / "stop-shell")
    try:
        app.keeps_committing()
        r = daemon.cli("startbu", "bank", "--json")
        assert r.code == 0, r.err
        copy = copy_main_files(bank.dir, tmp_path / "copy")
        app.keeps_committing()
        daemon.kill9()
        app.keeps_committing()                       # goes on without the daemon
        daemon.start()
        app.keeps_committing()
        r = daemon.cli("endbu", "bank")
        assert r.code == 2 and "interrupted" in r.err and "is not consistent" in r.err, r.err
        app.keeps_committing()
    finally:
        err = app.stop()
    assert err == ""                                 # not one "database is locked"
    n = app.acked
    res = assert_bank_ok(bank.dir, n)                # every acknowledged transfer, nothing more
    (name, rows), = dump(bank.audit)
    assert name == "audit"
    assert [r[:4] for r in rows] == [(i, *shell_transfer(i)) for i in range(1, n + 1)]
    assert res["transfers"] == n
    assert_bank_ok(copy)                             # taken before the kill: consistent
    audit_is_prefix(copy, bank.dir)


# -- (6) recover after kill -9: roll the delta in ------------------------------------------

def stop_app_during_contops(daemon: DaemonProc, bank: App, tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    """The application writes during continuous operations, then stops (its close cannot
    checkpoint: the daemon's holder pins the main files), then the daemon is killed.
    Returns the copy taken right after startbu, the application's stats, the session."""
    bank.start()
    keeps_writing(bank)
    r = daemon.cli("startbu", "bank", "--json")
    assert r.code == 0, r.err
    copy = copy_main_files(bank.dir, tmp_path / "at-startbu")
    keeps_writing(bank, 20)
    time.sleep(0.5)
    stats = bank.stop()
    assert stats["errors"] == {}
    assert main_hashes(bank.dir) == main_hashes(copy)
    daemon.kill9()
    return copy, stats, r.json["session"]


def test_recover_rolls_in_after_kill9(daemon, bank, tmp_path):
    copy, stats, session = stop_app_during_contops(daemon, bank, tmp_path)
    # from here on nothing may open the files read-write until the daemon runs again: the
    # last connection to close would checkpoint
    daemon.start()
    assert {(c["status"], c["session"]) for c in contops_of(daemon).values()} == {("interrupted", session)}
    before = assert_bank_ok(copy_main_files(bank.dir, tmp_path / "main-before"))
    assert before["transfers"] < stats["commits"]    # the main files alone are still at startbu

    r = daemon.cli("recover", "bank", "--json")
    assert r.code == 0, (r.out, r.err)
    files = r.json["files"]
    assert {(f["action"], f["session"], f["complete"]) for f in files} == {("rolled in", session, True)}
    assert all(f["delta_bytes"] > 0 for f in files), files
    # the main files alone now hold every acknowledged commit
    after = copy_main_files(bank.dir, tmp_path / "main-after")
    assert_bank_ok(after, stats["commits"])
    assert_bank_ok(bank.dir, stats["commits"])
    assert dump(after / "audit.db") == dump(bank.audit)
    audit_is_prefix(copy, bank.dir)
    # acknowledged: nothing open, endbu has nothing to end, a new session starts cleanly
    assert all(c is None for c in contops_of(daemon).values())
    r = daemon.cli("endbu", "bank")
    assert r.code == 2 and "not in continuous operations" in r.err and "acknowledged" in r.err, r.err


# -- (7) recover --discard-changes after kill -9 -------------------------------------------

OPENER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("SELECT count(*) FROM sqlite_schema").fetchall()
print("open", flush=True)
sys.stdin.read()          # keep the file open (no transaction) until the test closes our stdin
con.close()
"""


def file_hashes(app_dir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(app_dir.iterdir()) if p.name.startswith(FILES) and
            not p.name.endswith("-shm")}


def test_recover_discard_changes_after_kill9(daemon, bank, tmp_path):
    copy, stats, session = stop_app_during_contops(daemon, bank, tmp_path)
    daemon.start()
    at_startbu = check_bank(copy)
    assert at_startbu["ok"] and at_startbu["transfers"] < stats["commits"]
    wal_bytes = {n: (bank.dir / f"{n}-wal").stat().st_size for n in FILES}
    assert all(wal_bytes.values()), wal_bytes

    # refused while another process has one of the files open; nothing changes
    opener = subprocess.Popen([PY, "-c", OPENER, str(bank.audit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert opener.stdout.readline().strip() == "open"  # type: ignore[union-attr]
        before = file_hashes(bank.dir)
        r = daemon.cli("recover", "bank", "--discard-changes")
        assert r.code == 2, (r.out, r.err)
        assert f"{bank.audit}: open in process {opener.pid}" in r.err, r.err
        assert "stop the application" in r.err, r.err
        assert file_hashes(bank.dir) == before
        assert {(c["status"], c["session"]) for c in contops_of(daemon).values()} == {("interrupted", session)}
    finally:
        opener.stdin.close()  # type: ignore[union-attr]
        opener.wait(10)
        opener.stdout.close()  # type: ignore[union-attr]
    assert opener.returncode == 0
    assert file_hashes(bank.dir) == before

    # with every application stopped: back to the startbu instant, byte for byte
    r = daemon.cli("recover", "bank", "--discard-changes", "--json")
    assert r.code == 0, (r.out, r.err)
    files = {Path(f["path"]).name: f for f in r.json["files"]}
    assert set(files) == set(FILES)
    for name, f in files.items():
        assert f["action"] == "discarded" and f["session"] == session and f["quick_check"] == "ok", f
        assert f["discarded_wal_bytes"] == wal_bytes[name]
        assert Path(f["wal_kept_as"]).stat().st_size == wal_bytes[name]   # set aside, not deleted
    assert main_hashes(bank.dir) == main_hashes(copy)
    for name in FILES:
        assert dump(bank.dir / name) == dump(copy / name)
    assert_bank_ok(bank.dir, at_startbu["transfers"])
    assert all(c is None for c in contops_of(daemon).values())
    r = daemon.cli("recover", "bank", "--discard-changes")
    assert r.code == 2 and "nothing to discard" in r.err, r.err

    # the application starts again from the startbu instant and writes on
    bank.start()
    keeps_writing(bank)
    stats2 = bank.stop()
    assert stats2["errors"] == {}
    assert_bank_ok(bank.dir, at_startbu["transfers"] + stats2["commits"])
    audit_is_prefix(copy, bank.dir)


CHECKPOINTER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
con.close()
"""


def test_recover_discard_refused_after_a_checkpoint(daemon, bank, tmp_path):
    copy, stats, session = stop_app_during_contops(daemon, bank, tmp_path)
    # with the daemon gone, a report opens bank.db and closes it: the last connection to
    # close checkpoints the delta into the main file and deletes the WAL
    subprocess.run(["sqlite3", str(bank.bank), "SELECT count(*) FROM accounts;"], check=True, capture_output=True)
    assert not (bank.dir / "bank.db-wal").exists()
    assert sha256(bank.bank) != sha256(copy / "bank.db")
    assert sha256(bank.audit) == sha256(copy / "audit.db")   # untouched: its changes could be discarded
    daemon.start()

    before = file_hashes(bank.dir)
    r = daemon.cli("recover", "bank", "--discard-changes")
    assert r.code == 2, (r.out, r.err)
    assert f"{bank.bank}: the main file was written after startbu" in r.err, r.err
    assert "a checkpoint ran" in r.err and "cannot be discarded" in r.err, r.err
    assert "without --discard-changes" in r.err, r.err
    # all or nothing: audit.db, which alone could have been discarded, keeps its changes too
    assert file_hashes(bank.dir) == before
    assert {(c["status"], c["session"]) for c in contops_of(daemon).values()} == {("interrupted", session)}

    # the daemon is back; the application runs a TRUNCATE checkpoint of its own on audit.db
    p = subprocess.run([PY, "-c", CHECKPOINTER, str(bank.audit)], capture_output=True, text=True, check=True)
    assert p.stdout.startswith("(0,"), p.stdout             # not busy: it did checkpoint
    assert (bank.dir / "audit.db-wal").stat().st_size == 0
    assert sha256(bank.audit) != sha256(copy / "audit.db")
    before = file_hashes(bank.dir)
    r = daemon.cli("recover", str(bank.audit), "--discard-changes")
    assert r.code == 2, (r.out, r.err)
    assert f"{bank.audit}: the main file was written after startbu" in r.err and "a checkpoint ran" in r.err, r.err
    assert file_hashes(bank.dir) == before

    r = daemon.cli("recover", "bank", "--json")
    assert r.code == 0, (r.out, r.err)
    assert {(f["session"], f["complete"]) for f in r.json["files"]} == {(session, True)}
    assert_bank_ok(copy_main_files(bank.dir, tmp_path / "main-after"), stats["commits"])
    assert_bank_ok(bank.dir, stats["commits"])
    audit_is_prefix(copy, bank.dir)
    assert all(c is None for c in contops_of(daemon).values())
