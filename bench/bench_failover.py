"""Failover benchmark (issue 7): RTO and RPO of kill -9 of the active node.

    .venv/bin/python bench/bench_failover.py [--rounds N] [--ttl 2s] [--no-etcd]

Starts a cluster of three real daemons on loopback sharing one data_dir (lease in the
data_dir; then again with the lease in a real etcd, if the etcd binary is there) and
clients writing through the DB-API driver with all three nodes in their DSN, each
commit acknowledged only when durable. Each round kills the active node with SIGKILL
and measures:

  RTO = time from the kill to the first write acknowledged after it (by any client)
  RPO = acknowledged commits missing afterwards (goal 0)

then restarts the killed node (it rejoins as passive). Prints one table and writes
bench/out/failover.json. Patroni's defaults take 30-45 s, LiteFS up to 10 s (issue 7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "bench" / "out"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

import apsw  # noqa: E402
import httpx  # noqa: E402

import bastion.client as bc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.01)
    raise SystemExit(f"{what}: not within {timeout:g} s")


class Node:
    def __init__(self, work: Path, name: str, port: int, cluster: str) -> None:
        self.name, self.port = name, port
        self.config = work / f"{name}.toml"
        self.config.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{work / "var"}"\n\n'
                               f'[databases.app]\nfiles = ["{work / "app.db"}"]\n\n{cluster}node = "{name}"\n')
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as lf:
            self.proc = subprocess.Popen([PY, "-m", "bastion", "serve", "--config", str(self.config)],
                                         stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)

    def writable(self) -> bool:
        try:
            return bool(httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=1).json().get("writable"))
        except (httpx.HTTPError, ValueError):
            return False

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def scenario(work: Path, lease: str, etcd_url: str | None, rounds: int, ttl: str, clients: int) -> dict:
    work.mkdir(parents=True)
    con = apsw.Connection(str(work / "app.db"))
    con.execute("PRAGMA journal_mode=WAL").fetchall()
    con.execute("CREATE TABLE acked(id INTEGER PRIMARY KEY, client INT, n INT)")
    con.close()
    ports = [free_port() for _ in range(3)]
    peers = ", ".join(f'n{i + 1} = "127.0.0.1:{p}"' for i, p in enumerate(ports))
    cluster = f'[cluster]\nname = "bench"\nlease = "{lease}"\nttl = "{ttl}"\npeers = {{ {peers} }}\n'
    if etcd_url:
        cluster += f'etcd = ["{etcd_url}"]\n'
    nodes = [Node(work, f"n{i + 1}", p, cluster) for i, p in enumerate(ports)]
    for n in nodes:
        n.start()
    wait_for(lambda: sum(n.writable() for n in nodes) == 1, 60, "one active node")
    token = (work / "var" / "token").read_text().strip()
    dsn = "bastion://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/app"
    acked: dict[int, list[tuple[int, float, str]]] = {i: [] for i in range(clients)}
    unknown = [0]
    stop = threading.Event()

    def client(i: int) -> None:
        c = bc.connect(dsn, token=token, autocommit=True, failover_timeout=60)
        n = 0
        while not stop.is_set():
            try:
                c.execute("INSERT INTO acked(client, n) VALUES (?, ?)", (i, n))
                acked[i].append((n, time.monotonic(), c.transport.host))
            except bc.OutcomeUnknown:
                unknown[0] += 1
            except bc.OperationalError as exc:
                if "active" not in str(exc):
                    log(f"client {i}: {exc}")
                time.sleep(0.01)
            except Exception as exc:  # noqa: BLE001 - say it, do not die silently
                log(f"client {i}: {type(exc).__name__}: {exc}")
                time.sleep(0.1)
            n += 1
        c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    rtos = []
    try:
        for r in range(rounds):
            time.sleep(2.0)
            (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
            t_kill = time.monotonic()
            log(f"{lease}: round {r + 1}: {sum(len(v) for v in acked.values())} acknowledged so far; "
                f"kill -9 of {active.name}")
            active.kill9()
            # the first write acknowledged by another node (a reply of the dying node may still arrive)
            gone = f"127.0.0.1:{active.port}"
            first = wait_for(lambda: min((ts for v in acked.values() for _, ts, host in v
                                          if ts > t_kill and host != gone), default=None),
                             60, "a write acknowledged after the kill")
            rtos.append(first - t_kill)
            log(f"{lease}: round {r + 1}: killed {active.name}, RTO {rtos[-1]:.3f} s")
            active.start()          # rejoins as passive
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    (active,) = wait_for(lambda: [n for n in nodes if n.writable()] or None, 30, "an active node")
    c = bc.connect(dsn, token=token, autocommit=True)
    got = {(a, b) for a, b in c.execute("SELECT client, n FROM acked").fetchall()}
    integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
    c.close()
    for n in nodes:
        n.stop()
    total = sum(len(v) for v in acked.values())
    lost = sum(1 for i, v in acked.items() for n, _, _ in v if (i, n) not in got)
    return {"lease": lease, "ttl": ttl, "rounds": rounds, "rto_seconds": rtos, "acknowledged": total,
            "lost_acknowledged": lost, "outcome_unknown": unknown[0], "integrity_check": integrity}


def start_etcd(work: Path) -> tuple[subprocess.Popen, str] | None:
    exe = shutil.which("etcd")
    if not exe:
        return None
    c, p = free_port(), free_port()
    url = f"http://127.0.0.1:{c}"
    proc = subprocess.Popen([exe, "--data-dir", str(work / "etcd-data"), "--name", "b", "--listen-client-urls", url,
                             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{p}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                             "--initial-cluster", f"b=http://127.0.0.1:{p}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(up, 30, "etcd")
    return proc, url


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ttl", default="2s")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-etcd", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-failover-"))
    results = [scenario(work / "file", "file", None, a.rounds, a.ttl, a.clients)]
    etcd = None if a.no_etcd else start_etcd(work)
    if etcd:
        try:
            results.append(scenario(work / "etcd", "etcd", etcd[1], a.rounds, a.ttl, a.clients))
        finally:
            etcd[0].terminate()
            etcd[0].wait(10)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "failover.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"Failover: kill -9 of the active node, 3 nodes, {a.clients} writing clients, lease ttl {a.ttl}")
    print(f"{'lease':<6} {'rounds':>6} {'RTO median':>11} {'RTO max':>8} {'acked':>7} {'lost':>5} {'unknown':>8}  "
          f"{'integrity':<9}  verdict")
    for r in results:
        rto = r["rto_seconds"]
        ok = max(rto) <= 5.0 and r["lost_acknowledged"] == 0 and r["integrity_check"] == "ok"
        print(f"{r['lease']:<6} {r['rounds']:>6} {statistics.median(rto):>10.2f}s {max(rto):>7.2f}s "
              f"{r['acknowledged']:>7} {r['lost_acknowledged']:>5} {r['outcome_unknown']:>8}  "
              f"{r['integrity_check']:<9}  {'PASS' if ok else 'MISS'} (goal RTO <= 5 s, RPO 0)")
    if not etcd and not a.no_etcd:
        print("etcd: not installed here (Debian package etcd-server; `make setup` installs it): etcd lease not measured")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
