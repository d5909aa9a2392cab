"""Ports and waits: the two things every test that starts a process needs."""

from __future__ import annotations

import inspect
import socket
import sys
import time
from typing import Any
from collections.abc import Callable

PY = sys.executable


def free_port() -> int:
    """A loopback port free right now (the caller binds it soon after; nobody else here takes ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(pred: Callable[[], Any]) -> str:
    """The predicate's own source line, so a failed wait says what it waited for."""
    try:
        return " ".join(inspect.getsource(pred).split())[:200]
    except (OSError, TypeError):
        return getattr(pred, "__name__", repr(pred))


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "", every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something true (returned) or ``timeout`` seconds pass (AssertionError
    naming ``what``, or the predicate's source when no ``what`` is given, and its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or _describe(pred)}: not within {timeout:g} s (last: {v!r:.300})")
        time.sleep(every)
