"""A real etcd on free ports (the lease store of cluster tests and the failover bench)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx

from support.proc import free_port, wait_for


class Etcd:
    """One etcd member: data in base/etcd, output in base/etcd.log; clients on host (peers on loopback)."""

    def __init__(self, base: Path, host: str = "127.0.0.1", name: str = "t") -> None:
        exe = shutil.which("etcd")
        assert exe, "etcd is not installed: run `make setup` (Debian package etcd-server)"
        self.client, peer = free_port(), free_port()
        self.url = f"http://{host}:{self.client}"
        peer_url = f"http://127.0.0.1:{peer}"
        with open(base / "etcd.log", "w") as logf:        # the child keeps its own descriptor
            self.proc = subprocess.Popen([exe, "--data-dir", str(base / "etcd"), "--name", name,
                                          "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                                          "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                                          "--initial-cluster", f"{name}={peer_url}"],
                                         stdout=logf, stderr=subprocess.STDOUT)
        wait_for(self.up, 30, "etcd up")

    def up(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
