"""`bastion restore` cannot destroy, escape or misplace data.

Open files are refused (the lock probe names the holder), names and paths from a
manifest are checked, nothing is written outside the target directory, restored
files are private, a full disk is a clear error that leaves nothing behind, and
a kill -9 at any point leaves complete files under every final name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from support import PY, App, check_bank, dump, integrity


def _backup(daemon) -> dict:
    r = daemon.cli("backup", "bank", "--json")
    assert r.code == 0, r.err
    return r.json


def _repo(daemon) -> Path:
    return daemon.data_dir / "backups"


def _tree(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every name under root (not following links) with its type, size and mtime: to see any write."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if skip and Path(dirpath).is_relative_to(skip):
            continue
        for n in dirs + files:
            p = Path(dirpath) / n
            if skip and p.is_relative_to(skip):
                continue
            st = p.lstat()
            out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _forge(daemon, bid: str, new_id: str, edit) -> str:
    """A copy of a real manifest under another id, edited as someone with write access to the repository could."""
    src = _repo(daemon) / "manifests" / f"{bid}.json"
    m = json.loads(src.read_text())
    m["id"] = new_id
    edit(m)
    (_repo(daemon) / "manifests" / f"{new_id}.json").write_text(json.dumps(m))
    return new_id


def _marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries mark (a restore and the helpers it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"BASTION_TEST_MARK={mark}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _wait_gone(mark: str) -> None:
    """Wait until no process started for mark runs (a swap helper outlives a killed restore, by design)."""
    deadline = time.monotonic() + 60
    while _marked(mark):
        assert time.monotonic() < deadline, "a restore helper did not finish"
        time.sleep(0.05)


def _wait_unlocked(path: Path) -> None:
    """Wait until nobody holds the file exclusively (a swap helper that outlived a killed restore)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        con.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    finally:
        con.close()


# -- open files ------------------------------------------------------------------------------------------

def test_force_over_files_an_application_writes_is_refused_and_loses_no_commit(daemon, bank, tmp_path):
    b = _backup(daemon)
    # an application that Bastion does not protect, writing in the directory we are asked to restore into
    live = App(tmp_path / "live")
    subprocess.run([PY, "-m", "bastion.workload", "init", str(live.dir), "--accounts", "50"], check=True)
    live.start()
    time.sleep(0.5)
    r = daemon.cli("restore", b["backup"], "--to", str(live.dir), "--force")
    time.sleep(0.3)          # the writer keeps committing after the refusal
    stats = live.stop()
    assert r.code == 2, (r.out, r.err)
    assert f"process {live.proc.pid}" in r.err and "stop the application" in r.err, r.err
    assert stats["errors"] == {} and stats["commits"] > 0
    res = check_bank(live.dir)
    assert res["ok"], res
    assert res["transfers"] == stats["commits"], "acknowledged commits were lost"
    assert sorted(p.name for p in live.dir.iterdir() if "bastion" in p.name or "before-restore" in p.name) == []


def test_force_over_a_protected_database_is_refused_and_points_to_replace(daemon, bank, tmp_path):
    b = _backup(daemon)
    bank.start()
    time.sleep(0.3)
    stats = bank.stop()
    before = dump(bank.bank), dump(bank.audit)
    # the daemon holds its own connection on the configured files: the probe sees it
    r = daemon.cli("restore", b["backup"], "--to", str(bank.dir), "--force")
    assert r.code == 2, (r.out, r.err)
    assert f"process {daemon.proc.pid}" in r.err and "'bank'" in r.err and "--replace" in r.err, r.err
    assert (dump(bank.bank), dump(bank.audit)) == before
    assert check_bank(bank.dir)["transfers"] == stats["commits"]
    # in continuous operations the same, and --replace refuses too
    assert daemon.cli("startbu", "bank").code == 0
    r = daemon.cli("restore", b["backup"], "--to", str(bank.dir), "--force")
    assert r.code == 2 and f"process {daemon.proc.pid}" in r.err, r.err
    r = daemon.cli("restore", b["backup"], "--replace")
    assert r.code == 2 and "continuous operations" in r.err, r.err
    assert daemon.cli("endbu", "bank").code == 0
    # frozen: the same
    assert daemon.cli("freeze", "bank").code == 0
    r = daemon.cli("restore", b["backup"], "--to", str(bank.dir), "--force")
    assert r.code == 2 and f"process {daemon.proc.pid}" in r.err, r.err
    r = daemon.cli("restore", b["backup"], "--replace")
    assert r.code == 2 and "frozen" in r.err, r.err
    assert daemon.cli("thaw", "bank").code == 0
    assert (dump(bank.bank), dump(bank.audit)) == before
    assert not [p.name for p in bank.dir.iterdir() if "bastion" in p.name or "before-restore" in p.name]


