"""One child-process worker for raw file work the daemon must not do itself.

Closing any descriptor of a database file drops every SQLite lock the daemon holds on it
(DESIGN.md, pitfalls), so reading, copying and swapping database files with open(2) runs in
a child that holds no connection of the daemon's: backup reads (backup.snapshot), seed copies
(replication.seed), exclusive access for discard and replace (sqlite.exclusive). They share
this runner and its protocol:

    python -m bastion.sqlite.child MODULE:FUNCTION WHAT  < request.json

- the request is JSON on stdin; the task is a module-level function of bastion, called as
  ``fn(request, progress)`` (``progress(done, total)`` reaches the parent's callback);
- stdout carries one JSON document: ``{"result": ...}``, or ``{"error": BastionError.to_dict()}``
  which the parent raises as the same class (errors.py registry); an OSError becomes
  errors.from_os_error, anything else a BastionError naming WHAT (never a traceback);
- stderr lines ``progress DONE TOTAL`` are progress; any other line is kept for the message
  if the child dies without answering (killed, out of memory): then :class:`ChildFailed`;
- ``timeout`` (seconds): the child is killed (SIGKILL) and the caller gets ChildFailed.
  Otherwise the child stays in the caller's process group (a kill of the daemon's group stops
  it too), unless ``detach``: a session of its own, which neither that kill nor the caller's
  death stops (exclusive replace must finish its renames once it has begun).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import BastionError, ChildFailed, from_os_error

Progress = Callable[[int, int], None]


def run(task: Callable[[Any, Progress], Any], request: Any, *, what: str, timeout: float | None = None,
        progress: Progress | None = None, detach: bool = False) -> Any:
    """Run ``task(request, progress)`` in a child process and return its result (JSON values).
    ``what`` names the work in errors ("the seed copy")."""
    name = f"{task.__module__}:{task.__qualname__}"
    if not task.__module__.startswith("bastion.") or "." in task.__qualname__:
        raise ValueError(f"{name}: a child task is a module-level function of bastion")
    proc = subprocess.Popen([sys.executable, "-m", "bastion.sqlite.child", name, what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=detach)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    other: list[str] = []
    out: list[str] = []
    stderr, stdout = proc.stderr, proc.stdout

    def read_stderr() -> None:
        for line in stderr:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "progress":
                if progress:
                    progress(int(parts[1]), int(parts[2]))
            else:
                other.append(line)
                del other[:-200]

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
    except BrokenPipeError:
        pass                                  # it died at once: said below
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
    except BaseException:
        if not detach:                        # interrupted (the caller is stopping): no orphan
            _kill(proc)
            stdout.close()
            stderr.close()
        raise
    for t in readers:
        t.join(10)      # the pipes close when the child is gone
    stdout.close()
    stderr.close()
    tail = "".join(other).strip()[-2000:]
    if timed_out:
        raise ChildFailed(f"{what} did not finish within {timeout:g} s; its process was killed",
                          hint="see the daemon's log; retry, or raise the time limit",
                          details={"task": name, "timeout": timeout})
    try:
        doc = json.loads(out[0] if out else "")
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        raise BastionError.from_dict(doc["error"])
    if isinstance(doc, dict) and "result" in doc and proc.returncode == 0:
        return doc["result"]
    code = proc.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    raise ChildFailed(f"{what} failed: its process {how} without an answer" + (f": {tail}" if tail else ""),
                      hint="nothing it was doing was put in place; see the daemon's log, then retry",
                      details={"task": name, "returncode": code})


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def _main() -> None:
    if len(sys.argv) != 3 or ":" not in sys.argv[1] or not sys.argv[1].startswith("bastion."):
        sys.exit("usage: python -m bastion.sqlite.child bastion.MODULE:FUNCTION WHAT < request.json")
    (module, func), what = sys.argv[1].split(":", 1), sys.argv[2]
    last = [0.0]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 0.2 or done == total:
            last[0] = time.monotonic()
            print(f"progress {done} {total}", file=sys.stderr, flush=True)

    try:
        fn = getattr(importlib.import_module(module), func)
        doc: dict[str, Any] = {"result": fn(json.load(sys.stdin), report)}
    except BastionError as exc:
        doc = {"error": exc.to_dict()}
    except OSError as exc:
        doc = {"error": from_os_error(exc, what).to_dict()}
    except Exception as exc:    # the parent gets an error it can show, not a traceback
        doc = {"error": BastionError(f"{what} failed: {type(exc).__name__}: {exc}",
                                     hint="see the daemon's log; please report this").to_dict()}
    print(json.dumps(doc), flush=True)
    sys.exit(2 if "error" in doc else 0)


if __name__ == "__main__":
    _main()
