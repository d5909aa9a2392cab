"""Defects an outside review found in operations: refused starts that leave files behind,
missing files reported as protected, a primary that logs every peer request, cluster hooks
given as strings that never ran, `bastion sql` against a passive node, and a demo that was
flaky and could not run twice at once. Real daemons, real files, real processes."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from support import PY, DaemonProc, free_port, serve_refused, wait_for, write_config
from support.cluster import Node, active_of, make_cluster, start_pair, token_of


# -- 6. a refused start removes what it created; a second daemon is refused by pid ------------

def test_refused_start_port_in_use_leaves_no_lock_and_no_new_files(tmp_path, bank):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # a fresh data_dir: nothing of it may remain
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        cfg = write_config(fresh, port, {"bank": [str(bank.bank), str(bank.audit)]})
        p = serve_refused(cfg)
        assert p.returncode != 0 and "already in use" in p.stderr, p.stderr
        assert not (fresh / "var").exists(), list((fresh / "var").iterdir())
        # a data_dir of an earlier run: what was there stays, nothing is added (no daemon.lock)
        used = tmp_path / "used"
        used.mkdir()
        cfg2 = write_config(used, free_port(), {"bank": [str(bank.bank), str(bank.audit)]})
        d = DaemonProc(cfg2, int(re.search(r":(\d+)", cfg2.read_text()).group(1)), used / "var").start()
        d.stop()
        before = sorted(x.name for x in (used / "var").iterdir())
        cfg2.write_text(cfg2.read_text().replace(f"127.0.0.1:{d.port}", f"127.0.0.1:{port}"))
        p = serve_refused(cfg2)
        assert p.returncode != 0 and "already in use" in p.stderr, p.stderr
        after = sorted(x.name for x in (used / "var").iterdir())
        assert "daemon.lock" not in after
        assert after == before, (before, after)
        assert {"state.db", "token"} <= set(after)


def test_refused_start_bad_config_found_after_the_lock_removes_what_it_made(tmp_path, bank):
    fresh = tmp_path / "n"
    fresh.mkdir()
    cfg = write_config(fresh, free_port(), {"bank": {"files": [bank.bank, bank.audit], "replica_of": "bank"}},
                       extra=f'[replication]\npeer_token_file = "{tmp_path / "missing.token"}"\n')
    p = serve_refused(cfg)
    assert p.returncode == 3 and "peer token file" in p.stderr, p.stderr
    assert not (fresh / "var").exists(), sorted(x.name for x in (fresh / "var").iterdir())
    # and the same config fixed starts (nothing left over stands in the way)
    (tmp_path / "missing.token").write_text(secrets.token_hex(32) + "\n")
    d = DaemonProc(cfg, int(re.search(r":(\d+)", cfg.read_text()).group(1)), fresh / "var").start()
    d.stop()


def test_second_daemon_on_the_same_data_dir_is_refused_naming_the_pid(tmp_path, daemon):
    other = tmp_path / "other.toml"
    other.write_text(daemon.config.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{free_port()}"))
    p = serve_refused(other)
    assert p.returncode != 0
    assert f"pid {daemon.proc.pid}" in p.stderr and "already running" in p.stderr, p.stderr
    # the running daemon is untouched: its lock still names it, it still answers
    assert (daemon.data_dir / "daemon.lock").read_text().split()[0] == str(daemon.proc.pid)
    assert daemon.api("GET", "/v1/status").status_code == 200
    daemon.stop()
    assert not (daemon.data_dir / "daemon.lock").exists()      # a clean stop removes it too
    d2 = DaemonProc(other, int(re.search(r":(\d+)", other.read_text()).group(1)), daemon.data_dir).start()
    try:
        assert (daemon.data_dir / "daemon.lock").read_text().split()[0] == str(d2.proc.pid)
    finally:
        d2.stop()


# -- 7. a configured file that does not exist is missing, never protected -----------------------

def test_missing_files_are_reported_missing_with_a_hint_not_protected(tmp_path, bank):
    missing = tmp_path / "app" / "later.db"
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)], "later": [str(missing)]})
    d = DaemonProc(cfg, port, tmp_path / "var", log_level=None).start()
    try:
        banner = d.log.read_text()
        assert "2 of 3 file(s) protected" in banner and f"missing: {missing}" in banner, banner
        st = d.cli("status", "--json").json
        files = {f["path"]: f for db in st["databases"] for f in db["files"]}
        assert files[str(missing)]["protected"] is False and files[str(missing)]["state"] == "missing"
        assert "does not exist" in files[str(missing)]["hint"]
        assert files[str(bank.bank)]["state"] == "protected"
        human = d.cli("status")
        assert "MISSING" in human.out and "hint:" in human.err, (human.out, human.err)
        # a protected file removed afterwards: the daemon still holds it open, yet it is missing
        os.remove(bank.audit)
        st = d.cli("status", "--json").json
        f = {f["path"]: f for db in st["databases"] for f in db["files"]}[str(bank.audit)]
        assert f["protected"] is False and f["state"] == "missing", f
    finally:
        d.stop()


# -- 5. peer, replication and health requests are not logged at INFO ---------------------------

def test_a_replicating_pair_logs_little_at_info(tmp_path, bank):
    token_file = tmp_path / "peer.token"
    token_file.write_text(secrets.token_hex(32) + "\n")
    repl = f'[replication]\npeer_token_file = "{token_file}"\n'
    bdir, pdir = tmp_path / "backup", tmp_path / "primary"
    bdir.mkdir()
    pdir.mkdir()
    copy = bdir / "copy"
    bport, pport = free_port(), free_port()
    bcfg = write_config(bdir, bport, {"bank": {"files": [copy / "bank.db", copy / "audit.db"], "replica_of": "bank"}},
                        extra=repl)
    pcfg = write_config(pdir, pport, {"bank": {"files": [bank.bank, bank.audit],
                                               "replicate_to": f"http://127.0.0.1:{bport}",
                                               "replicate_schedule": "continuous"}}, extra=repl)
    backup = DaemonProc(bcfg, bport, bdir / "var", log_level=None).start()
    primary = DaemonProc(pcfg, pport, pdir / "var", log_level=None).start()
    try:
        bank.start()
        # replication is under way: the replica has received transfers
        wait_for(lambda: (copy / "bank.db").exists() and _transfers(copy / "bank.db") > 0, 60, "replica seeded")
        n0 = [len(primary.log.read_text().splitlines()), len(backup.log.read_text().splitlines())]
        t0 = _transfers(copy / "bank.db")
        time.sleep(4)
        for _ in range(20):               # health polling, as a load balancer does
            httpx.get(f"http://127.0.0.1:{pport}/v1/health", timeout=5)
        assert _transfers(copy / "bank.db") > t0, "replication did not go on"
        n1 = [len(primary.log.read_text().splitlines()), len(backup.log.read_text().splitlines())]
        grew = [b - a for a, b in zip(n0, n1)]
        print(f"log lines in 4 s of replication + 20 health checks (primary, backup): {grew}")
        assert max(grew) <= 10, (grew, primary.log.read_text()[-3000:], backup.log.read_text()[-3000:])
    finally:
        if bank.proc and bank.proc.poll() is None:
            bank.proc.kill()
            bank.proc.wait()
        primary.stop()
        backup.stop()


def _transfers(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
        finally:
            con.close()
    except (sqlite3.Error, TypeError):
        return 0


# -- 2. cluster hooks: strings through the shell, lists as argv, output and failures logged ----

def test_cluster_hooks_run_strings_through_the_shell_and_log_output_and_failures(tmp_path, bank):
    hooks = tmp_path / "hooks.log"
    ports = [free_port(), free_port()]
    peers = ", ".join(f'n{i + 1} = "127.0.0.1:{p}"' for i, p in enumerate(ports))
    # A slow promote hook (longer than the ttl): the lease must keep being renewed meanwhile.
    promote = f"echo promoted $BASTION_NODE $BASTION_TOKEN >> {hooks}; echo promote-output-$BASTION_NODE; sleep 3"
    demote = f"echo demoted $BASTION_NODE $BASTION_TOKEN >> {hooks}; echo demote-went-wrong >&2; exit 7"
    cluster = (f'[cluster]\nname = "h"\nlease = "file"\nttl = "1s"\npeers = {{ {peers} }}\n'
               f"on_promote = {json.dumps(promote)}\non_demote = {json.dumps(demote)}\n")
    n1, n2 = [Node(tmp_path, f"n{i + 1}", p, [bank.bank, bank.audit], cluster) for i, p in enumerate(ports)]
    # n2's promote hook is a list: argv, no shell ($HOME stays as written, the space stays in one argument)
    argv = [PY, "-c", "import os, sys; open(sys.argv[1], 'a').write(f\"argv {os.environ['BASTION_NODE']} "
            "{os.environ['BASTION_TOKEN']} {sys.argv[2]}\\n\")", str(hooks), "$HOME two words"]
    n2.config.write_text(n2.config.read_text().replace(f"on_promote = {json.dumps(promote)}",
                                                       f"on_promote = {json.dumps(argv)}"))
    try:
        n1.start()
        wait_for(lambda: n1.health().get("role") == "active", 30, "n1 active")
        time.sleep(2.0)                  # the promote hook still sleeps: n1 must stay writable
        assert n1.health().get("writable") is True, "a slow hook stopped the lease renewals"
        wait_for(lambda: hooks.exists() and "promoted n1" in hooks.read_text(), 30, "n1's promote hook")
        assert re.search(r"^promoted n1 \d+$", hooks.read_text(), re.M), hooks.read_text()
        wait_for(lambda: "promote-output-n1" in n1.log.read_text(), 30, "the hook's output in the log")
        n2.start()
        wait_for(lambda: n2.health().get("role") == "passive", 30, "n2 passive")
        r = subprocess.run([PY, "-m", "bastion", "--config", str(n1.config), "cluster", "switchover", "--to", "n2",
                            "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: active_of([n1, n2]) == [n2], 30, "n2 active")
        wait_for(lambda: "demoted n1" in hooks.read_text() and "argv n2" in hooks.read_text(), 30, "hooks")
        text = hooks.read_text()
        assert re.search(r"^demoted n1 \d+$", text, re.M), text        # the token n1 held
        assert re.search(r"^argv n2 \d+ \$HOME two words$", text, re.M), text
        # the failing demote hook: its output and its exit code in n1's log, and in cluster status
        wait_for(lambda: "demote-went-wrong" in n1.log.read_text(), 30, "the failing hook's output")
        log = n1.log.read_text()
        assert re.search(r"ERROR .*on_demote hook exited with code 7", log), log[-2000:]
        st = httpx.get(f"http://127.0.0.1:{n1.port}/v1/cluster/status",
                       headers={"Authorization": f"Bearer {token_of(tmp_path)}"}, timeout=10).json()
        assert "on_demote hook exited with code 7" in (st.get("last_error") or ""), st
        # stopping the active node runs its demote hook before the process exits
        n2.stop()
        assert "demoted n2" in hooks.read_text(), hooks.read_text()
    finally:
        n1.stop()
        n2.stop()


# -- 3. `bastion sql` on a passive node follows the active one, or says which it is ------------

def test_sql_on_a_passive_node_follows_the_active_or_names_it(tmp_path, bank):
    n1, n2 = make_cluster(tmp_path, bank, 2, ("file",))
    try:
        active, passive = start_pair(n1, n2)
        r = subprocess.run([PY, "-m", "bastion", "--config", str(passive.config), "sql", "bank", "-c",
                            "SELECT count(*) FROM accounts", "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["results"][0]["rows"] == [[200]]
        # a config that knows no other node: the passive node says which node is active, and what to do
        alone = tmp_path / "alone.toml"
        alone.write_text(re.sub(r"peers = \{[^}]*\}", "peers = {}", passive.config.read_text()))
        r = subprocess.run([PY, "-m", "bastion", "--config", str(alone), "sql", "bank", "-c", "SELECT 1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert f"this node ({passive.name}) is passive; the active node is {active.name}" in r.stderr, r.stderr
        assert "--dsn" in r.stderr and "not running" not in r.stderr, r.stderr
        # and a daemon that is not running is called that
        for n in (n1, n2):
            n.stop()
        r = subprocess.run([PY, "-m", "bastion", "--config", str(alone), "sql", "bank", "-c", "SELECT 1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "is the daemon running? nothing answers" in r.stderr, r.stderr
    finally:
        for n in (n1, n2):
            n.stop()


# -- 4. the DSN is documented: every option the driver reads, and the examples parse ----------

def test_the_dsn_section_documents_every_option_the_driver_reads():
    import inspect
    from bastion.client import connection
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "sql.md").read_text()
    assert "## The DSN" in text
    section = text.split("## The DSN", 1)[1].split("\n## ", 1)[0]
    read = set(re.findall(r'opts\.get\("(\w+)"', inspect.getsource(connection.connect)))
    assert {"token_file", "tls", "ca"} <= read, read
    for opt in read:
        assert f"`{opt}=" in section, f"DSN option {opt} is not documented in docs/sql.md"
    for needed in ("USER[:PASSWORD]@", "$BASTION_PASSWORD", "bastions://", "8750", "[users]"):
        assert needed in section, needed
    block = section.split("Examples:", 1)[1].split("```")[1]
    examples = re.findall(r"^(bastions?://\S+)", block, re.M)
    assert len(examples) >= 3, block
    assert any("token_file=" in e for e in examples) and any("," in e.split("/")[2] for e in examples)
    for e in examples:
        d = connection.parse_dsn(e)
        assert d["hosts"] and d["database"] == "bank", e
    guide = (root / "docs" / "user-guide.md").read_text()
    assert "token_file=" in guide and "sql.md#the-dsn" in guide


# -- 1. the demo: not flaky, two runs at once, port 8750 taken ------------------------------------

def _demo(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "bastion.demo"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _proved(out: str) -> int:
    m = re.search(r"^(\d+) of (\d+) claims proved; everything started was stopped\.$", out, re.M)
    assert m and m[1] == m[2], out[-4000:]
    # continuous operations, freeze, backup/verify/restore and the restored copy are all there
    for what in ("tar copy passes PRAGMA integrity_check", "exactly the frozen state", "verify --full",
                 "restored copy passes PRAGMA integrity_check", "the live database's rows"):
        assert f"OK   {what}" in out or re.search(rf"OK   .*{re.escape(what)}", out), (what, out[-4000:])
    return int(m[2])


@pytest.mark.timeout(900)
def test_demo_twice_at_once_both_prove_every_claim(tmp_path):
    procs = [_demo(tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=800)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert _proved(out) >= 15
    ports = [re.search(r"listening on 127\.0\.0\.1:(\d+)", o)[1] for o in outs]
    dirs = [re.search(r"^run directory: (\S+)", o, re.M)[1] for o in outs]
    assert ports[0] != ports[1] and dirs[0] != dirs[1], (ports, dirs)
    assert list((tmp_path / "var" / "demo").iterdir()) == []       # a run that proved everything cleans up


@pytest.mark.timeout(600)
def test_demo_with_port_8750_taken(tmp_path):
    taker = socket.socket()
    try:
        try:
            taker.bind(("127.0.0.1", 8750))
            taker.listen(1)
        except OSError:
            pass                          # taken by someone else: taken all the same
        p = _demo(tmp_path)
        out = p.communicate(timeout=500)[0]
    finally:
        taker.close()
    assert p.returncode == 0, out[-4000:]
    _proved(out)
    assert "port 8750 is taken" in out
    assert "listening on 127.0.0.1:8750" not in out


def test_admin_commands_on_a_passive_node_name_the_active_one(tmp_path, bank):
    n1, n2 = make_cluster(tmp_path, bank, 2, ("file",))
    try:
        active, passive = start_pair(n1, n2)
        r = subprocess.run([PY, "-m", "bastion", "--config", str(passive.config), "status"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0
        assert f"node {passive.name} is passive" in r.stderr, r.stderr
        assert f"the active node is {active.name} at 127.0.0.1:{active.port}" in r.stderr, r.stderr
    finally:
        for n in (n1, n2):
            n.stop()