def test_force_keeps_the_previous_files_and_their_wal_aside(daemon, bank, tmp_path):
    b = _backup(daemon)
    out = tmp_path / "restored"
    assert daemon.cli("restore", b["backup"], "--to", str(out)).code == 0
    restored = dump(out / "bank.db")
    con = sqlite3.connect(out / "bank.db")
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.close()
    # a writer that died: its WAL holds committed frames the main file does not have
    p = subprocess.run([PY, "-c", f"""
import sqlite3, os
con = sqlite3.connect({str(out / 'bank.db')!r}, isolation_level=None)
con.execute("PRAGMA wal_autocheckpoint=0")
con.execute("CREATE TABLE after_backup(x)")
con.execute("INSERT INTO after_backup VALUES (44)")
os._exit(0)
"""])
    assert p.returncode == 0 and (out / "bank.db-wal").stat().st_size > 0
    live = dump(out / "bank.db")          # main + WAL, as an application sees it
    r = daemon.cli("restore", b["backup"], "--to", str(out), "--force", "--json")
    assert r.code == 0, r.err
    assert dump(out / "bank.db") == restored
    assert not (out / "bank.db-wal").exists() or (out / "bank.db-wal").stat().st_size == 0
    kept = Path(r.json["files"][0]["previous_kept_as"])
    assert kept.parent == out and Path(f"{kept}-wal").exists()
    assert dump(kept) == live             # the old file with its WAL: every commit is still there


# -- names and paths from a repository ----------------------------------------------------------------

FORMS = {
    "dotdot": lambda m, t: m["files"][0].update(name="../escaped.db"),
    "absolute": lambda m, t: m["files"][0].update(name=str(t / "outside" / "abs.db")),
    "subdir": lambda m, t: m["files"][0].update(name="a/b.db"),
    "nul": lambda m, t: m["files"][0].update(name="x\x00y"),
    "dot": lambda m, t: m["files"][0].update(name="."),
    "dotdot-alone": lambda m, t: m["files"][0].update(name=".."),
    "backslash": lambda m, t: m["files"][0].update(name="..\\..\\x.db"),
    "wal-collision": lambda m, t: m["files"][1].update(name=m["files"][0]["name"] + "-wal"),
    "shm-collision": lambda m, t: m["files"][1].update(name=m["files"][0]["name"] + "-shm"),
    "duplicate": lambda m, t: m["files"][1].update(name=m["files"][0]["name"]),
    "case-duplicate": lambda m, t: m["files"][1].update(name=m["files"][0]["name"].upper()),
    "not-text": lambda m, t: m["files"][0].update(name=7),
}


