"""Multi-site sync: a seeded shop file, and a site's daemon run inside its own network namespace."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx

from support.daemon import Result, write_config
from support.netns import NsDaemonProc, Space
from support.proc import PY


def seed_file(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, photo BLOB)")
    con.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                    [(i, f"item {i}", i, bytes([i]) * i) for i in range(1, 51)])
    con.commit()
    con.close()


class NsSite(NsDaemonProc):
    """One site: its namespace, config, file, and its daemon started inside the namespace (start() does not
    wait: up() says when it answers); a new log per start, all kept in logs."""

    def __init__(self, base: Path, name: str, sp: Space, port: int, sites: dict[str, str], token: Path) -> None:
        self.name, self.sp, self.space = name, sp, sp
        self.dir = base / name
        self.dir.mkdir()
        self.db = self.dir / "shop.db"
        cfg = write_config(self.dir, port, {"shop": {"files": self.files(), "sync_group": "g"}}, addr=sp.addr,
                           sections={"replication": {"peer_token_file": token}, "sync": {"site": name},
                                     "sync_groups.g": {"sites": sites, "topology": "mesh", "schedule": "continuous",
                                                       **self.group()}},
                           extra=self.group_extra())
        super().__init__(cfg, port, self.dir / "var", addr=sp.addr)
        self.logs: list[Path] = []

    def files(self) -> list[Path]:
        return [self.db]

    def group(self) -> dict[str, Any]:
        """Keys of the sync group's table besides sites, topology, schedule."""
        # the ids here name the same row at every site: insert/insert is a conflict the policy decides
        return {"keys": {"items": "shared", "notes": "shared"}}

    def group_extra(self) -> str:
        return ""

    def log_file(self) -> Path:
        self.logs.append(self.dir / f"daemon-{len(self.logs)}.log")
        return self.logs[-1]

    def start(self, timeout: float = 0) -> NsSite:
        return self.spawn()

    def up(self) -> bool:
        """Answering, as seen from the root namespace."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon of site {self.name} exited {self.proc.returncode}: "
                                 f"{self.logs[-1].read_text()[-3000:]}")
        try:
            return httpx.get(f"http://{self.sp.addr}:{self.port}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cli(self, *args: str, timeout: float = 120) -> Result:
        """The CLI inside the site's namespace (it reaches its daemon while the site is cut off)."""
        p = subprocess.run(self.ns(PY, "-m", "bastion", "--config", str(self.config), *args),
                           check=False, capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def status(self) -> tuple[int, dict[str, Any]]:
        r = self.cli("sync", "status", "shop", "--json")
        assert r.out, f"sync status on {self.name} printed nothing (exit {r.code}): {r.err}"
        return r.code, r.json["databases"][0]

    def conflicts(self) -> list[dict[str, Any]]:
        r = self.cli("conflicts", "list", "shop", "--json")
        assert r.code == 0, f"conflicts list on {self.name}: {r.err}"
        return r.json["conflicts"]

    def app(self, *statements: str) -> None:
        """The site's application, in its own process inside the namespace: one transaction."""
        code = ("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1], timeout=30)\n"
                "con.execute('BEGIN IMMEDIATE')\nfor s in sys.argv[2:]:\n    con.execute(s)\ncon.commit()\n")
        p = subprocess.run(self.ns(PY, "-c", code, str(self.db), *statements), check=False, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, f"application of site {self.name}: {p.stderr}"

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)


def ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
