"""One launcher for every daemon a test or a bench starts (`bastion serve`), and its config."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from support.proc import PY


def toml_value(v: Any) -> str:
    """A Python value as TOML: str/Path, bool, int/float, list, dict (an inline table)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))          # a TOML basic string, escapes and all
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def toml_table(header: str, keys: dict[str, Any]) -> str:
    return f"[{header}]\n" + "".join(f"{_key(k)} = {toml_value(v)}\n" for k, v in keys.items())


def write_config(dir: Path, port: int, files: dict[str, Any] | None = None, extra: str = "", *,
                 name: str = "bastion.toml", data_dir: Path | None = None, addr: str = "127.0.0.1",
                 daemon: dict[str, Any] | None = None, sections: dict[str, dict[str, Any]] | None = None,
                 db_text: str = "") -> Path:
    """dir/name, the one way tests and benches write a config: [daemon] on addr:port with its data in
    data_dir (dir/var) and the keys in daemon; a [databases.X] per entry of files (a list of paths, or
    the table's keys, files among them), each followed by db_text (TOML lines as they are); a table per
    entry of sections ("sql", "users.alice"...); then extra, TOML text as it is."""
    tables = {"daemon": {"listen": f"{addr}:{port}", "data_dir": data_dir or dir / "var", **(daemon or {})}}
    for db, spec in (files or {}).items():
        tables[f"databases.{db}"] = spec if isinstance(spec, dict) else {"files": [str(p) for p in spec]}
    tables.update(sections or {})
    db_lines = db_text.rstrip("\n") + "\n" if db_text.strip() else ""
    path = dir / name
    path.write_text("\n".join(toml_table(h, keys) + (db_lines if h.startswith("databases.") else "")
                              for h, keys in tables.items()) + "\n" + extra)
    return path


def serve_refused(config: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """`bastion serve` expected to be refused: it must exit on its own (else subprocess.TimeoutExpired)."""
    return subprocess.run([PY, "-m", "bastion", "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=timeout)


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
    """`bastion serve` in its own process group; subclasses change command() (another log level, a network
    namespace) or log_file(), never the start loop."""
    config: Path
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    addr: str = "127.0.0.1"
    env: dict[str, str] | None = None
    ca: Path | None = None                  # the daemon serves TLS with a certificate from this CA
    log_level: str | None = "debug"         # None: the daemon's default
    one_log: bool = False                   # every start appends to log (given), not a new file each
    python: str = PY                        # the interpreter that runs the daemon

    def command(self) -> list[str]:
        """How the daemon is started; subclasses change this, not start()."""
        level = ["--log-level", self.log_level] if self.log_level else []
        return [self.python, "-m", "bastion", "serve", *level, "--config", str(self.config)]

    def log_file(self) -> Path:
        """Where this start's output goes (appended): log if one_log, else a new file per start."""
        if self.one_log and self.log is not None:
            return self.log
        return self.data_dir.parent / f"daemon-{time.time_ns()}.log"

    def spawn(self) -> DaemonProc:
        """Start the process and return at once (a cluster node may not answer until it has a role)."""
        self.log = self.log_file()
        with open(self.log, "a") as logf:          # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        return self

    def start(self, timeout: float = 20.0) -> DaemonProc:
        """spawn(), then poll until GET /v1/status answers 200 (the daemon serves and its token is written)."""
        self.spawn()
        assert self.proc is not None and self.log is not None
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
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.addr}:{self.port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", json=body, timeout=60,
                             verify=ssl.create_default_context(cafile=str(self.ca)) if self.ca else True,
                             headers={"Authorization": f"Bearer {token if token is not None else self.token}"})

    def cli(self, *args: str, timeout: float = 120) -> Result:
        p = subprocess.run([self.python, "-m", "bastion", "--config", str(self.config), *args],
                           capture_output=True, text=True, timeout=timeout, env=self.env)
        return Result(p.returncode, p.stdout, p.stderr)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM and wait; SIGKILL to the group after ``timeout`` seconds."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
