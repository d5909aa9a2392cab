"""Shared fixtures: a real daemon in its own process, a real bank application in another.

Nothing here mocks Bastion: tests drive the `bastion` CLI and the HTTP API of a
daemon started with `bastion serve` on a free loopback port, and check real
SQLite files with Python's stdlib sqlite3 in the test process (never the
daemon's process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(dir: Path, port: int, files: dict[str, list[str]] | None = None, extra: str = "") -> Path:
    lines = ["[daemon]", f'listen = "127.0.0.1:{port}"', f'data_dir = "{dir / "var"}"', ""]
    for name, paths in (files or {}).items():
        lines += [f"[databases.{name}]", "files = [" + ", ".join(json.dumps(str(p)) for p in paths) + "]", ""]
    path = dir / "bastion.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class DaemonProc:
    config: Path
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def command(self) -> list[str]:
        """How the daemon is started; subclasses change this, not start()."""
        return [PY, "-m", "bastion", "serve", "--log-level", "debug", "--config", str(self.config)]

    def start(self, timeout: float = 20.0) -> "DaemonProc":
        self.log = self.data_dir.parent / f"daemon-{time.time_ns()}.log"
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if self.api("GET", "/v1/status").status_code == 200:
                    return self
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start: {self.log.read_text()}")

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        r = httpx.request(method, f"http://127.0.0.1:{self.port}{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {token if token is not None else self.token}"})
        return r

    def cli(self, *args: str, timeout: float = 120) -> Result:
        p = subprocess.run([PY, "-m", "bastion", "--config", str(self.config), *args],
                           capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


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

    def start(self, seconds: float = 120, *extra: str) -> "App":
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


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dump(path: Path) -> list[tuple]:
    """Every row of every table, in key order: for content comparisons."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = []
        for (name,) in con.execute("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name"):
            out.append((name, con.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall()))
        return out
    finally:
        con.close()


@pytest.fixture
def bank(tmp_path: Path) -> App:
    d = tmp_path / "app"
    subprocess.run([PY, "-m", "bastion.workload", "init", str(d), "--accounts", "200"], check=True)
    return App(d)


@pytest.fixture
def daemon(tmp_path: Path, bank: App):
    """A daemon whose config protects the bank (bank.db + audit.db) as database 'bank'."""
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       extra="[contops]\ngate_timeout = \"10s\"\n")
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    yield d
    d.stop()
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()
