"""Failover on shared storage: several real daemons on loopback share one data_dir; a lease
(in the data_dir, or in a real etcd started here) makes exactly one of them active.

Clients write through the real driver with every node in their DSN. Each acknowledged
commit is recorded by the client; after kill -9 of the active node, a passive one takes
over, and every acknowledged commit must be there, the database intact.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

import bastion.client as bc
from support import PY, check_bank, free_port, wait_for
from support.cluster import Node, Writers, active_of, make_cluster, token_of
from support.etcd import Etcd


def prepare(nodes: list[Node], tmp_path: Path) -> bc.Connection:
    for n in nodes:
        n.start()
    wait_for(lambda: len(active_of(nodes)) == 1, what="one active node")
    con = bc.connect("bastion://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes) + "/bank",
                     token=token_of(tmp_path), autocommit=True)
    con.execute("CREATE TABLE IF NOT EXISTS acked(id INTEGER PRIMARY KEY, client INT, n INT, "
                "at REAL DEFAULT (unixepoch('subsec')))")
    return con


# -- tests ---------------------------------------------------------------------------------

def test_kill9_of_the_active_node_passive_takes_over_no_acknowledged_commit_lost(tmp_path, bank):
    nodes = make_cluster(tmp_path, bank, 3, ("file",))
    try:
        con = prepare(nodes, tmp_path)
        assert sorted(n.health()["role"] for n in nodes) == ["active", "passive", "passive"]
        bank.start()        # a local application writes the same files all along
        with Writers(nodes, token_of(tmp_path)) as w:
            time.sleep(1.5)
            (old,) = active_of(nodes)
            before = sum(len(v) for v in w.acked.values())
            t0 = time.monotonic()
            old.kill9()
            # RTO: from kill -9 to the first write acknowledged after it
            wait_for(lambda: sum(len(v) for v in w.acked.values()) > before + 5, what="writes acknowledged again")
            rto = time.monotonic() - t0
            time.sleep(1.0)
        (new,) = active_of(nodes)
        assert new is not old
        assert rto < 5.0, f"RTO {rto:.2f} s"
        print(f"RTO (kill -9 to first acknowledged write): {rto:.3f} s")
        total = w.check(con)
        assert total > 50
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stats = bank.stop()
        res = check_bank(bank.dir)
        assert res["ok"] and res["transfers"] == stats["commits"], res
        # hooks ran: the new active's on_promote got its fencing token
        hooks = tmp_path / "hooks"
        assert (hooks / f"{new.name}-promote").read_text().split()[-1].isdigit()
        # the old node comes back as a passive node
        old.start()
        wait_for(lambda: old.health()["role"] == "passive", what="the old active back as passive")
        assert len(active_of(nodes)) == 1
        con.close()
    finally:
        for n in nodes:
            n.stop()
        if bank.proc and bank.proc.poll() is None:
            bank.proc.kill()
            bank.proc.wait()


def test_planned_switchover_loses_no_commit(tmp_path, bank):
    nodes = make_cluster(tmp_path, bank, 2, ("file",))
    try:
        con = prepare(nodes, tmp_path)
        with Writers(nodes, token_of(tmp_path)) as w:
            time.sleep(1.0)
            (old,) = active_of(nodes)
            other = next(n for n in nodes if n is not old)
            r = subprocess.run([PY, "-m", "bastion", "--config", str(old.config), "cluster", "switchover",
                                "--to", other.name, "--json"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["to"] == other.name
            n0 = sum(len(v) for v in w.acked.values())
            wait_for(lambda: sum(len(v) for v in w.acked.values()) > n0 + 5, what="writes on the new active")
        assert active_of(nodes) == [other]
        assert w.check(con) > 10 and not w.lost
        r = subprocess.run([PY, "-m", "bastion", "--config", str(old.config), "cluster", "status", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout)["active"] == [other.name], r.stdout
        # a passive node refuses work with a clear answer (drivers move on)
        h = httpx.post(f"http://127.0.0.1:{old.port}/v1/sql/bank", json={"statements": ["SELECT 1"]},
                       headers={"Authorization": f"Bearer {token_of(tmp_path)}"})
        assert h.status_code == 503 and h.json()["error"]["type"] == "NotActive"
        assert httpx.get(f"http://127.0.0.1:{old.port}/v1/health/active").status_code == 503
        assert httpx.get(f"http://127.0.0.1:{old.port}/v1/health/standby").status_code == 200
        con.close()
    finally:
        for n in nodes:
            n.stop()


def test_switchover_to_a_name_that_is_no_node_is_refused_by_the_api_and_the_cli_alike(tmp_path, bank):
    """The API and the CLI run one switchover (cluster.control): a target [cluster] peers does
    not list is refused before anything changes. Straight to the API, the active node used to
    hand the lease over to that name: reserved for nobody, no node was active for 3 TTLs."""
    nodes = make_cluster(tmp_path, bank, 2, ("file",))
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: len(active_of(nodes)) == 1, what="one active node")
        (active,) = active_of(nodes)
        other = next(n for n in nodes if n is not active)
        auth = {"Authorization": f"Bearer {token_of(tmp_path)}"}
        for bad in ("n9", active.name):
            h = httpx.post(f"{active.url}/v1/cluster/switchover", json={"to": bad}, headers=auth, timeout=30)
            assert h.status_code in (400, 409), h.text
            assert h.json()["error"]["type"] == ("UsageError" if bad == "n9" else "StateConflict")
            r = subprocess.run([PY, "-m", "bastion", "--config", str(other.config), "cluster", "switchover",
                                "--to", bad, "--json"], capture_output=True, text=True, timeout=60)
            assert r.returncode == (3 if bad == "n9" else 2) and bad in r.stderr, (r.returncode, r.stderr)
        assert active_of(nodes) == [active]
        st = httpx.get(f"{active.url}/v1/cluster/status", headers=auth, timeout=10).json()
        assert st["role"] == "active" and st["clustered"] and st["token"]
        assert st["lease"]["holder"]["node"] == active.name
        # the route's answer is the node's half; the CLI waits for the new active and says how long it took
        h = httpx.post(f"{active.url}/v1/cluster/switchover", json={"to": other.name}, headers=auth, timeout=60)
        assert h.status_code == 200 and h.json() == {"from": active.name, "to": other.name, "exit_code": 0}, h.text
        wait_for(lambda: active_of(nodes) == [other], what="the named node active")
        r = subprocess.run([PY, "-m", "bastion", "--config", str(other.config), "cluster", "status", "--json"],
                           capture_output=True, text=True, timeout=60)
        d = json.loads(r.stdout)
        assert r.returncode == 0 and d["active"] == [other.name] and d["exit_code"] == 0, r.stdout
        assert {x["node"]: x["role"] for x in d["nodes"]} == {active.name: "passive", other.name: "active"}
    finally:
        for n in nodes:
            n.stop()


# -- etcd ---------------------------------------------------------------------------------

class Cut:
    """A TCP relay between one node and etcd that the test can cut: a real network partition
    of that node's lease traffic (connections reset, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.srv = socket.create_server(("127.0.0.1", self.port))
        self.socks: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self.srv.shutdown(socket.SHUT_RDWR)     # wakes the accept() (close alone would not)
        except OSError:
            pass
        self.srv.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_etcd_lease_failover_and_partition_without_split_brain(tmp_path, bank):
    etcd = Etcd(tmp_path)
    relays = [Cut(etcd.client), Cut(etcd.client)]
    nodes = make_cluster(tmp_path, bank, 2, ("etcd", etcd.url), ttl="2s")
    for node, relay in zip(nodes, relays):       # each node reaches etcd through its own relay
        node.config.write_text(node.config.read_text().replace(etcd.url, f"http://127.0.0.1:{relay.port}"))
    try:
        con = prepare(nodes, tmp_path)
        (first,) = active_of(nodes)
        second = next(n for n in nodes if n is not first)
        relay = relays[nodes.index(first)]
        token = token_of(tmp_path)
        # one writer pinned to each node: who acknowledges what, and when (the database's clock)
        pinned: dict[str, list[float]] = {first.name: [], second.name: []}
        stop = threading.Event()

        def pinned_writer(node: Node) -> None:
            c = None
            while c is None and not stop.is_set():
                try:
                    c = bc.connect(f"bastion://127.0.0.1:{node.port}/bank", token=token, autocommit=True,
                                   failover_timeout=0.5)
                except bc.Error:
                    time.sleep(0.02)        # not active (yet)
            while c is not None and not stop.is_set():
                try:
                    cur = c.execute("INSERT INTO acked(client, n) VALUES (?, 0) RETURNING at",
                                    (100 + nodes.index(node),))
                    pinned[node.name].append(cur.fetchone()[0])
                except bc.Error:
                    time.sleep(0.02)
            if c is not None:
                c.close()

        ts = [threading.Thread(target=pinned_writer, args=(n,), daemon=True) for n in nodes]
        for t in ts:
            t.start()
        time.sleep(1.0)
        assert pinned[first.name] and not pinned[second.name]
        t_cut = time.time()
        relay.cut()                                 # the active node can no longer reach etcd
        wait_for(lambda: second.health().get("writable"), 20, "the other node active")
        rto = time.time() - t_cut
        time.sleep(1.0)
        stop.set()
        for t in ts:
            t.join(30)
        assert first.health()["role"] in ("passive", "fenced")
        last_old, first_new = max(pinned[first.name]), min(pinned[second.name])
        # no split brain: the cut node acknowledged nothing once the new one had started
        assert last_old < first_new, (last_old, first_new)
        print(f"etcd partition: new active after {rto:.2f} s; old node's last ack "
              f"{first_new - last_old:.3f} s before the new node's first")
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # kill -9 of the new active: the first node (whose etcd relay is cut) cannot take over;
        # nobody is active until etcd is reachable — better down than split
        second.kill9()
        time.sleep(3.0)
        assert active_of(nodes) == []
        con.close()
    finally:
        for n in nodes:
            n.stop()
        for r in relays:
            r.cut()
        etcd.stop()