def test_crafted_manifests_write_nothing_outside_the_target(daemon, bank, tmp_path):
    b = _backup(daemon)
    (tmp_path / "outside").mkdir()
    failures = []
    for i, (form, edit) in enumerate(FORMS.items()):
        bid = _forge(daemon, b["backup"], f"forged-{i}", lambda m, edit=edit: edit(m, tmp_path))
        target = tmp_path / f"target-{i}"
        before = _tree(tmp_path, skip=target)
        r = daemon.cli("restore", bid, "--to", str(target))
        after = _tree(tmp_path, skip=target)
        new = sorted(set(after) - set(before) - {str(target)})
        files = sorted(p.name for p in target.rglob("*")) if target.exists() else []
        if r.code == 0 or new or files or "refused" not in r.err:
            failures.append((form, r.code, new, files, r.err[-300:]))
    assert failures == []


@pytest.mark.parametrize("bad", ["../../../tmp/x", "/etc/passwd", "a/b", "..", "x\ny"])
def test_bad_backup_ids_on_the_command_line_are_refused(daemon, tmp_path, bad):
    _backup(daemon)
    out = tmp_path / "target"
    r = daemon.cli("restore", bad, "--to", str(out))
    assert r.code == 3 and "not a valid backup id" in r.err, (r.code, r.err)
    assert not out.exists()
    r = daemon.cli("restore", bad, "--replace")
    assert r.code in (2, 3) and "not a valid backup id" in r.err, (r.code, r.err)


def test_symlinks_planted_in_the_target_are_never_followed(daemon, bank, tmp_path):
    b = _backup(daemon)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "precious"
    victim.write_bytes(b"precious data")
    # DIR itself is a link leading elsewhere
    link_dir = tmp_path / "linkdir"
    link_dir.symlink_to(victim_dir)
    r = daemon.cli("restore", b["backup"], "--to", str(link_dir))
    assert r.code != 0 and "symbolic link" in r.err, r.err
    assert sorted(p.name for p in victim_dir.iterdir()) == ["precious"]
    # a link at a target name, at a companion name and at the (old, fixed) temporary name
    names = json.loads((_repo(daemon) / "manifests" / f"{b['backup']}.json").read_text())["files"]
    first = names[0]["name"]
    for planted in (first, first + "-wal", first + ".bastion-restore-tmp"):
        d = tmp_path / f"planted-{planted}"
        d.mkdir()
        (d / planted).symlink_to(victim)
        r = daemon.cli("restore", b["backup"], "--to", str(d), "--force")
        assert victim.read_bytes() == b"precious data", planted
        assert (d / planted).is_symlink() or r.code == 0, planted
        if planted != first + ".bastion-restore-tmp":
            assert r.code != 0 and "symbolic link" in r.err, (planted, r.err)
    assert sorted(p.name for p in victim_dir.iterdir()) == ["precious"]


def test_a_temp_name_taken_by_a_link_is_not_followed(daemon, bank, tmp_path, monkeypatch):
    """The temp file is created with O_EXCL|O_NOFOLLOW: even a link at the exact name it picks is not used."""
    import importlib
    from bastion.backup.repository import Repository
    mod = importlib.import_module("bastion.backup.restore")
    b = _backup(daemon)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "t"
    d.mkdir()
    monkeypatch.setattr(mod, "_tmp_name", lambda name: name + ".planted")
    for f in json.loads((_repo(daemon) / "manifests" / f"{b['backup']}.json").read_text())["files"]:
        (d / (f["name"] + ".planted")).symlink_to(victim)
    with pytest.raises(Exception) as exc:
        mod.restore(Repository.open(f"file://{_repo(daemon)}"), b["backup"], str(d))
    assert "exists" in str(exc.value)
    assert victim.read_bytes() == b"precious"


def test_restored_files_are_private(daemon, bank, tmp_path):
    b = _backup(daemon)
    out = tmp_path / "a" / "b" / "c"
    old = os.umask(0o022)
    try:
        p = subprocess.run([PY, "-m", "bastion", "--config", str(daemon.config), "restore", b["backup"],
                            "--to", str(out)], capture_output=True, text=True)
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr
    for d in (tmp_path / "a", tmp_path / "a" / "b", out):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# -- --replace takes its targets from the local config ------------------------------------------------

