"""Backups: consistent, chunked, deduplicated, verified copies of databases, restorable anywhere."""

from .repository import Repository
from .restore import restore
from .verify import verify

__all__ = ["Repository", "restore", "verify"]
