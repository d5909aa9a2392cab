"""Backup targets: one suite over file://, sftp:// (a real OpenSSH sshd) and s3:// (moto's S3 server).

The servers run on loopback, started by the tests (tests/support/servers.py). Faults are
real: sshd killed and restarted, the S3 server frozen with SIGSTOP, a writer
process killed with SIGKILL in the middle of an upload, wrong keys, a missing
bucket, a port nobody listens on.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest

from bastion.backup.manifest import Manifest
from bastion.backup.repository import NoRepository, Repository
from bastion.backup.store import ObjectMissing, StoreRefused, StoreUnreachable, open_store
from bastion.errors import UsageError
from bastion.position import Instant
from support import check_bank, dump
from support.servers import AWS_CLEARED, MotoS3, Sshd, closed_port

PY = sys.executable


@dataclass
class Target:
    kind: str
    make_url: Callable[[str], str]
    server: Any = None
    root: Path | None = None     # where the objects land on this machine (file, sftp)

    def url(self, name: str) -> str:
        return self.make_url(name)


def _target(kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    if kind == "file":
        return Target(kind, lambda name: f"file://{tmp_path}/file/{name}", root=tmp_path / "file")
    if kind == "sftp":
        srv: Sshd = request.getfixturevalue("sshd_server")
        return Target(kind, lambda name: srv.url(f"{tmp_path}/sftp/{name}"), srv, root=tmp_path / "sftp")
    s3: MotoS3 = request.getfixturevalue("s3_server")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)       # the daemon and CLI children inherit them: credentials the AWS way
    bucket = s3.create_bucket(f"bastion-{uuid.uuid4().hex[:12]}")
    return Target(kind, lambda name: s3.url(bucket, name), s3)


@pytest.fixture(params=["file", "sftp", "s3"])
def target(request, tmp_path, monkeypatch) -> Target:
    return _target(request.param, request, tmp_path, monkeypatch)


@pytest.fixture(params=["sftp", "s3"])
def remote(request, tmp_path, monkeypatch) -> Target:
    return _target(request.param, request, tmp_path, monkeypatch)


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, str, float]:
    """The CLI on a machine with no config and no daemon: only what the arguments say."""
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "bastion", *args], capture_output=True, text=True, cwd=cwd,
                       env=env if env is not None else os.environ.copy(), timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


# ----------------------------------------------------------------------------------------------
# object semantics


def test_put_get_exists_list_delete(target):
    s = open_store(target.url("repo"))
    try:
        assert list(s.list("chunks")) == [] and list(s.list("")) == []
        assert not s.exists("manifests/a.json")
        with pytest.raises(ObjectMissing):
            s.read("manifests/a.json")
        s.delete("manifests/a.json")      # deleting what is not there is not an error
        blobs = {"chunks/ab/ab01": os.urandom(300_000), "chunks/cd/cd02": b"", "chunksx/other": b"x",
                 "manifests/a.json": b'{"id": "a"}', "top": b"t"}
        with ThreadPoolExecutor(4) as pool:    # parallel writers, as a backup's uploads are
            list(pool.map(lambda kv: s.write(*kv), blobs.items()))
        for name, data in blobs.items():
            assert s.exists(name) and s.read(name) == data, name
        assert sorted(s.list("chunks")) == ["chunks/ab/ab01", "chunks/cd/cd02"]   # not chunksx/
        assert sorted(s.list("manifests")) == ["manifests/a.json"]
        assert sorted(s.list("")) == sorted(blobs)
        assert list(s.list("nothing-here")) == []
        s.write("manifests/a.json", b'{"id": "a", "v": 2}')
        assert s.read("manifests/a.json") == b'{"id": "a", "v": 2}'
        s.delete("chunks/ab/ab01")
        assert not s.exists("chunks/ab/ab01") and sorted(s.list("chunks")) == ["chunks/cd/cd02"]
        with pytest.raises(ObjectMissing):
            s.read("chunks/ab/ab01")
        assert s.temporaries() == []
    finally:
        s.close()
    other = open_store(target.url("repo"))   # a second client sees exactly the same objects
    try:
        assert sorted(other.list("")) == sorted(set(blobs) - {"chunks/ab/ab01"})
    finally:
        other.close()


def test_repository_on_target(target):
    url = target.url("repo")
    with pytest.raises(NoRepository):
        Repository.open(url)
    repo = Repository.open(url, create=True)
    data = os.urandom(100_000)
    digest, stored = repo.put_chunk(data)
    assert stored > 0 and repo.chunk_digests() == {digest}
    again = Repository.open(url)
    assert again.get_chunk(digest) == data and again.url == url.rstrip("/")


def test_sftp_hashed_known_hosts_entry_is_accepted(sshd_server, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd_server.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert "127.0.0.1" not in kh.read_text()        # hashed, as OpenSSH's HashKnownHosts writes them
    s = open_store(sshd_server.url(f"{tmp_path}/repo", known_hosts=kh))
    s.write("x", b"1")
    assert s.read("x") == b"1"
    s.close()


def test_s3_endpoint_from_the_environment(s3_server, monkeypatch):
    """AWS_ENDPOINT_URL_S3, the SDK's own variable, instead of ?endpoint_url=."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    bucket = s3_server.create_bucket(f"bastion-{uuid.uuid4().hex[:12]}")
    s = open_store(f"s3://{bucket}/repo")
    s.write("manifests/x.json", b"{}")
    assert list(s.list("manifests")) == ["manifests/x.json"]
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["repo/manifests/x.json"]
    s.close()