def test_replace_restores_only_over_the_configured_files(daemon, bank, tmp_path):
    b = _backup(daemon)
    before = dump(bank.bank), dump(bank.audit)
    con = sqlite3.connect(bank.bank)
    con.execute("UPDATE accounts SET owner='changed' WHERE id=1")
    con.commit()
    con.close()
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("bank.db", "audit.db"):
        con = sqlite3.connect(victims / name)
        con.executescript("CREATE TABLE v(x); INSERT INTO v VALUES (1);")
        con.close()
    victim_tree = _tree(victims)
    bid = _forge(daemon, b["backup"], "forged-paths",
                 lambda m: [f.update(path=str(victims / f["name"])) for f in m["files"]])
    r = daemon.cli("restore", bid, "--replace", "--json")
    assert r.code == 0, r.err
    assert [f["path"] for f in r.json["replaced"]] == [str(bank.bank), str(bank.audit)]
    assert (dump(bank.bank), dump(bank.audit)) == before
    assert _tree(victims) == victim_tree
    # a database the config does not have, or another number of files: refused, nothing changed
    bid = _forge(daemon, b["backup"], "forged-db", lambda m: m.update(database="other"))
    r = daemon.cli("restore", bid, "--replace")
    assert r.code == 2 and "'other'" in r.err and "not a database of the config" in r.err, r.err
    def one_file_less(m):   # a consistent manifest of one file: only the config can refuse it
        gone = m["files"].pop()
        m["logical_bytes"] -= gone["size"]
        m["chunks_total"] -= len(gone["chunks"])
    bid = _forge(daemon, b["backup"], "forged-count", one_file_less)
    r = daemon.cli("restore", bid, "--replace")
    assert r.code == 2 and "1 file" in r.err and "2 files" in r.err, r.err
    assert (dump(bank.bank), dump(bank.audit)) == before and _tree(victims) == victim_tree


# -- disk full ------------------------------------------------------------------------------------------

def _ns_ok() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) for a private mount namespace with a small tmpfs"
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    return None if p.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace: {p.stderr.strip()}"


