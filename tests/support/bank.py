"""The bank application (src/bastion/workload.py) in its own process, and its checker."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.workload import init
from support.proc import PY


def init_bank(dir: Path, accounts: int = 200) -> Path:
    """dir/bank.db and dir/audit.db, fresh: the workload's own init, in this process (stdlib sqlite3, closed
    before it returns), without a Python start-up per test (`python -m bastion.workload init` is the same
    function; test_restore_safety runs it that way)."""
    init(str(dir), accounts)
    return dir


@dataclass
class App:
    """The bank workload in its own process (stdlib sqlite3)."""
    dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def bank(self) -> Path:
        return self.dir / "bank.db"

    @property
    def audit(self) -> Path:
        return self.dir / "audit.db"

    def start(self, seconds: float = 120, *extra: str) -> App:
        self.stats_path = self.dir.parent / f"stats-{time.time_ns()}.json"
        ready = self.dir.parent / f"ready-{time.time_ns()}"
        self.proc = subprocess.Popen([PY, "-m", "bastion.workload", "run", str(self.dir), "--seconds", str(seconds),
                                      "--stats", str(self.stats_path), "--ready", str(ready), *extra])
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.proc.poll() is None, "workload died"
            assert time.monotonic() < deadline, "workload did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        assert self.proc.returncode == 0
        return json.loads(self.stats_path.read_text())

    def transfers(self) -> int:
        con = sqlite3.connect(self.bank, timeout=30)
        try:
            return con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
        finally:
            con.close()


def check_bank(dir: Path) -> dict[str, Any]:
    """integrity_check and the invariants of a bank/audit pair, in a separate process."""
    p = subprocess.run([PY, "-m", "bastion.workload", "check", str(dir)], capture_output=True, text=True, timeout=120)
    assert p.stdout, p.stderr
    return json.loads(p.stdout)