def test_overwrite_is_atomic_for_concurrent_readers(target):
    """A reader never sees half an object, even while it is being replaced."""
    s = open_store(target.url("repo"))
    a, b = b"a" * 1_000_000, b"b" * 1_000_000
    s.write("manifests/m.json", a)
    stop, ready = threading.Event(), threading.Event()
    seen = {"a": 0, "b": 0}
    bad: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            d = s.read("manifests/m.json")      # this thread's own connection (sftp)
            ready.set()
            if d == a:
                seen["a"] += 1
            elif d == b:
                seen["b"] += 1
            else:
                bad.append(len(d))
    t = threading.Thread(target=reader)
    t.start()
    try:
        assert ready.wait(60)
        deadline = time.monotonic() + 30
        i = 0
        # replace until the reader has caught both versions a few times (bounded)
        while (min(seen.values()) < 3 or i < 6) and time.monotonic() < deadline:
            s.write("manifests/m.json", b if i % 2 == 0 else a)
            i += 1
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(60)
    assert bad == [], f"reader saw partial objects of sizes {bad[:5]}"
    assert seen["a"] > 0 and seen["b"] > 0, seen
    assert s.temporaries() == []
    s.close()


_WRITER = """
import os, sys
from bastion.backup.store import open_store
s = open_store(sys.argv[1])
data = os.urandom(int(sys.argv[2]))
print("start", flush=True)
s.write("manifests/big.json", data)
print("done", flush=True)
"""