def _in_small_fs(mnt: Path, size: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run cmd with a tmpfs of `size` mounted on mnt, in a mount namespace of its own (gone with it)."""
    script = (f'mount -t tmpfs -o size={size},mode=0755 tmpfs "$1" && shift && "$@"; rc=$?; '
              f'ls -A "{mnt}" > "{mnt}.after"; exit $rc')
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(mnt), *cmd],
                          capture_output=True, text=True, timeout=120)


def _big_bank(bank) -> None:
    con = sqlite3.connect(bank.bank)
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big VALUES(?, randomblob(4000))", [(i,) for i in range(300)])
    con.commit()
    con.close()


@pytest.mark.skipif(_ns_ok() is not None, reason=str(_ns_ok()))
def test_disk_full_is_a_clear_error_and_leaves_nothing(daemon, bank, tmp_path):
    _big_bank(bank)
    b = _backup(daemon)
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = _in_small_fs(mnt, "512k", PY, "-m", "bastion", "--config", str(daemon.config), "restore", b["backup"],
                     "--to", str(mnt / "new" / "dir"))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "free" in p.stderr and "bank.db" in p.stderr and "bytes" in p.stderr, p.stderr
    assert (tmp_path / "small.after").read_text() == "", "a failed restore left files or directories behind"
    # the space is there when the restore starts but runs out while it writes (another writer took it)
    code = f"""
import importlib, sys
mod = importlib.import_module("bastion.backup.restore")
from bastion.backup.repository import Repository
mod._free_bytes = lambda path: 1 << 40
try:
    mod.restore(Repository.open({f"file://{_repo(daemon)}"!r}), {b['backup']!r}, {str(mnt / 'new')!r})
except mod.RestoreFailed as exc:
    print(exc.message, exc.hint, sep="\\n")
    sys.exit(2)
"""
    p = _in_small_fs(mnt, "512k", PY, "-c", code)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "no space left" in p.stdout and "bank.db" in p.stdout and "free" in p.stdout, p.stdout
    assert (tmp_path / "small.after").read_text() == ""


# -- kill -9 at any point ------------------------------------------------------------------------------

def test_kill9_of_restore_to_leaves_complete_files(daemon, bank, tmp_path):
    _big_bank(bank)
    old_b = _backup(daemon)
    con = sqlite3.connect(bank.bank)
    con.execute("DELETE FROM big WHERE id % 2 = 0")
    con.execute("UPDATE accounts SET owner='second' WHERE id < 10")
    con.commit()
    con.close()
    con = sqlite3.connect(bank.audit)
    con.execute("INSERT INTO audit VALUES (1, 1, 2, 0, 0)")
    con.commit()
    con.close()
    new_b = _backup(daemon)
    out = tmp_path / "out"
    assert daemon.cli("restore", old_b["backup"], "--to", str(out)).code == 0
    old = {n: dump(out / n) for n in ("bank.db", "audit.db")}
    new = {n: dump(bank.dir / n) for n in ("bank.db", "audit.db")}
    assert old["bank.db"] != new["bank.db"]
    # how long a whole restore --force takes here, so the kills land anywhere in it
    t0 = time.monotonic()
    r = daemon.cli("restore", old_b["backup"], "--to", str(out), "--force")
    whole = time.monotonic() - t0
    assert r.code == 0, r.err
    for leftover in out.glob("*before-restore*"):
        leftover.unlink()
    rng = random.Random(7)
    seen = set()
    for i in range(10):
        mark = f"to-{os.getpid()}-{i}"
        p = subprocess.Popen([PY, "-m", "bastion", "--config", str(daemon.config), "restore", new_b["backup"],
                              "--to", str(out), "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "BASTION_TEST_MARK": mark})
        time.sleep(rng.uniform(0.3, 1.3) * whole)
        p.kill()
        p.wait()
        _wait_gone(mark)
        for n in ("bank.db", "audit.db"):
            _wait_unlocked(out / n)
            assert integrity(out / n) == "ok", n
            got = dump(out / n)
            assert got in (old[n], new[n]), n
            seen.add((n, got == new[n]))
        # both files of the group are from the same backup
        assert (dump(out / "bank.db") == new["bank.db"]) == (dump(out / "audit.db") == new["audit.db"])
        assert not [p.name for p in out.iterdir() if p.name.endswith("-wal") and p.stat().st_size > 0]
        for leftover in out.iterdir():
            if "before-restore" in leftover.name or leftover.name.endswith(".bastion-restore-tmp"):
                leftover.unlink()
        # go back to the old state for the next round
        if dump(out / "bank.db") == new["bank.db"]:
            assert daemon.cli("restore", old_b["backup"], "--to", str(out), "--force").code == 0
            for leftover in out.iterdir():
                if "before-restore" in leftover.name or leftover.name.endswith(".bastion-restore-tmp"):
                    leftover.unlink()
    assert seen == {(n, v) for n in ("bank.db", "audit.db") for v in (False, True)}, "kills never hit both states"


def _dying_writer(path: Path, sql: str) -> None:
    """Commit sql into path's WAL and die without a checkpoint: committed frames only the WAL holds."""
    p = subprocess.run([PY, "-c", f"""
import sqlite3, os
con = sqlite3.connect({str(path)!r}, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA wal_autocheckpoint=0")
con.executescript({sql!r})
os._exit(0)
"""])
    assert p.returncode == 0 and Path(f"{path}-wal").stat().st_size > 0


@pytest.mark.skipif(not shutil.which("strace"), reason="strace(1) is needed to kill the restore at each file operation")
def test_kill9_at_each_file_operation_of_restore_to(daemon, bank, tmp_path):
    """strace kills the restore (SIGKILL) at its Nth unlink/rename/link: at every step where it touches names."""
    _big_bank(bank)
    old_b = _backup(daemon)
    con = sqlite3.connect(bank.bank)
    con.execute("DELETE FROM big WHERE id % 2 = 0")
    con.commit()
    con.close()
    new_b = _backup(daemon)
    new = {n: dump(bank.dir / n) for n in ("bank.db", "audit.db")}
    pristine = tmp_path / "pristine"
    assert daemon.cli("restore", old_b["backup"], "--to", str(pristine)).code == 0
    for n in ("bank.db", "audit.db"):     # the old files have commits only their WAL holds
        _dying_writer(pristine / n, "CREATE TABLE late(x); INSERT INTO late VALUES (1);")
        (pristine / f"{n}-shm").unlink()
    old = {n: dump(pristine / n) for n in ("bank.db", "audit.db")}
    for n in ("bank.db", "audit.db"):
        (pristine / f"{n}-shm").unlink(missing_ok=True)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    killed = 0
    # name operations, and the moments it starts a process or waits for one (the swap helper)
    for call in ("unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "vfork", "clone3",
                 "wait4"):
        for nth in (1, 2, 3):
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(pristine, out)
            mark = f"strace-{os.getpid()}-{call}-{nth}"
            p = subprocess.run(["strace", "-o", "/dev/null",
                                "-e", f"inject={call}:signal=KILL:when={nth}", PY, "-m", "bastion", "--config",
                                str(daemon.config), "restore", new_b["backup"], "--to", str(out), "--force"],
                               env={**env, "BASTION_TEST_MARK": mark}, capture_output=True, text=True)
            _wait_gone(mark)
            killed += p.returncode != 0
            state = []
            for n in ("bank.db", "audit.db"):
                _wait_unlocked(out / n)
                assert integrity(out / n) == "ok", (call, nth, n)
                got = dump(out / n)
                assert got in (old[n], new[n]), (call, nth, n, "neither the old file nor the restored one")
                state.append(got == new[n])
                if got == new[n]:    # the old file, with the commits of its WAL, is kept aside
                    kept = [k for k in out.glob(f"{n}.before-restore-*") if not k.name.endswith(("-wal", "-shm"))]
                    assert [dump(k) for k in kept] == [old[n]], (call, nth, n)
            assert state[0] == state[1], (call, nth, "the group is half restored")
    assert killed > 0, "strace never killed the restore"


def test_kill9_of_restore_replace_leaves_complete_files(daemon, bank, tmp_path, monkeypatch):
    mark = f"replace-{os.getpid()}"
    monkeypatch.setenv("BASTION_TEST_MARK", mark)    # the daemon and every helper it starts carry it
    daemon.stop()
    daemon.start()
    _big_bank(bank)
    old_b = _backup(daemon)
    old = dump(bank.bank), dump(bank.audit)
    con = sqlite3.connect(bank.bank)
    con.execute("DELETE FROM big WHERE id % 3 = 0")
    con.commit()
    con.close()
    new = dump(bank.bank), dump(bank.audit)
    rng = random.Random(11)
    for _ in range(6):
        p = subprocess.Popen([PY, "-m", "bastion", "--config", str(daemon.config), "restore", old_b["backup"],
                              "--replace"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5))
        daemon.kill9()
        p.wait(60)
        _wait_gone(mark)
        for path in (bank.bank, bank.audit):
            _wait_unlocked(path)
            assert integrity(path) == "ok", path
        got = dump(bank.bank), dump(bank.audit)
        assert got in (old, new)
        daemon.start()
        if got == old:   # back to the new state for the next round, through the library's own swap
            con = sqlite3.connect(bank.bank)
            con.execute("DELETE FROM big WHERE id % 3 = 0")
            con.commit()
            con.close()
        assert (dump(bank.bank), dump(bank.audit)) == new
        assert check_bank(bank.dir)["ok"]
