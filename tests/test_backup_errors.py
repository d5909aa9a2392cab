"""The backup path fails clearly and safely (issue: repository targets and backup errors).

Faults are real: a repository on a 1 MiB tmpfs that fills up, the same tmpfs remounted
read-only, a directory made immutable (chattr +i: refused even to root), a writer killed
with SIGKILL mid-object, hand-edited manifests. The tmpfs lives in a private mount
namespace (`unshare -m`) that only the daemon sees, so nothing on this machine changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.backup.repository import Repository
from bastion.backup.store import TMP_MARK, open_store
from support import DaemonProc, check_bank, dump, free_port, serve_refused, write_config

PY = sys.executable
BAD_URLS = {
    "ftp://backup.example/x": "unsupported scheme 'ftp://'",
    "memory://bastion/x": "unsupported scheme 'memory://'",
    "gcs://bucket/x": "unsupported scheme 'gcs://'",
    "http://127.0.0.1:1/x": "unsupported scheme 'http://'",
    "file:///tmp/bastion-never?compress=1": "unknown option(s) compress",
    "file://backups/x": "needs an absolute path",
    "s3://bucket/x?endpont_url=http://x": "unknown option(s) endpont_url",
}


def _run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bastion", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _fill(db: Path, mib: int) -> None:
    """Incompressible rows: the repository needs about as many bytes as the file has."""
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big(blob) VALUES(randomblob(64000))", [()] * (mib * 16))
    con.commit()
    con.close()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# repository URLs


def test_unsupported_urls_are_refused_by_every_command(daemon, tmp_path):
    """Never a backup "stored" in the daemon's memory, never a traceback: exit 3 and the supported list."""
    for url, says in BAD_URLS.items():
        for args in (["backup", "bank", "--to", url], ["restore", "20260101T000000Z-abcdef", "--from", url,
                                                        "--to", str(tmp_path / "out")],
                     ["verify", "--all", "--repo", url], ["prune", "--keep-last", "1", "--repo", url],
                     ["backups", "list", "--repo", url]):
            r = daemon.cli(*args)
            assert r.code == 3, (args, r.code, r.out, r.err)
            assert r.err.startswith("error: ") and says in r.err and "\nhint: " in r.err, (args, r.err)
            assert "Traceback" not in r.err and "internal error" not in r.err
    # the daemon refuses too, whatever sends it the URL
    resp = daemon.api("POST", "/v1/backups", {"targets": ["bank"], "to": "memory://x/y"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "UsageError", resp.text
    assert "file://" in resp.json()["error"]["hint"]
    assert daemon.cli("backups", "list", "--json").json["backups"] == []
    assert not (tmp_path / "out").exists() and not Path("/tmp/bastion-never").exists()


@pytest.mark.parametrize("where", ["backups", "database"])
def test_config_with_a_bad_repository_url_does_not_start(tmp_path, bank, where):
    port = free_port()
    url = "memory://x" if where == "backups" else "file:///srv/b?mode=0644"
    extra = f'[backups]\nrepository = "{url}"\n' if where == "backups" else ""
    db = {"files": [bank.bank], **({"repository": url} if where == "database" else {})}
    cfg = write_config(tmp_path, port, {"bank": db}, extra=extra)
    try:
        p = serve_refused(cfg, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon started with an unusable repository URL")
    assert p.returncode == 3, p.stderr
    section = "[backups] repository" if where == "backups" else "[databases.bank] repository"
    assert section in p.stderr and ("unsupported scheme" in p.stderr or "unknown option(s) mode" in p.stderr)
    assert "hint: " in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------------------
# private objects


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files = {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}
    dirs = {p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")] if p.is_dir()}
    return files, dirs


@pytest.mark.parametrize("kind", ["file", "sftp"])
def test_backups_of_a_private_database_are_private(daemon, bank, tmp_path, request, kind):
    for f in (bank.bank, bank.audit):
        os.chmod(f, 0o600)
    root = tmp_path / "repo-sub" / "repo"      # two directories the store creates
    url = f"file://{root}" if kind == "file" else request.getfixturevalue("sshd_server").url(str(root))
    r = daemon.cli("backup", "bank", "--to", url, "--json")
    assert r.code == 0, r.err
    files, dirs = _modes(root)
    assert len(_files(root)) >= 4
    assert files == {0o600}, [(p, oct(p.stat().st_mode)) for p in root.rglob("*")]
    assert dirs == {0o700} and (tmp_path / "repo-sub").stat().st_mode & 0o777 == 0o700
    # the default repository too
    assert daemon.cli("backup", "bank").code == 0
    files, dirs = _modes(tmp_path / "var" / "backups")
    assert files == {0o600} and dirs == {0o700}


# ----------------------------------------------------------------------------------------------
# disk full, read-only, not writable: the real thing


class NsDaemon(DaemonProc):
    """A daemon in its own mount namespace, with a small tmpfs at ``small`` that only it sees."""

    small: Path

    def command(self) -> list[str]:
        inner = f"mount -t tmpfs -o size=1m,mode=0700 bastion-test {self.small} && exec {PY} -m bastion serve " \
                f"--log-level debug --config {self.config}"
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]

    def inside(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command in the daemon's mount namespace (where the tmpfs is)."""
        assert self.proc is not None
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *cmd], capture_output=True, text=True,
                              check=check, timeout=120)


@pytest.fixture
def ns_daemon(tmp_path, bank):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("a private tmpfs needs root with unshare and nsenter (util-linux)")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=1m bastion-probe {tmp_path}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       extra="[contops]\ngate_timeout = \"10s\"\n")
    d = NsDaemon(cfg, port, tmp_path / "var")
    d.small = tmp_path / "small"
    d.small.mkdir()
    d.start()
    yield d
    d.stop()


def test_disk_full_read_only_then_room_again(ns_daemon, bank, tmp_path):
    d = ns_daemon
    _fill(bank.bank, 3)                      # 3 MiB of random bytes onto a 1 MiB file system
    url = f"file://{d.small}/repo"
    r = d.cli("backup", "bank", "--to", url)
    assert r.code == 2, (r.code, r.out, r.err)
    assert r.err.startswith("error: ") and "Traceback" not in r.err and "internal error" not in r.err
    # the side that failed (the repository, not the database), what, how much
    assert "writing chunks/" in r.err and f"the repository at {url}: no space left" in r.err, r.err
    assert "bytes needed" in r.err and "more bytes (before compression) are needed" in r.err, r.err
    assert ", so up to 0 more" not in r.err
    assert "reading the database" not in r.err
    assert "hint: free space" in r.err
    # the daemon answers the same as a 507 with the error's type, not a bare 500
    resp = d.api("POST", "/v1/backups", {"targets": ["bank"], "to": url})
    assert resp.status_code == 507 and resp.json()["error"]["type"] == "StoreFull", resp.text
    # no manifest, no temporary left behind, nothing listed
    left = d.inside("find", str(d.small), "-type", "f").stdout.split()
    assert not [p for p in left if "/manifests/" in p or TMP_MARK in p], left
    lst = d.inside(PY, "-m", "bastion", "backups", "list", "--repo", url, "--json")
    assert json.loads(lst.stdout)["backups"] == []
    # the application's files are untouched and the daemon still works
    assert check_bank(bank.dir)["ok"]

    # read-only file system: named as such
    d.inside("mount", "-o", "remount,ro", str(d.small))
    r = d.cli("backup", "bank", "--to", url)
    assert r.code == 2 and "read-only" in r.err and "hint: remount" in r.err, r.err
    resp = d.api("POST", "/v1/backups", {"targets": ["bank"], "to": url})
    assert 400 <= resp.status_code < 600 and resp.json()["error"]["type"] == "StoreRefused", resp.text

    # room again: the same repository takes the backup, and it restores
    d.inside("mount", "-o", "remount,rw,size=64m", str(d.small))
    r = d.cli("backup", "bank", "--to", url, "--json")
    assert r.code == 0, r.err
    out = tmp_path / "restored"
    rr = d.inside(PY, "-m", "bastion", "restore", r.json["backup"], "--from", url, "--to", str(out), check=False)
    assert rr.returncode == 0, rr.stderr
    assert check_bank(out)["ok"] and dump(out / "bank.db") == dump(bank.bank)


def test_not_writable_repository_and_missing_database(daemon, bank, tmp_path, sshd_server):
    """Refused even to root: an immutable directory. Local and sftp say permission, with a hint."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("an immutable directory needs root and chattr")
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute (chattr +i)")
    try:
        for url, says in ((f"file://{locked}/repo", "permission denied"),
                          (sshd_server.url(f"{locked}/repo"), "permission denied on the server")):
            r = daemon.cli("backup", "bank", "--to", url)
            assert r.code == 2 and says in r.err and "hint: " in r.err, (url, r.err)
            assert "Traceback" not in r.err and "internal error" not in r.err
            resp = daemon.api("POST", "/v1/backups", {"targets": ["bank"], "to": url})
            assert 400 <= resp.status_code < 600 and resp.json()["error"]["type"] == "StoreRefused", resp.text
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)])
    # the database side: a file whose directory is gone is named as such
    r = daemon.cli("backup", str(tmp_path / "no-such-dir" / "x.db"))
    assert r.code in (2, 3) and "no-such-dir/x.db" in r.err and "internal error" not in r.err, r.err


# ----------------------------------------------------------------------------------------------
# temporaries of failed or killed writers

_HOLDER = """
import sys, time
from bastion.backup.store import _tmp_name
open(_tmp_name(sys.argv[1]), "wb").write(b"half")
print("held", flush=True)
time.sleep(600)
"""


def test_temporaries_of_dead_writers_are_cleaned_live_ones_kept(daemon, bank, tmp_path):
    """A killed backup's temporaries go with the next backup (and with prune); a live writer's stay."""
    root = tmp_path / "repo"
    url = f"file://{root}"
    assert daemon.cli("backup", "bank", "--to", url).code == 0
    (root / "chunks" / "ff").mkdir(exist_ok=True)
    # a writer killed with SIGKILL in the middle of its temporary (the kernel closes the file for it)
    killed = subprocess.Popen([PY, "-c", _HOLDER, str(root / "chunks" / "ff" / ("f" * 64))], stdout=subprocess.PIPE,
                              text=True)
    assert killed.stdout and killed.stdout.readline().strip() == "held"
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    killed.stdout.close()
    # a writer still at work
    live = subprocess.Popen([PY, "-c", _HOLDER, str(root / "manifests" / "x.json")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert live.stdout and live.stdout.readline().strip() == "held"
        temps = open_store(url).temporaries()
        assert len(temps) == 2, temps
        r = daemon.cli("backup", "bank", "--to", url, "--json")
        assert r.code == 0, r.err
        assert r.json["temporaries_removed"] == 1
        left = open_store(url).temporaries()
        assert len(left) == 1 and left[0].startswith("manifests/x.json" + TMP_MARK), left
        # prune keeps it too while its writer lives, and removes it once the writer is gone
        r = daemon.cli("prune", "--keep-last", "5", "--repo", url, "--json")
        assert r.code == 0 and r.json["temporaries_removed"] == 0, r.err
        assert open_store(url).temporaries() == left
    finally:
        live.kill()
        live.wait(10)
        if live.stdout:
            live.stdout.close()
    r = daemon.cli("prune", "--keep-last", "5", "--repo", url, "--json")
    assert r.code == 0 and r.json["temporaries_removed"] == 1, r.err
    assert open_store(url).temporaries() == []
    assert daemon.cli("verify", "--all", "--repo", url).code == 0


# ----------------------------------------------------------------------------------------------
# several databases


def test_backup_all_and_several_names_back_up_each_database(tmp_path, bank):
    port = free_port()
    gone = tmp_path / "gone-dir" / "gone.db"
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank)], "audit": [str(bank.audit)]})
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        r = d.cli("backup", "--all", "--json")
        assert r.code == 0, r.err
        got = r.json["backups"]
        assert sorted(b["database"] for b in got) == ["audit", "bank"] and r.json["failed"] == 0
        r = d.cli("backup", "audit", "bank")
        assert r.code == 0 and "of audit at" in r.out and "of bank at" in r.out, r.out
        listed = d.cli("backups", "list", "--json").json["backups"]
        assert sorted(b["database"] for b in listed) == ["audit", "audit", "bank", "bank"]
        for b in listed:     # each backup holds its own database's file, under its own name
            assert b["files"] == (["bank.db"] if b["database"] == "bank" else ["audit.db"])
        # one backup of a single database keeps the single result
        one = d.cli("backup", "bank", "--json")
        assert one.code == 0 and one.json["database"] == "bank" and "backup" in one.json
        # an unknown name: nothing is done at all
        r = d.cli("backup", "bank", "nope")
        assert r.code == 3 and "unknown database 'nope'" in r.err
        assert len(d.cli("backups", "list", "--json").json["backups"]) == 5
        # files named by path in one command are one group: one backup, one instant for both
        r = d.cli("backup", str(bank.bank), str(bank.audit), "--json")
        assert r.code == 0 and r.json["database"] == "bank.db,audit.db", r.out + r.err
        listed = d.cli("backups", "list", "--json").json["backups"]
        assert [b["files"] for b in listed if b["id"] == r.json["backup"]] == [["bank.db", "audit.db"]]
    finally:
        d.stop()
    # one database that cannot be backed up: the others are, exit 1; all failing: exit 2
    cfg.write_text(cfg.read_text() + f'\n[databases.gone]\nfiles = ["{gone}"]\n')
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        r = d.cli("backup", "--all", "--json")
        assert r.code == 1, r.err
        by = {b["database"]: b for b in r.json["backups"]}
        assert set(by) == {"audit", "bank", "gone"} and r.json["failed"] == 1
        assert by["bank"]["exit_code"] == 0 and "gone.db" in by["gone"]["error"]["message"]
        r = d.cli("backup", "--all")
        assert r.code == 1 and "backup of gone failed" in r.err and "of bank at" in r.out
        r = d.cli("backup", "gone", "--to", f"file://{tmp_path}/elsewhere")
        assert r.code == 2 and "gone.db" in r.err
    finally:
        d.stop()


# ----------------------------------------------------------------------------------------------
# progress


def test_progress_shows_bytes_of_the_total(daemon, bank, tmp_path):
    """On a terminal: "N MiB of M MiB" from the daemon's running-backup endpoint, never "0/?"."""
    if not shutil.which("script"):
        pytest.skip("needs script(1) for a terminal")
    _fill(bank.bank, 150)   # a copy and check of about a second here: several polls of the progress see it
    total = bank.bank.stat().st_size + bank.audit.stat().st_size
    cmd = f"{PY} -m bastion --config {daemon.config} backup bank"
    p = subprocess.run(["script", "-qfec", cmd, "/dev/null"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, COLUMNS="160", TERM="xterm"))
    assert p.returncode == 0, p.stdout
    screen = p.stdout.replace("\r", "\n")
    assert "0/?" not in screen, screen[-2000:]
    from bastion.cli import _fmt_bytes
    assert f"of {_fmt_bytes(total)}" in screen, screen[-3000:]
    assert re.search(r"bank: (starting|copying|ending|verifying)", screen), screen[-3000:]


# ----------------------------------------------------------------------------------------------
# prune on a damaged or hostile repository


def test_prune_on_a_hostile_repository_removes_nothing_and_says_why(daemon, bank, tmp_path):
    root = tmp_path / "repo"
    url = f"file://{root}"
    for _ in range(2):
        assert daemon.cli("backup", "bank", "--to", url).code == 0
    before = _files(root)
    repo = Repository.open(url)
    bid = repo.backup_ids()[0]
    m = json.loads((root / "manifests" / f"{bid}.json").read_text())
    m["files"][0]["chunks"] = "not a list of chunks"
    (root / "manifests" / f"{bid}.json").write_text(json.dumps(m))
    r = daemon.cli("prune", "--keep-last", "1", "--repo", url)
    assert r.code == 2 and "damaged" in r.err and "removes nothing" in r.err and "Traceback" not in r.err, r.err
    assert _files(root) == before
    # a stray file under chunks/ that is not a chunk name is never deleted by prune
    m["files"][0]["chunks"] = Repository.open(url).manifest(repo.backup_ids()[1]).to_json()["files"][0]["chunks"]
    (root / "manifests" / f"{bid}.json").write_text(json.dumps(m))
    (root / "chunks" / "zz").mkdir()
    (root / "chunks" / "zz" / "notes.txt").write_text("mine")
    r = daemon.cli("prune", "--keep-last", "1", "--repo", url, "--json")
    assert r.code == 0, r.err
    assert (root / "chunks" / "zz" / "notes.txt").read_text() == "mine"
