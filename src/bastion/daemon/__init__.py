"""The Bastion daemon: one process per machine, an HTTP API over the library."""

from .core import Daemon

__all__ = ["Daemon"]
