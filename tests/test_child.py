"""The one child-process runner for raw file work (bastion.sqlite.child), driven through the real
tasks of its users: an error keeps its type, a child killed -9 or out of time is a clear error
and leaves no process behind, results and progress come back."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.errors import ChildFailed, FileProblem, RecoveryRefused
from bastion.replication import seed
from bastion.sqlite import child, exclusive


def _children() -> list[int]:
    """Our child processes running the runner."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"bastion.sqlite.child" in cmd:
            out.append(int(d))
    return out


def _wal_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(x)")
    con.executemany("INSERT INTO t VALUES(?)", [(i,) for i in range(1000)])
    con.commit()
    con.close()


def test_result_and_an_error_that_keeps_its_type(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _wal_db(db)
    child.run(seed._copy, [[str(db), str(tmp_path / "copy.db")]], what="the seed copy", timeout=60)
    assert (tmp_path / "copy.db").read_bytes() == db.read_bytes()
    # an OSError in the child comes back typed, naming the path
    with pytest.raises(FileProblem) as info:
        child.run(seed._copy, [[str(tmp_path / "gone.db"), str(tmp_path / "x.db")]], what="the seed copy")
    assert info.value.path == str(tmp_path / "gone.db") and "the seed copy" in info.value.message
    # a BastionError raised in the child keeps its class and details: this process holds the file open
    con = sqlite3.connect(db)
    con.execute("SELECT count(*) FROM t").fetchone()
    try:
        st = os.stat(db)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
        with pytest.raises(RecoveryRefused) as refused:
            exclusive.discard_in_child([(str(db), stamp)])
        assert refused.value.details["pid"] == os.getpid() and refused.value.path == str(db)
    finally:
        con.close()
    assert not _children()


def _blocked_copy(tmp_path: Path, timeout: float | None, box: dict[str, Any]) -> threading.Thread:
    """A seed copy from a FIFO nobody writes to: the child blocks in open(2) until it is killed."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def go() -> None:
        t0 = time.monotonic()
        try:
            child.run(seed._copy, [[str(fifo), str(tmp_path / "never.db")]], what="the seed copy", timeout=timeout)
        except BaseException as exc:    # handed to the test
            box["error"] = exc
        box["seconds"] = time.monotonic() - t0
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_a_child_killed_9_is_a_clear_error(tmp_path: Path) -> None:
    box: dict[str, Any] = {}
    t = _blocked_copy(tmp_path, None, box)
    deadline = time.monotonic() + 30
    while not (pids := _children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    t.join(30)
    err = box.get("error")
    assert isinstance(err, ChildFailed), repr(err)
    assert "the seed copy" in err.message and "signal 9" in err.message and err.details["returncode"] == -9
    assert not (tmp_path / "never.db").exists() and not _children()


def test_a_timeout_kills_the_child(tmp_path: Path) -> None:
    box: dict[str, Any] = {}
    t = _blocked_copy(tmp_path, 1.0, box)
    t.join(60)
    err = box.get("error")
    assert isinstance(err, ChildFailed), repr(err)
    assert "within 1 s" in err.message and "killed" in err.message and err.details["timeout"] == 1.0
    assert not _children()


def test_only_module_level_functions_of_bastion_run_in_a_child() -> None:
    with pytest.raises(ValueError):
        child.run(os.getcwd, None, what="x")     # type: ignore[arg-type]
