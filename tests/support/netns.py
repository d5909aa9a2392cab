"""Network namespaces for partition tests: a bridge in the root namespace, one namespace per daemon.

Everything is named with a random tag (names under 15 characters, IFNAMSIZ) and removed by Net.close().
Needs root; netns_unavailable() says why not, for a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from support.daemon import DaemonProc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and p.returncode:
        raise RuntimeError(f"ip {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p


class Space:
    def __init__(self, ns: str, veth: str, inner: str, addr: str) -> None:
        self.ns, self.veth, self.inner, self.addr = ns, veth, inner, addr


class Net:
    """A bridge in the root namespace and one namespace per node on it (10.123.S.0/24)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)         # names stay under 15 characters (IFNAMSIZ)
        self.bridge = f"bpb{self.tag}"
        self.spaces: list[Space] = []
        used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
        free = [s for s in range(1, 255) if f"10.123.{s}." not in used]
        if not free:
            raise RuntimeError("no free 10.123.S.0/24 subnet here")
        self.prefix = f"10.123.{secrets.choice(free)}"
        self.gw = f"{self.prefix}.1"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gw}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self) -> Space:
        i = len(self.spaces)
        sp = Space(f"bpn{self.tag}{i}", f"bpv{self.tag}{i}", f"bpi{self.tag}{i}", f"{self.prefix}.{i + 2}")
        self.spaces.append(sp)
        ip("netns", "add", sp.ns)
        ip("link", "add", sp.veth, "type", "veth", "peer", "name", sp.inner, "netns", sp.ns)
        ip("link", "set", sp.veth, "master", self.bridge, "up")
        ip("-n", sp.ns, "addr", "add", f"{sp.addr}/24", "dev", sp.inner)
        ip("-n", sp.ns, "link", "set", sp.inner, "up")
        ip("-n", sp.ns, "link", "set", "lo", "up")
        return sp

    def cut(self, sp: Space, how: str) -> None:
        """switch: the root end goes down (cable pulled at the switch): packets vanish, no error
        comes back. nic: the node's own interface goes down: its connections to anything off
        the host fail at once (ENETUNREACH) while local clients still reach it."""
        if how == "switch":
            ip("link", "set", sp.veth, "down")
        else:
            ip("-n", sp.ns, "link", "set", sp.inner, "down")

    def heal(self, sp: Space, how: str) -> None:
        if how == "switch":
            ip("link", "set", sp.veth, "up")
        else:
            ip("-n", sp.ns, "link", "set", sp.inner, "up")

    def close(self) -> None:
        for sp in self.spaces:
            ip("netns", "del", sp.ns, check=False)         # takes its end of the veth pair with it
            ip("link", "del", sp.veth, check=False)
        ip("link", "del", self.bridge, check=False)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    probe = f"bpprobe{secrets.token_hex(3)}"
    p = ip("netns", "add", probe, check=False)
    if p.returncode:
        return f"cannot create a network namespace here: {p.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class NsDaemonProc(DaemonProc):
    """A daemon run inside the network namespace ``space`` (set before start), listening on its address.
    `ip netns exec` execs the daemon: same pid, so kill9/stop reach it."""

    space: Space

    def ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.space.ns, *cmd]

    def command(self) -> list[str]:
        return self.ns(*super().command())


__all__ = ["Net", "NsDaemonProc", "Space", "ip", "netns_unavailable"]
