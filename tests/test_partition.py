"""A real network partition of the active node (issue 7), with Linux network namespaces.

Each node (`bastion serve`) runs in its own network namespace, wired by a veth pair to a
bridge in the root namespace, where etcd and the test's clients are:

    root ns: bridge 10.123.S.1/24, etcd on it; clients write through the driver (both nodes in the DSN)
      |-- veth -- ns 0: n1 at 10.123.S.2, and one client of its own ("same side" of the cut)
      `-- veth -- ns 1: n2 at 10.123.S.3

Two kinds of cut: "switch" sets the root end of the active node's veth down, as if its
cable were pulled at the switch (whatever it sends is dropped, no error comes back); "nic"
sets the node's own interface down (its connections out fail at once with ENETUNREACH).
Either way the node keeps running and the client inside its namespace keeps reaching it;
that client is where a node failing to fence itself would acknowledge writes the rest of
the cluster never sees. So: the cut node
must stop acknowledging before the other node's first acknowledgement (compared on one
clock: the namespaces share the kernel's), every acknowledged commit must be on the new
active, and after the network heals the cut node comes back as a passive node (shared
storage) or a seeded standby whose unshipped commits are in the conflict log (replicated).

The last test cuts the primary after a quiet spell, when its shipper has no open
connection to the standby (it found a bug: an isolated primary acknowledged, as "degraded", commits
the standby never got; the primary now proves it still holds the lease first).

Needs root (creating namespaces); skipped with the reason otherwise. Everything created
is named with a random tag and removed in the fixture, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import PY, free_port, wait_for, write_config
from support.cluster import ClientThreads, HealthProbes, acked_db
from support.etcd import Etcd
from support.netns import Net, NsDaemonProc, Space

import bastion.client as bc
from bastion.sql.users import hash_password

pytestmark = pytest.mark.timeout(240)
PW = "partition-test-password"
TTL = 2.0
TESTS = str(Path(__file__).resolve().parent)


# -- nodes in namespaces ---------------------------------------------------------------------

class NsNode(HealthProbes, NsDaemonProc):
    """A cluster node in its own namespace, at the default log level, one log for all its starts; start()
    does not wait (a node answers once it has a role)."""

    def __init__(self, base: Path, name: str, sp: Space, port: int) -> None:
        super().__init__(base / f"{name}.toml", port, Path(), log=base / f"{name}.log", addr=sp.addr,
                         log_level=None, one_log=True)
        self.name, self.sp, self.space = name, sp, sp
        self.host = f"{sp.addr}:{port}"
        self.db = Path()                          # set by make_nodes, with data_dir

    def start(self, timeout: float = 0) -> NsNode:
        return self.spawn()

    def health_inside(self) -> dict:
        """As seen from inside its own namespace (reachable while cut off)."""
        p = subprocess.run(["ip", "netns", "exec", self.sp.ns, PY, "-c",
                            f"import httpx; print(httpx.get('http://{self.host}/v1/health', timeout=3).text)"],
                           check=False, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def stop(self, timeout: float = 20) -> None:
        super().stop(timeout)


def make_nodes(base: Path, net: Net, mode: str, etcd_url: str) -> list[NsNode]:
    """Two nodes, each in its own namespace. shared: one data_dir and one file for both;
    replicated: each its own, commits acknowledged once the standby applied them."""
    spaces = [net.add(), net.add()]
    nodes = [NsNode(base, f"n{i + 1}", sp, free_port()) for i, sp in enumerate(spaces)]
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    for n in nodes:
        d = base / (n.name if mode == "replicated" else "shared")
        d.mkdir(exist_ok=True)
        n.db = d / "app.db"
        n.data_dir = d / "var"
        sections = {"sql": {"busy_timeout": "3s"}}
        if mode == "replicated":
            sections["replication"] = {"peer_token_file": token}
        sections["users.alice"] = {"password_hash": hash_password(PW), "access": {"app": "read-write"}}
        sections["cluster"] = {"name": f"part-{net.tag}", "node": n.name, "mode": mode, "lease": "etcd",
                               "etcd": [etcd_url], "ttl": f"{TTL:g}s", "peers": {m.name: m.host for m in nodes}}
        write_config(base, n.port, {"app": {"files": [n.db], "durability": mode if mode == "replicated" else
                                            "durable"}},
                     name=n.config.name, data_dir=n.data_dir, addr=n.sp.addr, sections=sections)
    acked_db(nodes[0].db)
    return nodes


# -- clients ----------------------------------------------------------------------------------

# `at` is the time the daemon ran the INSERT, before its COMMIT: a lower bound of when it acknowledged
INSERT = "INSERT INTO acked(client, n, at) VALUES (?, ?, unixepoch('subsec')) RETURNING at"


class Writers(ClientThreads):
    """Clients in the root namespace: `count` with both nodes in their DSN, and one pinned to
    `pinned` alone (client 50, asking all along: its first acknowledgement comes as soon as
    that node serves). Each acknowledgement is kept with the daemon's `at`, the time the
    answer arrived, and the host that gave it."""

    def __init__(self, nodes: list[NsNode], pinned: NsNode, count: int = 3) -> None:
        both = f"bastion://alice@{','.join(n.host for n in nodes)}/app"
        self.acked: list[tuple[int, int, float, float, str]] = []
        self.errors: dict[str, int] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, both), daemon=True) for i in range(count)]
        self.threads.append(threading.Thread(target=self._run, args=(50, f"bastion://alice@{pinned.host}/app"),
                                             daemon=True))

    def _run(self, i: int, dsn: str) -> None:
        con = None
        n = 0
        while not self.stop.is_set():
            try:
                if con is None:
                    # a short request timeout: a client of a node that vanished from the network moves on
                    con = bc.connect(dsn, password=PW, autocommit=True, timeout=3,
                                     failover_timeout=30 if i < 50 else 0.2)
                at = con.execute(INSERT, (i, n)).fetchone()[0]
                self.acked.append((i, n, at, time.time(), con.transport.host))
            except bc.Error as exc:       # OutcomeUnknown, NotReplicated, no active node: not acknowledged
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                time.sleep(0.02)
            n += 1
        if con is not None:
            con.close()

    def by(self, host: str) -> list[tuple[int, int, float, float, str]]:
        return [a for a in list(self.acked) if a[4] == host]


def side_writer(host: str, out: str, stop: str, go: str = "") -> None:
    """Run inside a node's namespace (same side of the cut as the node): inserts through that
    node alone, one JSON line per answer: acknowledged (the daemon's `at`, time received) or not.
    With `go`: connects, then waits for that file to exist before the first insert."""
    con = bc.connect(f"bastion://alice@{host}/app", password=PW, autocommit=True, timeout=5, failover_timeout=1)
    while go and not os.path.exists(go):
        time.sleep(0.002)
    n = 0
    with open(out, "a") as f:
        while not os.path.exists(stop):
            rec = {"n": n}
            try:
                rec["at"] = con.execute(INSERT, (100, n)).fetchone()[0]
            except bc.Error as exc:
                rec["error"] = type(exc).__name__
                time.sleep(0.05)
            rec["recv"] = time.time()
            f.write(json.dumps(rec) + "\n")
            f.flush()
            n += 1


class SideWriter:
    def __init__(self, base: Path, node: NsNode, wait_for_go: bool = False) -> None:
        self.out, self.stopfile, self.gofile = base / "side.jsonl", base / "side.stop", base / "side.go"
        code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_partition as t; t.side_writer(*sys.argv[1:])"
        with open(base / "side.log", "w") as logf:
            self.proc = subprocess.Popen(["ip", "netns", "exec", node.sp.ns, PY, "-c", code, node.host,
                                          str(self.out), str(self.stopfile), str(self.gofile) if wait_for_go else ""],
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass                # a line being written
        return out

    def acked(self) -> list[dict]:
        return [r for r in self.records() if "at" in r]

    def stop(self) -> None:
        self.stopfile.touch()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def rows_of(n: NsNode) -> tuple[set[tuple[int, int]], str]:
    """(client, n) of every row on this node alone, and its integrity_check."""
    con = bc.connect(f"bastion://alice@{n.host}/app", password=PW, autocommit=True, failover_timeout=5)
    try:
        rows = {(c, k) for c, k in con.execute("SELECT client, n FROM acked").fetchall()}
        return rows, con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def cli(n: NsNode, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bastion", "--config", str(n.config), *args], check=False, capture_output=True,
                          text=True, timeout=60)


def file_rows(path: Path) -> set[tuple[int, int]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",), path
        return set(con.execute("SELECT client, n FROM acked").fetchall())
    finally:
        con.close()


# -- the test -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "how"), [("replicated", "switch"), ("replicated", "nic"), ("shared", "switch")])
def test_partition_of_the_active_node_no_split_brain_no_acknowledged_commit_lost(tmp_path, net, mode, how):
    etcd = Etcd(tmp_path, net.gw, name="p")
    etcd_url = etcd.url
    n1, n2 = nodes = make_nodes(tmp_path, net, mode, etcd_url)
    side = None
    try:
        n1.start()
        wait_for(n1.writable, 60, "n1 active")
        n2.start()
        if mode == "replicated":
            wait_for(n2.seeded_standby, 90, "n2 a seeded standby")
        else:
            wait_for(lambda: n2.health()[1].get("role") == "passive", 60, "n2 passive")

        side = SideWriter(tmp_path, n1)
        with Writers(nodes, pinned=n2) as w:
            wait_for(lambda: len(side.acked()) > 20 and len(w.by(n1.host)) > 20, 60, "commits on n1 from both sides")
            assert not w.by(n2.host)
            t_cut = time.time()
            net.cut(n1.sp, how)
            wait_for(n2.writable, 30, "n2 active after the cut")
            takeover = time.time() - t_cut
            wait_for(lambda: len(w.by(n2.host)) > 20 and any(a[0] < 50 for a in w.by(n2.host)), 60,
                     "commits acknowledged by n2, to the clients with both nodes in their DSN too")
            # cut off, n1 is still running but no longer active (it cannot renew its lease)
            inside = n1.health_inside()
            assert not inside["writable"] and inside["role"] in ("passive", "fenced"), inside
            side.stop()
        side_acks = side.acked()
        old_recv = [r["recv"] for r in side_acks] + [a[3] for a in w.by(n1.host)]
        new_at = [a[2] for a in w.by(n2.host)]
        last_old, first_new = max(old_recv), min(new_at)
        after = {}
        for r in side.records():
            if r["recv"] > t_cut:
                after[r.get("error", "acknowledged")] = after.get(r.get("error", "acknowledged"), 0) + 1
        moved = min(a[3] for a in w.by(n2.host) if a[0] < 50) - t_cut
        print(f"\n{mode}, cut at the {how}: n2 active {takeover:.2f} s after the cut; n1's last acknowledgement "
              f"reached its client {last_old - t_cut:+.3f} s from the cut, {first_new - last_old:.3f} s before n2's "
              f"first commit; the clients with both nodes in their DSN (request timeout 3 s) wrote on n2 "
              f"{moved:.1f} s after the cut; n1's own-side client after the cut: {after}; "
              f"root clients' errors {w.errors}")
        # self-fencing: n1 acknowledged nothing once the lease could move (ttl after its last
        # renewal, which came before the cut), and nothing once n2 had started: no split brain
        assert last_old < t_cut + TTL, f"n1 acknowledged a write {last_old - t_cut:.3f} s after the cut (ttl {TTL} s)"
        assert last_old < first_new, (last_old, first_new)

        # every commit acknowledged by either node, to either side, is on n2; intact
        got, integrity = rows_of(n2)
        acked = {(a[0], a[1]) for a in w.acked} | {(100, r["n"]) for r in side_acks}
        missing = acked - got
        assert not missing, f"{len(missing)} acknowledged commit(s) missing on n2: {sorted(missing)[:10]}"
        assert integrity == "ok"

        # the network heals: n1 comes back passive, n2 stays the one active node
        net.heal(n1.sp, how)
        if mode == "replicated":
            wait_for(n1.seeded_standby, 90, "n1 back as a seeded standby")
        else:
            wait_for(lambda: n1.health()[1].get("role") == "passive", 60, "n1 back as passive")
        assert [n for n in nodes if n.writable()] == [n2]

        if mode == "replicated":
            # what n1 committed on its side and n2 never applied (unacknowledged: NotReplicated,
            # or answers lost in the cut) is in n2's conflict log, not lost and not applied
            (old_file,) = list((n1.data_dir / "cluster").glob("rejoined-*/app.db"))
            unshipped = file_rows(old_file) - got
            r = cli(n2, "conflicts", "list", "app", "--json")
            assert r.returncode == 0, r.stderr
            logged = {((c["remote"]["values"] or {}).get("client"), (c["remote"]["values"] or {}).get("n"))
                      for c in json.loads(r.stdout)["conflicts"] if c["policy"] == "failover"}
            assert unshipped <= logged, f"not in the conflict log: {sorted(unshipped - logged)[:10]}"
            print(f"replicated: {len(unshipped)} unacknowledged commit(s) of n1 in n2's conflict log")
            # n1's new copy catches up with n2 and is intact
            wait_for(lambda: file_rows(n1.db) == rows_of(n2)[0], 60, "n1's copy equal to n2's")
        else:
            assert file_rows(n1.db) == got
    finally:
        net.heal(n1.sp, how)         # (idempotent) a node cut off takes longer to stop
        if side is not None and side.proc.poll() is None:
            side.stop()
        for n in nodes:
            n.stop()
        etcd.stop()


def test_replicated_a_partition_after_a_quiet_spell_loses_no_acknowledged_commit(tmp_path, net):
    """The database was quiet for a while (the primary's connection to its standby closed),
    then the primary's network interface fails and a client on its side writes at once:
    the primary must not acknowledge, as merely "degraded" (standby down), commits that the
    standby, about to take over, never received."""
    etcd = Etcd(tmp_path, net.gw, name="p")
    etcd_url = etcd.url
    n1, n2 = nodes = make_nodes(tmp_path, net, "replicated", etcd_url)
    side = None
    try:
        n1.start()
        wait_for(n1.writable, 60, "n1 active")
        n2.start()
        wait_for(n2.seeded_standby, 90, "n2 a seeded standby")
        side = SideWriter(tmp_path, n1, wait_for_go=True)
        time.sleep(7.0)          # quiet: more than the idle time of the shipper's HTTP connection
        t_cut = time.time()
        net.cut(n1.sp, "nic")
        side.gofile.touch()
        wait_for(n2.writable, 30, "n2 active after the cut")
        time.sleep(1.0)
        side.stop()
        recs = side.records()
        acked = {(100, r["n"]) for r in recs if "at" in r}
        print(f"\nquiet, then cut: n1's own-side client got {len(acked)} acknowledgement(s), the last "
              f"{max((r['recv'] for r in recs if 'at' in r), default=t_cut) - t_cut:+.3f} s from the cut; "
              f"errors {sorted({r['error'] for r in recs if 'error' in r})}")
        got, integrity = rows_of(n2)
        assert integrity == "ok"
        missing = acked - got
        assert not missing, (f"{len(missing)} commit(s) acknowledged by n1 after the cut are not on n2, "
                             f"the new active: {sorted(missing)[:10]}")
    finally:
        net.heal(n1.sp, "nic")       # (idempotent) a node cut off takes longer to stop
        if side is not None and side.proc.poll() is None:
            side.stop()
        for n in nodes:
            n.stop()
        etcd.stop()
