"""The OCF resource agent (ocf/bastion) that lets Pacemaker run Bastion as a promotable clone.

Checked two ways, both against real `bastion serve` nodes on loopback sharing one data_dir:
Debian's `ocf-tester` (package resource-agents) runs its whole compliance sequence, and the
tests drive the agent directly the way Pacemaker's executor does (environment variables in,
OCF exit codes out) across a two-node cluster. No Pacemaker is involved: the agent is a
plain program with a defined contract, and that contract is what is checked here.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from support import PY, free_port, wait_for, write_config

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "ocf" / "bastion"
BASTION = Path(PY).parent / "bastion"
OCF_ROOT = "/usr/lib/ocf"
OCF_TESTER = shutil.which("ocf-tester") or "/usr/sbin/ocf-tester"
# what Pacemaker's executor gives an agent: a short PATH (so the agent must not count on
# the venv being on it) and the OCF variables
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "OCF_ROOT": OCF_ROOT}

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED = 0, 1, 5, 6
OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 7, 8


def needs_resource_agents() -> None:
    assert os.access(OCF_TESTER, os.X_OK) and os.path.exists(f"{OCF_ROOT}/lib/heartbeat/ocf-shellfuncs"), (
        "ocf-tester / ocf-shellfuncs missing: install the Debian packages resource-agents, libxml2-utils "
        "and curl (scripts/install-system-deps.sh, run by `make setup`)")
    assert shutil.which("curl"), "curl missing: install the Debian package curl"


def write_cluster(base: Path, names: list[str], ttl: str = "2s") -> dict[str, Path]:
    """One config per node: own listen address and node name, same data_dir and database.
    The data_dir exists beforehand, as on mounted shared storage (the agent checks)."""
    (base / "var").mkdir()
    db = base / "app.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, node TEXT)")
    con.commit()
    con.close()
    ports = {n: free_port() for n in names}
    peers = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    return {n: write_config(base, p, {"app": [db]}, name=f"{n}.toml", sections={
        "cluster": {"name": "ocf", "node": n, "lease": "file", "ttl": ttl, "peers": peers}}) for n, p in ports.items()}


class Agent:
    """ocf/bastion for one node, called as Pacemaker calls it."""

    def __init__(self, base: Path, name: str, config: Path) -> None:
        self.name, self.config = name, config
        self.port = int(config.read_text().split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
        self.pidfile, self.log = base / f"{name}.pid", base / f"{name}.log"
        self.env = {**BASE_ENV, "OCF_RA_VERSION_MAJOR": "1", "OCF_RA_VERSION_MINOR": "1",
                    "OCF_RESOURCE_INSTANCE": "bastion", "OCF_RESKEY_config": str(config),
                    "OCF_RESKEY_bastion": str(BASTION), "OCF_RESKEY_pidfile": str(self.pidfile),
                    "OCF_RESKEY_log": str(self.log), "OCF_RESKEY_CRM_meta_timeout": "60000"}

    def run(self, action: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(AGENT), action], env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=120)

    def rc(self, action: str, **extra: str) -> int:
        return self.run(action, **extra).returncode

    def ok(self, action: str) -> None:
        r = self.run(action)
        assert r.returncode == OCF_SUCCESS, f"{self.name} {action}: rc={r.returncode}\n{r.stderr}\n{self.tail()}"

    def health(self) -> dict:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return {"role": "down"}

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else "(no daemon log)"

    def cleanup(self) -> None:
        """Whatever happened in the test, leave no daemon behind."""
        self.run("stop")
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def both(a: Agent, b: Agent, action: str) -> None:
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda agent: agent.ok(action), (a, b)))


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def sql(agent: Agent, token: str, statement: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{agent.port}/v1/sql/app", json={"statements": [statement]},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)


# -- tests ---------------------------------------------------------------------------------

def test_ocf_tester_passes(tmp_path):
    needs_resource_agents()
    configs = write_cluster(tmp_path, ["n1", "n2"])
    # A lone node takes Bastion's lease on its own within ttl/6, while ocf-tester wants the
    # monitor right after start to say "running, not promoted". With a peer already holding
    # the lease the node under test starts passive, as it would in a real cluster, and every
    # promote/demote of the sequence is a real switchover between the two.
    peer = Agent(tmp_path, "n2", configs["n2"])
    tested = Agent(tmp_path, "n1", configs["n1"])
    try:
        peer.ok("start")
        wait_for(lambda: peer.health().get("writable"), 40, "the peer node active")
        t0 = time.monotonic()
        p = subprocess.run([OCF_TESTER, "-n", "bastion", "-o", f"config={configs['n1']}", "-o", f"bastion={BASTION}",
                            "-o", f"pidfile={tested.pidfile}", "-o", f"log={tested.log}", str(AGENT)],
                           env=BASE_ENV, capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
        print(f"ocf-tester: {time.monotonic() - t0:.1f} s\n{p.stdout}")
        assert p.returncode == 0, f"{out}\n{tested.tail()}"
        assert f"{AGENT} passed all tests" in p.stdout, out
        failures = [line for line in out.splitlines() if line.startswith("* rc=") or "Tests failed" in line]
        assert not failures, out
        # its sequence ends with stop: nothing of n1 left, the peer serves
        assert tested.health()["role"] == "down" and not tested.pidfile.exists()
        assert peer.health().get("writable") is True
    finally:
        tested.cleanup()
        peer.cleanup()


def test_agent_runs_a_two_node_cluster_promote_demote_stop(tmp_path):
    needs_resource_agents()
    configs = write_cluster(tmp_path, ["n1", "n2"])
    a, b = Agent(tmp_path, "n1", configs["n1"]), Agent(tmp_path, "n2", configs["n2"])
    try:
        assert a.rc("monitor") == OCF_NOT_RUNNING and b.rc("monitor") == OCF_NOT_RUNNING
        both(a, b, "start")              # as Pacemaker starts clone instances: at once
        # Bastion's lease elects one of them on its own: promoted (8) there, running (0) on the other
        codes = wait_for(lambda: (c := (a.rc("monitor"), b.rc("monitor"))) in ((8, 0), (0, 8)) and c,
                         40, "one node promoted, the other running")
        active, passive = (a, b) if codes == (8, 0) else (b, a)
        assert active.health()["writable"] is True and passive.health()["role"] == "passive"
        # a probe says the truth too; a recurring monitor of the Unpromoted role on the node the lease
        # made active answers "running" (Pacemaker would otherwise restart the new active)
        assert active.rc("monitor", OCF_RESKEY_CRM_meta_interval="0") == OCF_RUNNING_PROMOTED
        assert active.rc("monitor", OCF_RESKEY_CRM_meta_interval="11000",
                         OCF_RESKEY_CRM_meta_role="Unpromoted") == OCF_SUCCESS
        assert active.rc("monitor", OCF_RESKEY_CRM_meta_interval="10000",
                         OCF_RESKEY_CRM_meta_role="Promoted") == OCF_RUNNING_PROMOTED
        token = (tmp_path / "var" / "token").read_text().strip()
        assert sql(active, token, f"INSERT INTO t(node) VALUES ('{active.name}')").status_code == 200

        # promote the passive node: a switchover to it
        t0 = time.monotonic()
        passive.ok("promote")
        print(f"promote (switchover {active.name} -> {passive.name}): {time.monotonic() - t0:.1f} s")
        assert passive.rc("monitor") == OCF_RUNNING_PROMOTED
        assert active.rc("monitor") == OCF_SUCCESS
        # it is the writer now; the old active refuses writes
        r = sql(passive, token, f"INSERT INTO t(node) VALUES ('{passive.name}')")
        assert r.status_code == 200, r.text
        assert sql(active, token, "INSERT INTO t(node) VALUES ('nobody')").status_code == 503
        passive.ok("promote")            # promoting the promoted: nothing to do

        # demote it: it hands the lease over and the other node takes it
        t0 = time.monotonic()
        passive.ok("demote")
        print(f"demote ({passive.name} hands over): {time.monotonic() - t0:.1f} s")
        assert passive.rc("monitor") == OCF_SUCCESS
        wait_for(lambda: active.rc("monitor") == OCF_RUNNING_PROMOTED, 20, "the other node promoted again")
        passive.ok("demote")             # demoting the demoted: nothing to do
        assert passive.rc("notify") == OCF_SUCCESS

        # stop both: SIGTERM, the processes end, the agent says "not running"; stop again is fine
        pids = [a.pid(), b.pid()]
        assert all(alive(p) for p in pids)
        both(a, b, "stop")
        assert not any(alive(p) for p in pids)
        assert a.rc("monitor") == OCF_NOT_RUNNING and b.rc("monitor") == OCF_NOT_RUNNING
        a.ok("stop")
        assert a.health()["role"] == "down" and b.health()["role"] == "down"
        # both acknowledged writes are there, the database intact
        con = sqlite3.connect(tmp_path / "app.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert sorted(r[0] for r in con.execute("SELECT node FROM t")) == sorted([active.name, passive.name])
        finally:
            con.close()
    finally:
        a.cleanup()
        b.cleanup()


def test_meta_data_validate_all_and_clear_errors(tmp_path):
    needs_resource_agents()
    # meta-data: valid for the DTD ocf-tester uses and for resource-agents' RelaxNG schema,
    # a promotable agent with a monitor per role
    md = subprocess.run([str(AGENT), "meta-data"], env=BASE_ENV, capture_output=True, text=True, timeout=30)
    assert md.returncode == 0
    rng = subprocess.run(["xmllint", "--noout", "--relaxng", "/usr/share/resource-agents/metadata.rng", "-"],
                         input=md.stdout, capture_output=True, text=True, timeout=30)
    assert rng.returncode == 0, rng.stderr
    root = ET.fromstring(md.stdout)
    actions = {(e.get("name"), e.get("role")) for e in root.iter("action")}
    assert {("promote", None), ("demote", None), ("notify", None), ("monitor", "Promoted"),
            ("monitor", "Unpromoted")} <= actions
    params = {e.get("name"): e.get("required") for e in root.iter("parameter")}
    assert params["config"] == "1" and {"bastion", "python", "pidfile", "log", "start_timeout"} <= set(params)

    configs = write_cluster(tmp_path, ["n1"])
    agent = Agent(tmp_path, "n1", configs["n1"])
    assert agent.rc("validate-all") == OCF_SUCCESS
    # no config parameter: the resource is misconfigured everywhere
    r = agent.run("validate-all", OCF_RESKEY_config="")
    assert r.returncode == OCF_ERR_CONFIGURED and "'config' parameter" in r.stderr
    # config missing on this node: not installed here
    r = agent.run("validate-all", OCF_RESKEY_config=str(tmp_path / "nowhere.toml"))
    assert r.returncode == OCF_ERR_INSTALLED and "does not exist" in r.stderr
    # a config without [cluster]: says so
    plain = write_config(tmp_path, free_port(), name="plain.toml", data_dir=tmp_path / "pvar")
    r = agent.run("validate-all", OCF_RESKEY_config=str(plain))
    assert r.returncode == OCF_ERR_CONFIGURED and "[cluster]" in r.stderr, r.stderr
    # a config Bastion rejects: Bastion's own message comes through
    bad = tmp_path / "bad.toml"
    bad.write_text(configs["n1"].read_text().replace('lease = "file"', 'lease = "zookeeper"'))
    r = agent.run("validate-all", OCF_RESKEY_config=str(bad))
    assert r.returncode == OCF_ERR_CONFIGURED and "lease must be" in r.stderr, r.stderr
    # data_dir missing (shared storage not mounted): refused, the daemon would create an empty one
    unmounted = tmp_path / "unmounted.toml"
    unmounted.write_text(configs["n1"].read_text().replace(str(tmp_path / "var"), str(tmp_path / "mnt" / "var")))
    r = agent.run("validate-all", OCF_RESKEY_config=str(unmounted))
    assert r.returncode == OCF_ERR_INSTALLED and "shared storage" in r.stderr, r.stderr
    r = agent.run("start", OCF_RESKEY_config=str(unmounted))
    assert r.returncode == OCF_ERR_INSTALLED and not (tmp_path / "mnt").exists()
    # no bastion executable
    r = agent.run("validate-all", OCF_RESKEY_bastion=str(tmp_path / "no-bastion"))
    assert r.returncode == OCF_ERR_INSTALLED and "not found" in r.stderr
    # a probe on a node where nothing is installed: "not running", never an error
    assert agent.rc("monitor", OCF_RESKEY_config=str(tmp_path / "nowhere.toml"),
                    OCF_RESKEY_CRM_meta_interval="0") == OCF_NOT_RUNNING

    # start when the listen address is taken: fails fast with the daemon's reason, no process left
    with socket.socket() as s:
        s.bind(("127.0.0.1", agent.port))
        s.listen()
        t0 = time.monotonic()
        r = agent.run("start")
        assert r.returncode == OCF_ERR_GENERIC, r.stderr
        assert "already in use" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 45
    assert agent.rc("monitor") == OCF_NOT_RUNNING and not agent.pidfile.exists()
