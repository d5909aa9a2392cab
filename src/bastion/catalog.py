"""The catalog of protected files: the databases of the config plus files named by path.

A *database* is a named group of SQLite files from the config. Commands may also
name a file by its absolute path; such a file is protected from then on and
remembered in the state database, so it stays protected across restarts.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .errors import FileProblem, UnknownTarget, UsageError
from .sqlite import DatabaseFile
from .state import StateStore

log = logging.getLogger("bastion.catalog")


@dataclass
class Targets:
    """What a command names: database names and/or absolute file paths, or all of them."""
    names: list[str] = field(default_factory=list)
    all: bool = False

    @classmethod
    def of(cls, names: list[str] | None = None, all: bool = False) -> Targets:
        return cls(list(names or []), all)


class Catalog:
    def __init__(self, config: Config, state: StateStore) -> None:
        self.config = config
        self.state = state
        self._lock = threading.RLock()
        self.files: dict[str, DatabaseFile] = {}
        for db in config.databases.values():
            for path in db.files:
                self.files[path] = DatabaseFile(path, db.name)
        for path in state.adhoc_files():
            self.files.setdefault(path, DatabaseFile(path, None))

    def protect_all(self) -> list[dict[str, Any]]:
        """Try to protect every known file; files that cannot be protected yet keep their error."""
        problems = []
        for f in list(self.files.values()):
            try:
                f.protect(wal_timeout=2.0)
            except FileProblem as exc:
                log.warning("%s", exc.message)
                problems.append({"path": f.path, "error": exc.message})
        return problems

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def resolve(self, targets: Targets) -> list[DatabaseFile]:
        """Turn names and paths into files, in order, without duplicates. Raises
        UnknownTarget for a name that is neither a configured database nor an absolute path."""
        if not targets.names and not targets.all:
            raise UsageError("name at least one database or file, or use --all",
                             hint=self._known_hint())
        out: dict[str, DatabaseFile] = {}
        with self._lock:
            if targets.all:
                if not self.files:
                    raise UsageError("--all: no database is configured and no file has been protected",
                                     hint="list databases in the config's [databases] section, or name files by path")
                for path, f in self.files.items():
                    out[path] = f
            for name in targets.names:
                if name in self.config.databases:
                    for path in self.config.databases[name].files:
                        out[path] = self.files[path]
                elif os.path.isabs(name):
                    path = os.path.normpath(name)
                    out[path] = self.files.get(path) or DatabaseFile(path, None)
                else:
                    raise UnknownTarget(f"unknown database {name!r}", hint=self._known_hint())
        return list(out.values())

    def _known_hint(self) -> str:
        names = ", ".join(sorted(self.config.databases)) or "none"
        return f"configured databases: {names}; to name a file, give its path"

    def ensure_protected(self, files: list[DatabaseFile]) -> None:
        """Protect every file or raise naming the first that cannot be; new paths are registered."""
        for f in files:
            f.protect(wal_timeout=self.config.gate_timeout)
        with self._lock:
            for f in files:
                if f.path not in self.files:
                    self.files[f.path] = f
                    self.state.add_adhoc(f.path)

    def database_names(self) -> dict[str, list[DatabaseFile]]:
        groups: dict[str, list[DatabaseFile]] = {}
        for f in self.files.values():
            groups.setdefault(f.database or "(files)", []).append(f)
        return groups
