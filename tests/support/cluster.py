"""Cluster nodes on loopback (shared storage or replicated), and clients that record what was acknowledged."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx

import bastion.client as bc
from support.daemon import DaemonProc, write_config
from support.proc import PY, free_port, wait_for


class Node(DaemonProc):
    """A cluster node on loopback: `bastion serve` at the default log level, one log for all its starts;
    start() does not wait (a node answers once it has a role). The nodes share base/var."""

    def __init__(self, base: Path, name: str, port: int, files: list[Path], cluster: str, db: str = "bank",
                 db_keys: dict[str, Any] | None = None, busy_timeout: str = "10s") -> None:
        """cluster: TOML text ending in the [cluster] table (this node's name is added to it)."""
        config = write_config(base, port, {db: {"files": files, **(db_keys or {})}}, name=f"{name}.toml",
                              sections={"sql": {"busy_timeout": busy_timeout}}, extra=f'{cluster}\nnode = "{name}"\n')
        super().__init__(config, port, base / "var", log=base / f"{name}.log", log_level=None,
                         one_log=True)
        self.name = name

    def start(self, timeout: float = 0) -> Node:
        return self.spawn()

    def health(self) -> dict:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return {"role": "down", "writable": False}

    def stop(self, timeout: float = 20) -> None:
        super().stop(timeout)


def active_of(nodes: list[Node]) -> list[Node]:
    return [n for n in nodes if n.health().get("writable")]


def make_cluster(tmp_path: Path, bank, n: int, lease: str, ttl: str = "2s") -> list[Node]:
    ports = [free_port() for _ in range(n)]
    peers = ", ".join(f'n{i + 1} = "127.0.0.1:{p}"' for i, p in enumerate(ports))
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hook.py").write_text(
        "import os, sys\n"
        "name = os.environ['BASTION_NODE'] + '-' + os.environ['BASTION_ROLE']\n"
        "open(os.path.join(sys.argv[1], name), 'a').write(os.environ['BASTION_TOKEN'] + '\\n')\n")
    hook = json.dumps([PY, str(tmp_path / "hook.py"), str(tmp_path / "hooks")])
    cluster = (f'[cluster]\nname = "t"\nlease = "{lease[0]}"\nttl = "{ttl}"\npeers = {{ {peers} }}\n'
               f"on_promote = {hook}\non_demote = {hook}\n")
    if lease[0] == "etcd":
        cluster += f'etcd = ["{lease[1]}"]\n'
    return [Node(tmp_path, f"n{i + 1}", p, [bank.bank, bank.audit], cluster) for i, p in enumerate(ports)]


class HealthProbes:
    """Health of a node of a cluster that may be down or cut off (a DaemonProc's url), as a client sees it."""

    url: str

    def health(self, path: str = "/v1/health") -> tuple[int, dict]:
        """(status, body); (0, {}) when unreachable."""
        try:
            r = httpx.get(f"{self.url}{path}", timeout=1)
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError):
            return 0, {}

    def writable(self) -> bool:
        return bool(self.health()[1].get("writable"))

    def seeded_standby(self) -> bool:
        code, h = self.health("/v1/health/standby")
        return code == 200 and bool(h.get("seeded"))


def start_pair(n1: Node, n2: Node) -> tuple[Node, Node]:
    """Start two nodes; (active, passive) once one is active and the other says it is passive."""
    for n in (n1, n2):
        n.start()
    (active,) = wait_for(lambda: (a := active_of([n1, n2])) and len(a) == 1 and a, 30, "one active node")
    passive = n2 if active is n1 else n1
    wait_for(lambda: passive.health().get("role") == "passive", 30, "the other passive")
    return active, passive


def acked_db(path: Path) -> Path:
    """A new WAL file with the table the cluster tests' clients write (client, n) into."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE acked(id INTEGER PRIMARY KEY, client INT, n INT, at REAL)")
    con.commit()
    con.close()
    return path


class ClientThreads:
    """Client threads (self.threads) that run until self.stop is set: started on entering the
    context, stopped and joined on leaving it."""

    threads: list[threading.Thread]
    stop: threading.Event

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


class Writers(ClientThreads):
    """Clients writing through the driver with every node in the DSN; each records what was acknowledged."""

    def __init__(self, nodes: list[Node], token: str | None, count: int = 4, user: str = "",
                 database: str = "bank") -> None:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        self.dsn = f"bastion://{user + '@' if user else ''}{hosts}/{database}"
        self.token = token
        self.acked: dict[int, list[int]] = {i: [] for i in range(count)}
        self.lost: list[str] = []
        self.stop = threading.Event()
        self.connected = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, i: int) -> None:
        con = bc.connect(self.dsn, token=self.token, autocommit=True, failover_timeout=30)
        self.connected += 1
        n = 0
        while not self.stop.is_set():
            try:
                con.execute("INSERT INTO acked(client, n) VALUES (?, ?)", (i, n))
                self.acked[i].append(n)
            except bc.OutcomeUnknown as exc:
                self.lost.append(str(exc))       # may or may not be there: not counted as acknowledged
            except bc.OperationalError as exc:
                if "not active" not in str(exc) and "no active" not in str(exc):
                    raise
            n += 1
        con.close()

    def check(self, con: bc.Connection) -> int:
        rows = con.execute("SELECT client, n FROM acked").fetchall()
        got: dict[int, set[int]] = {}
        for c, n in rows:
            got.setdefault(c, set()).add(n)
        for i, ns in self.acked.items():
            missing = set(ns) - got.get(i, set())
            assert not missing, f"client {i}: {len(missing)} acknowledged commit(s) missing"
        return sum(len(v) for v in self.acked.values())


def token_of(tmp_path: Path) -> str:
    return wait_for(lambda: (p := tmp_path / "var" / "token").exists() and p.read_text().strip(), what="token")
