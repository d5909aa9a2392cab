"""Encrypted repositories (issue 15): backups through a real daemon and the CLI, secrets from the
config, options and environment, tamper detection, key slots and their crash safety.

Every object but the marker and the key slots is sealed (AES-256-GCM, its name as associated
data); chunks are named by HMAC-SHA256 under the name key. The tests look at the repository's
files as an attacker would: no name equals a plaintext chunk's SHA-256, no plaintext appears,
and any edit, truncation or swap is a named error, never a crash and never restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from support import PY, DaemonProc, check_bank, dump, free_port, write_config

MARK = "Quokka-7f3e9a1c-plaintext-marker-that-must-never-reach-the-repository"
PASS = "correct horse battery staple 71c2"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
    e.update(env or {})
    return subprocess.run([PY, "-m", "bastion", *args], capture_output=True, text=True, cwd=cwd, env=e,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _mark_rows(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT, pad BLOB)")
    con.executemany("INSERT INTO notes(body, pad) VALUES(?, randomblob(3000))",
                    [(f"{MARK} #{i}",) for i in range(300)])
    con.commit()
    con.close()


class Setup:
    def __init__(self, tmp: Path, bank_app, repo: Path, passphrase: str = PASS, encrypted_config: bool = True):
        self.tmp, self.bank, self.repo = tmp, bank_app, repo
        self.pw = tmp / "passphrase"
        self.pw.write_text(passphrase + "\n")
        self.port = free_port()
        backups = {"repository": f"file://{repo}"}
        if encrypted_config:
            backups["passphrase_file"] = str(self.pw)
        self.cfg = write_config(tmp, self.port, {"bank": [str(bank_app.bank), str(bank_app.audit)]},
                                sections={"backups": backups}, extra="[contops]\ngate_timeout = \"10s\"\n")
        self.daemon: DaemonProc | None = None

    def start(self) -> DaemonProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
        self.daemon = DaemonProc(self.cfg, self.port, self.tmp / "var", env=env).start()
        return self.daemon

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return _cli("--config", str(self.cfg), *args, cwd=self.tmp, env=env)


@pytest.fixture
def enc(tmp_path, bank):
    s = Setup(tmp_path, bank, tmp_path / "repo")
    _mark_rows(bank.bank)
    s.start()
    yield s
    assert s.daemon is not None
    s.daemon.stop()
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()


def _backup(s: Setup) -> dict:
    r = s.cli("backup", "bank", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_encrypted_backup_restores_exact_content_and_leaks_nothing(enc, tmp_path):
    # the first backup creates the repository, encrypted because a passphrase is configured
    enc.bank.start()
    b1 = _backup(enc)
    enc.bank.stop()
    b2 = _backup(enc)
    marker = json.loads((enc.repo / "bastion-repo.json").read_text())
    assert marker["encryption"]["cipher"] == "aes-256-gcm" and PASS not in json.dumps(marker)
    # restore through the CLI (secret from the config): exact content, integrity ok
    out = tmp_path / "restored"
    r = enc.cli("restore", b2["backup"], "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert dump(out / "bank.db") == dump(enc.bank.bank) and dump(out / "audit.db") == dump(enc.bank.audit)
    res = check_bank(out)
    assert res["ok"], res
    con = sqlite3.connect(out / "bank.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM notes WHERE body LIKE ?", (MARK + "%",)).fetchone()[0] == 300
    con.close()
    # the backup taken while the bank wrote is consistent too
    out1 = tmp_path / "restored1"
    assert enc.cli("restore", b1["backup"], "--to", str(out1)).returncode == 0
    assert check_bank(out1)["ok"]
    # every command works on it: list, full verify, drill, prune
    lst = json.loads(enc.cli("backups", "list", "--json").stdout)
    assert [b["id"] for b in lst["backups"]] == sorted([b1["backup"], b2["backup"]])
    v = enc.cli("verify", "--all", "--full", "--json")
    assert v.returncode == 0, v.stderr
    assert all(b["ok"] for b in json.loads(v.stdout)["backups"])
    d = enc.cli("drill", "bank", "--json")
    assert d.returncode == 0 and json.loads(d.stdout)["ok"], d.stdout + d.stderr
    p = enc.cli("prune", "--keep-last", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert [b["id"] for b in json.loads(p.stdout)["removed"]] == [b1["backup"]]
    assert enc.cli("restore", b2["backup"], "--to", str(tmp_path / "after-prune")).returncode == 0
    # names: no object is named by the SHA-256 of a plaintext chunk (format 1 would be)
    data = enc.bank.bank.read_bytes()
    plain = {hashlib.sha256(data[i:i + 256 * 1024]).hexdigest() for i in range(0, len(data), 256 * 1024)}
    files = _files(enc.repo)
    chunk_names = {Path(n).name for n in files if n.startswith("chunks/")}
    assert chunk_names and not chunk_names & plain
    # content: neither page content, nor table names, nor the database's path appears anywhere
    for name, body in files.items():
        for needle in (MARK.encode(), b"CREATE TABLE", str(enc.bank.bank).encode(), PASS.encode()):
            assert needle not in body, (name, needle)
        if not (name == "bastion-repo.json" or name.startswith("keys/")):
            assert body[:4] == b"BSE\x01", name
    # the secret is in no answer and no log
    st = enc.cli("status", "--json")
    assert PASS not in st.stdout + st.stderr
    assert enc.daemon is not None and enc.daemon.log is not None and PASS not in enc.daemon.log.read_text()


def test_a_repository_in_clear_really_shows_what_the_encrypted_one_hides(tmp_path, bank):
    """The control of the test above: the same checks find the marker and the names in clear."""
    s = Setup(tmp_path, bank, tmp_path / "repo", encrypted_config=False)
    _mark_rows(bank.bank)
    s.start()
    try:
        _backup(s)
    finally:
        assert s.daemon is not None
        s.daemon.stop()
    data = bank.bank.read_bytes()
    plain = {hashlib.sha256(data[i:i + 256 * 1024]).hexdigest() for i in range(0, len(data), 256 * 1024)}
    files = _files(s.repo)
    assert {Path(n).name for n in files if n.startswith("chunks/")} & plain
    assert any(str(bank.bank).encode() in body for body in files.values())


def test_wrong_or_missing_secret_is_a_clear_error_and_writes_nothing(enc, tmp_path):
    b = _backup(enc)
    before = _files(enc.repo)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    out = tmp_path / "restored"
    for args in (("--passphrase-file", str(wrong)), ("--key-file", str(enc.pw))):
        for cmd in (("restore", b["backup"], "--to", str(out)), ("verify", "--all"), ("backups", "list"),
                    ("prune", "--keep-last", "1")):
            r = enc.cli(*cmd, *args)
            assert r.returncode == 3, (cmd, args, r.stdout, r.stderr)
            assert "opens none of the key slots" in r.stderr and "hint: " in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and PASS not in r.stderr + r.stdout
    # --json: the error still goes to stderr, with nothing secret
    r = enc.cli("verify", "--all", "--json", "--passphrase-file", str(wrong))
    assert r.returncode == 3 and r.stdout == "" and "not the passphrase" not in r.stderr
    # no secret at all (a config without one, no environment): KeyRequired, saying what to give
    bare = write_config(tmp_path, free_port(), {"bank": [str(enc.bank.bank)]}, name="bare.toml")
    r = _cli("--config", str(bare), "verify", "--all", "--repo", f"file://{enc.repo}", cwd=tmp_path)
    assert r.returncode == 3 and "encrypted repository and no passphrase" in r.stderr, r.stderr
    assert "--passphrase-file" in r.stderr and "BASTION_REPO_PASSPHRASE" in r.stderr
    # the environment supplies it
    r = _cli("--config", str(bare), "backups", "list", "--repo", f"file://{enc.repo}", "--json", cwd=tmp_path,
             env={"BASTION_REPO_PASSPHRASE": PASS})
    assert r.returncode == 0 and b["backup"] in r.stdout, r.stderr
    r = _cli("--config", str(bare), "backups", "list", "--repo", f"file://{enc.repo}", cwd=tmp_path,
             env={"BASTION_REPO_PASSPHRASE_FILE": str(wrong)})
    assert r.returncode == 3 and "BASTION_REPO_PASSPHRASE_FILE" in r.stderr
    assert not out.exists()
    # a daemon whose configured passphrase is wrong: its backup fails, nothing is written
    enc.pw.write_text("a passphrase someone changed\n")
    r = enc.cli("backup", "bank", "--json")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "opens none of the key slots" in r.stdout + r.stderr
    assert _files(enc.repo) == before


def test_a_repository_in_clear_is_refused_when_a_secret_is_configured(tmp_path, bank):
    """Downgrade: whoever can write the repository could replace it by one in clear."""
    s = Setup(tmp_path, bank, tmp_path / "repo", encrypted_config=False)
    r = _cli("repo", "init", f"file://{s.repo}", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["encrypted"] is False, r.stderr
    r = s.cli("backups", "list", "--passphrase-file", str(s.pw))
    assert r.returncode == 3 and "is not encrypted, but a secret is supplied" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# tampering


def _damage(repo: Path, kind: str, target: str, other: str) -> None:
    p = repo / target
    body = bytearray(p.read_bytes())
    if kind == "flip-start":
        body[4] ^= 0x01                     # in the nonce
    elif kind == "flip-middle":
        body[len(body) // 2] ^= 0x80
    elif kind == "flip-last":
        body[-1] ^= 0x01                    # in the tag
    elif kind == "truncate":
        body = body[: len(body) - 17]
    elif kind == "swap":
        body = bytearray((repo / other).read_bytes())     # another object's bytes under this name
    p.write_bytes(bytes(body))


@pytest.mark.parametrize("kind", ["flip-start", "flip-middle", "flip-last", "truncate", "swap"])
def test_tampered_objects_are_named_corruption_never_restored(enc, tmp_path, kind):
    b = _backup(enc)
    enc.daemon.stop()   # type: ignore[union-attr]
    chunks = sorted(str(p.relative_to(enc.repo)) for p in (enc.repo / "chunks").rglob("*") if p.is_file())
    assert len(chunks) >= 2
    url = f"file://{enc.repo}"
    _damage(enc.repo, kind, chunks[0], chunks[1])
    v = enc.cli("verify", b["backup"], "--repo", url, "--json")
    assert v.returncode == 2, v.stdout + v.stderr
    problems = json.loads(v.stdout)["problems"]
    assert any(p.get("chunk") == Path(chunks[0]).name and "authentication" in p["problem"] for p in problems), problems
    out = tmp_path / f"r-{kind}"
    r = enc.cli("restore", b["backup"], "--to", str(out), "--from", url)
    assert r.returncode == 2 and "fails authentication" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (out / "bank.db").exists()
    # the manifest: damaged, named, and verify/list/prune say so without a crash
    manifest = f"manifests/{b['backup']}.json"
    other = next(str(p.relative_to(enc.repo)) for p in (enc.repo / "verified").glob("*.json"))
    _damage(enc.repo, kind, manifest, other)
    v = enc.cli("verify", b["backup"], "--repo", url, "--json")
    assert v.returncode == 2 and "fails authentication" in v.stdout, v.stdout + v.stderr
    lst = enc.cli("backups", "list", "--repo", url, "--json")
    assert "fails authentication" in lst.stdout and "Traceback" not in lst.stderr, lst.stdout + lst.stderr
    pr = enc.cli("prune", "--keep-last", "1", "--repo", url)
    assert pr.returncode == 2 and "damaged" in pr.stderr and "removes nothing" in pr.stderr, pr.stderr


# ----------------------------------------------------------------------------------------------
# key slots


def _slots(s: Setup, url: str) -> list[dict]:
    r = s.cli("repo", "key", "list", "--repo", url, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["slots"]


def test_key_add_remove_passwd_round_trip(tmp_path, bank):
    s = Setup(tmp_path, bank, tmp_path / "repo", encrypted_config=False)
    url = f"file://{s.repo}"
    pw1, pw2, pw3 = (tmp_path / f"pw{i}" for i in (1, 2, 3))
    for i, p in enumerate((pw1, pw2, pw3), 1):
        p.write_text(f"passphrase number {i}\n")
    kf = tmp_path / "repo.key"
    r = s.cli("repo", "init", url, "--encrypt", "--json")
    assert r.returncode == 3 and "no passphrase or key file" in r.stderr and not s.repo.exists()
    r = s.cli("repo", "init", url, "--encrypt", "--passphrase-file", str(pw1), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["slots"]
    assert [x["kind"] for x in first] == ["passphrase"] and "salt" not in json.dumps(first)
    assert s.cli("repo", "init", url, "--passphrase-file", str(pw1)).returncode == 3     # exists already
    # a backup into it (the daemon's config names pw1), then more slots
    s.cfg.write_text(s.cfg.read_text().replace(f'repository = "{url}"',
                                               f'repository = "{url}"\npassphrase_file = "{pw1}"'))
    d = s.start()
    try:
        b = _backup(s)
    finally:
        d.stop()
    r = s.cli("repo", "key", "add", "--repo", url, "--passphrase-file", str(pw2), "--new-passphrase-file", str(pw1))
    assert r.returncode == 3 and "opens none" in r.stderr      # adding needs a secret that opens it
    r = s.cli("repo", "key", "add", "--repo", url, "--passphrase-file", str(pw1), "--new-passphrase-file", str(pw2),
              "--json")
    assert r.returncode == 0, r.stderr
    r = s.cli("repo", "key", "add", "--repo", url, "--passphrase-file", str(pw2), "--new-key-file", str(kf), "--json")
    assert r.returncode == 0, r.stderr
    assert kf.stat().st_mode & 0o777 == 0o600 and len(kf.read_bytes()) == 32
    slots = _slots(s, url)
    assert sorted(x["kind"] for x in slots) == ["key_file", "passphrase", "passphrase"]

    def opens(*secret: str) -> bool:
        r = _cli("backups", "list", "--repo", url, "--json", *secret, cwd=tmp_path)
        assert r.returncode in (0, 3), r.stderr
        return r.returncode == 0 and b["backup"] in r.stdout

    assert opens("--passphrase-file", str(pw1)) and opens("--passphrase-file", str(pw2))
    assert opens("--key-file", str(kf)) and not opens("--passphrase-file", str(pw3))
    # passwd: pw2 -> pw3; pw2 stops working, pw3 works, the others are untouched
    r = s.cli("repo", "key", "passwd", "--repo", url, "--passphrase-file", str(pw2), "--new-passphrase-file",
              str(pw3), "--json")
    assert r.returncode == 0, r.stderr
    changed = json.loads(r.stdout)
    assert changed["removed"] not in [x["id"] for x in changed["slots"]]
    assert not opens("--passphrase-file", str(pw2)) and opens("--passphrase-file", str(pw3))
    assert opens("--passphrase-file", str(pw1)) and opens("--key-file", str(kf))
    # passwd naming a slot the secret does not open: refused, nothing changed
    other = next(x["id"] for x in _slots(s, url) if x["kind"] == "key_file")
    r = s.cli("repo", "key", "passwd", other, "--repo", url, "--passphrase-file", str(pw1),
              "--new-passphrase-file", str(pw2))
    assert r.returncode == 3 and len(_slots(s, url)) == 3
    # remove: down to one slot, never zero
    ids = {x["kind"] + str(i): x["id"] for i, x in enumerate(_slots(s, url))}
    kf_id = next(v for k, v in ids.items() if k.startswith("key_file"))
    r = s.cli("repo", "key", "remove", kf_id, "--repo", url, "--passphrase-file", str(pw1), "--json")
    assert r.returncode == 0, r.stderr
    assert not opens("--key-file", str(kf))
    pw3_slot = changed["added"]
    assert s.cli("repo", "key", "remove", pw3_slot, "--repo", url, "--passphrase-file", str(pw3)).returncode == 0
    last = _slots(s, url)
    assert len(last) == 1
    r = s.cli("repo", "key", "remove", last[0]["id"], "--repo", url, "--passphrase-file", str(pw1))
    assert r.returncode == 3 and "last key slot" in r.stderr
    r = s.cli("repo", "key", "remove", "nosuchid", "--repo", url, "--passphrase-file", str(pw1))
    assert r.returncode == 3 and "no key slot" in r.stderr
    out = tmp_path / "restored"
    assert s.cli("restore", b["backup"], "--to", str(out), "--from", url, "--passphrase-file", str(pw1)).returncode == 0
    assert dump(out / "bank.db") == dump(bank.bank)


def test_kill9_during_key_changes_always_leaves_a_working_slot(tmp_path, bank):
    s = Setup(tmp_path, bank, tmp_path / "repo", encrypted_config=True)
    url = f"file://{s.repo}"
    d = s.start()
    try:
        b = _backup(s)
    finally:
        d.stop()
    current = s.pw
    rng = random.Random(15)
    killed = 0
    for round_ in range(10):
        new = tmp_path / f"new{round_}"
        new.write_text(f"rotated passphrase {round_}\n")
        e = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
        p = subprocess.Popen([PY, "-m", "bastion", "repo", "key", "passwd", "--repo", url, "--passphrase-file",
                              str(current), "--new-passphrase-file", str(new)], cwd=tmp_path, env=e,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait(60)
        works = [pw for pw in (current, new)
                 if _cli("backups", "list", "--repo", url, "--passphrase-file", str(pw), cwd=tmp_path).returncode == 0]
        assert works, f"round {round_}: no passphrase opens the repository"
        current = works[-1]
        # each interrupted change may leave its old slot beside the new one (both open the repository;
        # `repo key list` shows it, `repo key remove` takes it away), never a half-written slot
        slots = _slots(s, url)
        assert 1 <= len(slots) <= 1 + killed and not any(x["damaged"] for x in slots), slots
    assert killed >= 2, "no key change was interrupted: the timing does not exercise the crash"
    out = tmp_path / "restored"
    r = _cli("restore", b["backup"], "--to", str(out), "--from", url, "--passphrase-file", str(current), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(out / "bank.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert dump(out / "bank.db") == dump(bank.bank)


@pytest.mark.parametrize("kind", ["sftp", "s3"])
def test_encrypted_repository_over_sftp_and_s3(tmp_path, bank, request, monkeypatch, kind):
    if kind == "sftp":
        srv = request.getfixturevalue("sshd_server")
        root = tmp_path / "sftp-repo"
        url = srv.url(str(root))

        def objects() -> dict[str, bytes]:
            return _files(root)
    else:
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)      # the CLI and the daemon inherit them
        bucket = s3.create_bucket(f"bastion-enc-{os.getpid()}-{random.randrange(1 << 30)}")
        url = s3.url(bucket, "repo")

        def objects() -> dict[str, bytes]:
            c = s3.client()
            keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
            return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    pw = tmp_path / "pw"
    pw.write_text(PASS)
    _mark_rows(bank.bank)
    r = _cli("repo", "init", url, "--encrypt", "--passphrase-file", str(pw), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       sections={"backups": {"repository": url, "passphrase_file": str(pw)}})
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        r = _cli("--config", str(cfg), "backup", "bank", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        b = json.loads(r.stdout)
    finally:
        d.stop()
    out = tmp_path / "restored"
    r = _cli("--config", str(cfg), "restore", b["backup"], "--to", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert dump(out / "bank.db") == dump(bank.bank)
    objs = objects()
    assert any("chunks/" in n for n in objs) and any(n.endswith("bastion-repo.json") for n in objs)
    for name, body in objs.items():
        assert MARK.encode() not in body and str(bank.bank).encode() not in body, name
    r = _cli("verify", "--all", "--repo", url, "--passphrase-file", str(tmp_path / "nope"), cwd=tmp_path / "var")
    assert r.returncode == 3 and "cannot read the passphrase file" in r.stderr, r.stderr


def test_per_database_secret_and_a_clear_repository_side_by_side(tmp_path, bank):
    """[databases.NAME] passphrase_file applies to that database's repository only; another
    database's repository, with no secret configured, stays in clear and keeps working."""
    pw = tmp_path / "bank.pass"
    pw.write_text("per-database passphrase\n")
    enc_repo, clear_repo = tmp_path / "bank-repo", tmp_path / "shared-repo"
    port = free_port()
    cfg = write_config(tmp_path, port, {
        "bank": {"files": [str(bank.bank)], "repository": f"file://{enc_repo}", "passphrase_file": str(pw)},
        "audit": [str(bank.audit)]}, sections={"backups": {"repository": f"file://{clear_repo}"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
    d = DaemonProc(cfg, port, tmp_path / "var", env=env).start()
    try:
        for name in ("bank", "audit"):
            r = _cli("--config", str(cfg), "backup", name, "--json", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
    finally:
        d.stop()
    assert "encryption" in json.loads((enc_repo / "bastion-repo.json").read_text())
    assert "encryption" not in json.loads((clear_repo / "bastion-repo.json").read_text())
    for name, repo in (("bank", enc_repo), ("audit", clear_repo)):
        r = _cli("--config", str(cfg), "backups", "list", name, "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        bid = json.loads(r.stdout)["backups"][0]["id"]
        out = tmp_path / f"restored-{name}"
        r = _cli("--config", str(cfg), "restore", bid, "--to", str(out), "--from", f"file://{repo}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        src = bank.bank if name == "bank" else bank.audit
        assert dump(out / src.name) == dump(src)
    # the bank's repository without the config (./bastion.toml would be read: another directory)
    (tmp_path / "elsewhere").mkdir()
    r = _cli("backups", "list", "--repo", f"file://{enc_repo}", cwd=tmp_path / "elsewhere")
    assert r.returncode == 3 and "no passphrase or key file" in r.stderr and "per-database" not in r.stderr


def _on_terminal(args: list[str], answers: list[str], cwd: Path) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, typing each answer when a prompt ends with ': '."""
    import pty
    e = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(PY, [PY, "-m", "bastion", *args], e)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if pending and seen.endswith(b": "):      # a prompt waiting (getpass echoes no answer)
            os.write(fd, pending.pop(0).encode() + b"\n")
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_the_cli_asks_for_passphrases_on_a_terminal(tmp_path):
    url = f"file://{tmp_path / 'repo'}"
    code, text = _on_terminal(["repo", "init", url, "--encrypt"], ["typed secret 1", "typed secret 2"], tmp_path)
    assert code == 3 and "differ" in text and not (tmp_path / "repo").exists(), text
    code, text = _on_terminal(["repo", "init", url, "--encrypt"], ["typed secret", "typed secret"], tmp_path)
    assert code == 0 and "encrypted" in text, text
    code, text = _on_terminal(["backups", "list", "--repo", url], ["typed secret"], tmp_path)
    assert code == 0 and "passphrase of" in text, text
    code, text = _on_terminal(["backups", "list", "--repo", url], ["mistyped"], tmp_path)
    assert code == 3 and "opens none of the key slots" in text and "mistyped" not in text.split("passphrase of")[-1]


def test_scheduled_backups_and_verify_go_into_the_encrypted_repository(tmp_path, bank):
    """The daemon's own schedule (no CLI involved) backs up into the encrypted repository with the
    configured secret, and keeps doing so after the passphrase of its slot is changed in the config."""
    from support import wait_for
    pw = tmp_path / "pw"
    pw.write_text(PASS)
    repo = tmp_path / "repo"
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       sections={"backups": {"repository": f"file://{repo}", "passphrase_file": str(pw),
                                             "schedule": "every 2s"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_REPO_")}
    d = DaemonProc(cfg, port, tmp_path / "var", env=env).start()
    try:
        wait_for(lambda: len(list((repo / "manifests").glob("*.json"))) >= 1 if repo.exists() else False, 60,
                 "a scheduled backup")
        # the passphrase changes: slot rotated with the CLI, then the file the daemon reads
        new = tmp_path / "new"
        new.write_text("the new passphrase")
        r = _cli("repo", "key", "passwd", "--repo", f"file://{repo}", "--passphrase-file", str(pw),
                 "--new-passphrase-file", str(new), cwd=tmp_path / "var")
        assert r.returncode == 0, r.stderr
        pw.write_text("the new passphrase")
        n = len(list((repo / "manifests").glob("*.json")))
        wait_for(lambda: len(list((repo / "manifests").glob("*.json"))) > n + 1, 60, "scheduled backups after passwd")
    finally:
        d.stop()
    assert "encryption" in json.loads((repo / "bastion-repo.json").read_text())
    r = _cli("verify", "--all", "--repo", f"file://{repo}", "--passphrase-file", str(pw), "--json", cwd=tmp_path)
    assert r.returncode == 0 and all(b["ok"] for b in json.loads(r.stdout)["backups"]), r.stdout + r.stderr


def test_an_edited_marker_does_not_cut_the_repository_off_from_its_key(tmp_path, monkeypatch):
    """The marker is in clear: its repository id edited, the slots (which carry the id,
    authenticated) still open, and the objects sealed under the true id still read."""
    from bastion.backup import keys
    from bastion.backup.repository import Repository
    pw = tmp_path / "pw"
    pw.write_text(PASS)
    url = f"file://{tmp_path / 'repo'}"
    keys.configure(passphrase_file=str(pw))
    try:
        keys.init(url, True)
        repo = Repository.open(url)
        cid, _ = repo.put_chunk(b"some page content " * 100)
        marker = tmp_path / "repo" / "bastion-repo.json"
        m = json.loads(marker.read_text())
        m["encryption"]["repository_id"] = "0" * 32
        marker.write_text(json.dumps(m))
        assert Repository.open(url).get_chunk(cid) == b"some page content " * 100
        assert keys.add_slot(url, keys.Secret("passphrase", b"second", "test"))["added"]
        keys.configure()
        for var in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(keys.KeyRequired):
            Repository.open(url)
    finally:
        keys.configure()


def test_an_encrypted_format2_repository_is_incremental_restores_and_leaks_nothing(tmp_path, bank):
    """Format 2 (page packs) under the sealing layer: packs and indexes are sealed like chunks, an
    incremental still stores only what changed, restore and full verify read through the seal."""
    s = Setup(tmp_path, bank, tmp_path / "repo")
    s.cfg.write_text(s.cfg.read_text().replace("[backups]\n", "[backups]\nformat = 2\n", 1))
    _mark_rows(bank.bank)
    s.start()
    try:
        b1 = _backup(s)
        con = sqlite3.connect(bank.bank)
        con.execute("UPDATE notes SET body = body || ' changed' WHERE id % 100 = 0")
        con.commit()
        con.close()
        b2 = _backup(s)
        marker = json.loads((s.repo / "bastion-repo.json").read_text())
        assert marker["format"] == 2 and marker["encryption"]["cipher"] == "aes-256-gcm"
        assert b2["stored_bytes_added"] < b1["stored_bytes_added"] / 5, (b1, b2)
        files = _files(s.repo)
        assert any(n.startswith("packs/") for n in files), sorted(files)
        for name, body in files.items():
            assert MARK.encode() not in body and b"CREATE TABLE" not in body, name
        out = tmp_path / "restored"
        r = s.cli("restore", b2["backup"], "--to", str(out), "--json")
        assert r.returncode == 0, r.stderr
        assert dump(out / "bank.db") == dump(bank.bank) and dump(out / "audit.db") == dump(bank.audit)
        con = sqlite3.connect(out / "bank.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        v = s.cli("verify", "--all", "--full", "--json")
        assert v.returncode == 0, v.stderr
        info = json.loads(s.cli("repo", "info", "--json").stdout)
        assert info["format"] == 2 and info["encrypted"] is True and info["backups"] == 2
        # a flipped byte in a pack is named damage, never restored
        pack = next(s.repo / n for n in sorted(files) if n.startswith("packs/"))
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 1
        pack.write_bytes(bytes(raw))
        r = s.cli("restore", b2["backup"], "--to", str(tmp_path / "bad"), "--json")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "bad" / "bank.db").exists()
    finally:
        assert s.daemon is not None
        s.daemon.stop()