def test_killed_writer_leaves_nothing_half_written(remote, tmp_path):
    """kill -9 in the middle of an upload: the name never appears with partial content."""
    url = remote.url("repo")
    size = 64_000_000 if remote.kind == "sftp" else 24_000_000
    p = subprocess.Popen([PY, "-c", _WRITER, url, str(size)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "start"
        if remote.kind == "sftp":
            # the server's directory is on this machine: wait until the temporary is half there
            mdir = remote.root / "repo" / "manifests"
            deadline = time.monotonic() + 30
            while True:
                temps = list(mdir.glob("big.json.tmp-*")) if mdir.exists() else []
                if temps and temps[0].stat().st_size > 1_000_000:
                    break
                assert time.monotonic() < deadline and p.poll() is None, \
                    "no temporary grew beside manifests/big.json: is the upload written through a temp name?"
                time.sleep(0.005)
        else:
            # the S3 server stops answering before the PUT can complete: in flight when the writer dies
            thawed = remote.server.freeze(2.0)
            time.sleep(1.0)
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
        p.wait(10)
        if remote.kind == "s3":
            thawed.join(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        p.stdout.close()
    assert "done" not in rest, "the upload finished before the kill: the test proved nothing"
    s = open_store(url)
    try:
        assert not s.exists("manifests/big.json")
        assert list(s.list("manifests")) == []          # a temporary is never listed as an object
        if remote.kind == "sftp":
            temps = s.temporaries()
            assert len(temps) == 1 and temps[0].startswith("manifests/big.json.tmp-"), temps
            s.delete(temps[0])                          # what prune does with them
            assert s.temporaries() == []
    finally:
        s.close()


def test_sftp_write_is_fsynced_then_renamed_on_the_server(sshd_server, tmp_path):
    """The server's own request log: temp file made private, written, fsync@openssh.com, closed, posix-rename."""
    url = sshd_server.url(f"{tmp_path}/repo")
    repo = Repository.open(url, create=True)
    start = sshd_server.sftp_log.stat().st_size if sshd_server.sftp_log.exists() else 0
    at = Instant(1_764_770_107.5)
    repo.put_manifest(Manifest(1, "m1", "d", at, at.iso, (), 0))
    repo.store.close()
    final = f"{tmp_path}/repo/manifests/m1.json"
    lines = [ln for ln in sshd_server.sftp_log.read_bytes()[start:].decode(errors="replace").splitlines()
             if "m1.json" in ln]
    tmp = lines[0].split('"')[1]
    assert tmp.startswith(final + ".tmp-"), lines
    kinds = [ln.split()[0] for ln in lines]
    # "set" is the fchmod to 0600 of the still empty temporary, before any byte is written
    assert kinds == ["open", "set", "fsync", "close", "posix-rename"], lines
    assert f'posix-rename old "{tmp}" new "{final}"' in lines[-1]
    assert json.loads(Path(final).read_text())["id"] == "m1"
    assert Path(final).stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------------------------------------
# faults


def test_transient_outage_is_ridden_out(remote):
    """The server goes away in the middle of parallel uploads and comes back: every upload lands."""
    if remote.kind == "sftp":
        url = remote.url("repo")
    else:
        # short time-outs, so that a call cannot simply wait for the server to come back: only a retry can
        url = remote.server.url(remote.url("repo").split("/")[2], "repo", read_timeout="1", connect_timeout="1")
    s = open_store(url)
    s.write("warm", b"up")        # connected: from here on, trouble counts as transient
    blobs = {f"chunks/{i:02x}/{i:064x}": os.urandom(200_000) for i in range(12)}
    outage = 2.0 if remote.kind == "sftp" else 3.0
    logins = remote.server.logins() if remote.kind == "sftp" else 0
    t0 = time.monotonic()
    if remote.kind == "sftp":
        back = remote.server.outage(outage)    # sshd and all its connections killed, restarted later
    else:
        back = remote.server.freeze(outage)    # S3 server stops answering (time-outs), resumes later
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: s.write(*kv), blobs.items()))
    took = time.monotonic() - t0
    back.join(30)
    assert took >= outage * 0.9, f"uploads finished in {took:.1f} s, before the outage ended"
    for name, data in blobs.items():
        assert s.read(name) == data
    if remote.kind == "sftp":
        # reconnected after the restart, several connections at once: uploads run in parallel
        assert remote.server.logins() - logins >= 2
    s.close()


def test_sftp_connections_killed_mid_transfer_are_reopened(sshd_server, tmp_path):
    """The server side of each connection dies while large uploads are under way (the listener stays)."""
    s = open_store(sshd_server.url(f"{tmp_path}/repo"))
    blobs = {f"chunks/{i:02x}/{i:064x}": os.urandom(4_000_000) for i in range(8)}
    killed: list[int] = []

    def killer() -> None:       # as soon as the upload connections are up, kill them all
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(sshd_server.connections()) >= 3:
                killed.append(sshd_server.drop_connections())
                return
            time.sleep(0.01)
    k = threading.Thread(target=killer)
    k.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: s.write(*kv), blobs.items()))
    k.join(30)
    assert killed and killed[0] >= 3
    for name, data in blobs.items():    # this thread's connection was killed too: reopened on use
        assert s.read(name) == data
    # interrupted attempts may leave temporaries (prune removes them); they are never listed
    assert sorted(s.list("chunks")) == sorted(blobs)
    s.close()


