"""The Bastion daemon: one process per machine, an HTTP API over the library."""

from __future__ import annotations

from typing import Any

__all__ = ["Daemon"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports daemon.client (the admin API client) and must not load the
    # daemon's engine (apsw, the backup engine...) to send one request.
    if name == "Daemon":
        from .core import Daemon
        return Daemon
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
