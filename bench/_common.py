"""Helpers shared by the bench scripts (run as `.venv/bin/python bench/bench_x.py`).

The scripts import this module as `_common`: running a script puts its own directory,
bench/, first on sys.path, whatever the working directory is. This module puts tests/ there
too, so the benches share the tests' helpers (tests/support: daemon launcher, config writer,
free_port, wait_for, etcd) instead of copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]         # this checkout's Bastion and the tests' support
# tests/ must be on the path first; free_port, wait_for, write_config are re-exported to the benches
from support import DaemonProc, free_port, wait_for, write_config  # noqa: E402, F401

OUT = ROOT / "bench" / "out"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
# this checkout's Bastion for the subprocesses, whether or not the venv has it installed
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Daemon(DaemonProc):
    """A bench's daemon: this checkout's code, the default log level (debug would cost time), output in
    one log (default: beside the config, daemon.log) for all its starts."""

    def __init__(self, config: Path, port: int, data_dir: Path | None = None, log: Path | None = None,
                 addr: str = "127.0.0.1") -> None:
        super().__init__(config, port, data_dir or config.parent / "var", log=log or config.parent / "daemon.log",
                         addr=addr, log_level=None, env=ENV, one_log=True, python=PY)

    def start(self, timeout: float = 60) -> Daemon:
        super().start(timeout)
        return self

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)


def run(cmd: list[str], timeout: float = 1800, check: bool = True,
        **kw: Any) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to completion, output captured; (wall seconds, result). Raises on a non-zero exit if check."""
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", ENV), check=False, **kw)
    secs = time.perf_counter() - t
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return secs, p


def litestream_binary(work: Path) -> tuple[str | None, list[str]]:
    """Litestream from the npm package @flydotio/litestream-linux-x64, cached in bench/out/tools.

    Returns (path, what was tried) or (None, what was tried): callers print why and go on.
    work: a scratch directory for the download (a subdirectory is made and removed).
    """
    tried = []
    cached = OUT / "tools" / "litestream"
    if cached.exists() and os.access(cached, os.X_OK):
        return str(cached), [f"cached {cached}"]
    npm = shutil.which("npm")
    if not npm:
        return None, ["npm is not installed"]
    d = work / "npm"
    d.mkdir()
    try:
        _, p = run([npm, "pack", "@flydotio/litestream-linux-x64", "--silent"], timeout=300, check=False,
                   cwd=d, env=None)
        tried.append(f"npm pack @flydotio/litestream-linux-x64: exit {p.returncode} {p.stderr.strip()[-300:]}")
        tgz = sorted(d.glob("*.tgz"))
        if not tgz:
            return None, tried
        run(["tar", "xzf", str(tgz[0]), "-C", str(d)], env=None)
        found = [f for f in d.rglob("litestream") if f.is_file()]
        tried.append(f"found {[str(f.relative_to(d)) for f in found]}")
        if not found:
            return None, tried
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(found[0], cached)
        cached.chmod(0o755)
        _, v = run([str(cached), "version"], check=False, env=None)
        if v.returncode != 0:
            tried.append(f"`litestream version` failed: {v.stderr.strip()[-300:]}")
            cached.unlink()
            return None, tried
        return str(cached), tried
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, tried + [f"{type(exc).__name__}: {exc}"]
    finally:
        shutil.rmtree(d, ignore_errors=True)