CASES = ["sftp-unreachable", "sftp-wrong-key", "sftp-unknown-host-key", "sftp-password-in-url",
         "s3-unreachable", "s3-wrong-credentials", "s3-missing-bucket", "s3-no-credentials", "s3-unknown-option"]


def _failure_case(case: str, request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[str, type, list[str], Callable[[], int]]:
    """(url, error type, texts the message and hint must contain, requests the server saw so far)."""
    path = f"{tmp_path}/repo"
    if case.startswith("sftp"):
        srv: Sshd = request.getfixturevalue("sshd_server")
        seen = lambda: srv.log.read_text(errors="replace").count("Connection from")  # noqa: E731
        if case == "sftp-unreachable":
            port = closed_port()
            return srv.url(path, port=port), StoreUnreachable, [
                f"cannot connect to 127.0.0.1:{port}", "gave up after 3 attempts", "server is up"], seen
        if case == "sftp-wrong-key":
            return srv.url(path, key=srv.other_key), StoreRefused, ["refused the login", "authorized_keys"], seen
        if case == "sftp-unknown-host-key":
            empty = tmp_path / "known_hosts"
            empty.write_text("")
            return srv.url(path, known_hosts=empty), StoreRefused, [
                "host key of [127.0.0.1]", "is not in", f"ssh-keyscan -p {srv.port} 127.0.0.1"], seen
        return f"sftp://{srv.user}:secret@127.0.0.1:{srv.port}{path}", UsageError, [
            "password in the URL", "BASTION_SFTP_PASSWORD"], seen
    s3: MotoS3 = request.getfixturevalue("s3_server")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3.create_bucket(f"bastion-{uuid.uuid4().hex[:12]}")
    seen = lambda: s3.log.read_text(errors="replace").count(f"/{bucket}")  # noqa: E731
    if case == "s3-unreachable":
        port = closed_port()
        return s3.url(bucket, "repo", endpoint_url=f"http://127.0.0.1:{port}"), StoreUnreachable, [
            f"cannot talk to http://127.0.0.1:{port}", "gave up after 3 attempts"], seen
    if case == "s3-wrong-credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        return s3.url(bucket, "repo"), StoreRefused, ["refused access to bucket", "check the credentials"], seen
    if case == "s3-missing-bucket":
        bucket = "bastion-no-such-bucket"
        return s3.url(bucket, "repo"), StoreRefused, [f"bucket '{bucket}' does not exist", "aws s3 mb"], seen
    if case == "s3-no-credentials":
        for k in AWS_CLEARED:
            monkeypatch.delenv(k, raising=False)
        return s3.url(bucket, "repo"), StoreRefused, ["no AWS credentials", "AWS_ACCESS_KEY_ID"], seen
    return s3.url(bucket, "repo") + "&endpont_url=x", UsageError, ["unknown option(s) endpont_url",
                                                                    "endpoint_url"], seen


@pytest.mark.parametrize("case", CASES)
def test_permanent_failures_are_reported_clearly(case, request, tmp_path, monkeypatch):
    """What is wrong and what to do; a refusal is not retried, an unreachable server is, briefly."""
    url, kind, says, seen = _failure_case(case, request, tmp_path, monkeypatch)
    before = seen()
    t0 = time.monotonic()
    with pytest.raises(kind) as info:
        Repository.open(url)
    took = time.monotonic() - t0
    text = f"{info.value.message}\nhint: {info.value.hint}"
    for s in says:
        assert s in text, (s, text)
    assert info.value.hint and "secret" not in text
    assert info.value.exit_code == (3 if kind is UsageError else 2)
    assert took < 30
    if kind is StoreRefused and case != "s3-no-credentials":
        time.sleep(0.2)   # let the server finish its log line
        assert seen() - before == 1, "a permanent refusal was retried"


@pytest.mark.parametrize("case", ["sftp-wrong-key", "s3-missing-bucket"])
def test_cli_reports_store_failures_on_stderr(case, request, tmp_path, monkeypatch):
    url, _, says, _ = _failure_case(case, request, tmp_path, monkeypatch)
    args = (["backups", "list", "--repo", url, "--json"] if case.startswith("sftp") else
            ["restore", "20260101T000000Z-abcdef", "--from", url, "--to", str(tmp_path / "out")])
    rc, out, err, _ = _cli(*args, cwd=tmp_path)
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") and says[0] in err and "\nhint: " in err and "Traceback" not in err
    assert out == "" and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# end to end: the daemon backs up to the remote while the application writes; a fresh machine restores


def test_backup_while_writing_then_restore_from_url_alone(remote, daemon, bank, tmp_path):
    url = remote.url("bank-repo")
    con = sqlite3.connect(bank.bank)      # ~2.5 MB the application does not touch: a dozen chunks
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big VALUES(?, randomblob(4000))", [(i,) for i in range(600)])
    con.commit()
    con.close()
    if remote.kind == "sftp":
        # a target that refuses: the daemon reports it clearly, with the hint, and carries on
        r = daemon.cli("backup", "bank", "--to", remote.server.url(f"{tmp_path}/x", key=remote.server.other_key))
        assert r.code == 2 and "refused the login" in r.err and "hint:" in r.err, r.err
    logins = remote.server.logins() if remote.kind == "sftp" else 0
    bank.start()
    r = daemon.cli("backup", "bank", "--to", url, "--json")
    assert r.code == 0, r.err
    first = r.json
    assert first["verified"] is True and first["chunks_new"] == first["chunks_total"] > 10
    assert first["repository"] == url
    if remote.kind == "sftp":
        # the daemon's connection, the reader's, and more than one upload connection at once
        assert remote.server.logins() - logins >= 4
    stats = bank.stop()
    assert stats["errors"] == {} and stats["commits"] > 0
    r = daemon.cli("backup", "bank", "--to", url, "--json")
    assert r.code == 0, r.err
    second = r.json
    # deduplicated against what the remote already holds: only the pages the application changed
    assert second["chunks_new"] < second["chunks_total"] // 2

    # a fresh machine: no config, no daemon, only the repository URL (and, for S3, credentials
    # in the environment the AWS way). The four commands only read: run them side by side.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    runs = {
        "list": ["backups", "list", "--repo", url, "--json"],
        "verify": ["verify", "--all", "--repo", url, "--json"],
        "during": ["restore", first["backup"], "--from", url, "--to", str(fresh / "during"), "--json"],
        "after": ["restore", second["backup"], "--from", url, "--to", str(fresh / "after"), "--json"],
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        done = dict(zip(runs, pool.map(lambda args: _cli(*args, cwd=fresh), runs.values())))
    for name, (rc, _out, err, _) in done.items():
        assert rc == 0, (name, err)
    listed = json.loads(done["list"][1])["backups"]
    assert [b["id"] for b in listed] == [first["backup"], second["backup"]]
    assert all(b["verified"].startswith("quick ok") for b in listed)
    assert json.loads(done["verify"][1])["ok"] is True

    res = check_bank(fresh / "during")
    assert res["ok"], res
    assert 0 < res["transfers"] <= stats["commits"]
    assert check_bank(fresh / "after")["ok"]
    assert dump(fresh / "after" / "bank.db") == dump(bank.bank)
    assert dump(fresh / "after" / "audit.db") == dump(bank.audit)
