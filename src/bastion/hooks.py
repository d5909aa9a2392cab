"""Operator commands the daemon runs on events (cluster on_promote/on_demote, on_failure).

One rule for all of them: a string runs through the shell (``/bin/sh -c``, so redirections,
pipes and ``$BASTION_*`` work as typed in the config), a list runs as argv. What the command
prints goes to the daemon's log, line by line; a failure is logged with its exit code. The
command runs in its own process group, so a timeout stops whatever it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

log = logging.getLogger("bastion.hooks")

MAX_LINES = 50       # of a command's output, in the log


def run(cmd: str | list[str] | tuple[str, ...], what: str, env: dict[str, str] | None = None,
        timeout: float = 30.0) -> dict[str, Any]:
    """Run ``cmd`` and wait for it; returns exit_code (None if it could not run or timed out),
    output (stdout and stderr together) and error."""
    full_env = {**os.environ, **(env or {})}
    shell = isinstance(cmd, str)
    try:
        p = subprocess.Popen(cmd if shell else list(cmd), shell=shell, env=full_env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                             start_new_session=True)
    except OSError as exc:
        log.error("%s could not run: %s", what, exc)
        return {"exit_code": None, "output": "", "error": f"could not run: {exc}"}
    error = None
    try:
        output, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = p.communicate()
        error = f"did not finish within {timeout:g} s: stopped"
    lines = output.splitlines()
    for line in lines[:MAX_LINES]:
        log.info("%s: %s", what, line)
    if len(lines) > MAX_LINES:
        log.info("%s: (%d more lines)", what, len(lines) - MAX_LINES)
    code = None if error else p.returncode
    if error:
        log.error("%s %s", what, error)
    elif code:
        error = f"exited with code {code}" + (f": {lines[-1].strip()[:300]}" if lines else "")
        log.error("%s %s", what, error)
    return {"exit_code": code, "output": output, "error": error}
