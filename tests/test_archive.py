"""WAL archive and point-in-time restore: an application writes in its own process while the daemon
archives; restores at instants picked in the application's pauses give exactly what it had committed."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from support import PY, DaemonProc, free_port, wait_for, write_config
from support import pitr_app

APP = [PY, pitr_app.__file__]


def _setup(tmp_path: Path, interval: str = "0.3s", extra_db: str = "", repo_format: int = 1,
           encrypted: bool = False) -> tuple[DaemonProc, Path]:
    db = tmp_path / "app" / "app.db"
    db.parent.mkdir()
    pitr_app.init(str(db))
    port = free_port()
    cfg = write_config(tmp_path, port, {"app": [str(db)]}, db_text=extra_db,
                       sections={"backups": {"archive": True, "archive_interval": interval, "format": repo_format,
                                             **({"passphrase_file": str(_passphrase(tmp_path))} if encrypted else {})}})
    return DaemonProc(cfg, port, tmp_path / "var").start(), db


def _passphrase(tmp_path: Path) -> Path:
    p = tmp_path / "passphrase"
    p.write_text("archive passphrase 5e1f\n")
    return p


def _segments(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "var" / "backups" / "archive").rglob("*.seg"))


def _run_app(db: Path, log: Path, seconds: float, ckpt_every: int = 0) -> subprocess.Popen:
    return subprocess.Popen([*APP, str(db), str(log), str(seconds), str(ckpt_every)])


def _commits(log: Path) -> list[tuple[int, float]]:
    out = []
    for line in log.read_text().splitlines():
        if line and not line.startswith("#"):
            k, t = line.split()
            out.append((int(k), float(t)))
    return out


def _pauses(commits: list[tuple[int, float]], after: float, before: float) -> list[tuple[float, int]]:
    """Instants in the middle of the application's pauses (>= 0.2 s without a commit), with the number
    of transactions committed by then: there the content at the instant is beyond doubt."""
    out = []
    for (k, t), (_, t2) in itertools.pairwise(commits):
        if t2 - t >= 0.2 and after < t and t2 < before:
            out.append(((t + t2) / 2, k))
    return out


def _restore_at(d: DaemonProc, dest: Path, *args: str):
    return d.cli("restore", "app", *args, "--to", str(dest), "--json")


def _check(dest: Path, k: int) -> None:
    con = sqlite3.connect(dest / "app.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        got_k = con.execute("SELECT v FROM meta WHERE k='txn'").fetchone()[0]
        assert got_k == k, f"restored the state after transaction {got_k}, the application had committed {k}"
        assert pitr_app.content(con) == pitr_app.expected(k)
    finally:
        con.close()


@pytest.mark.parametrize(("ckpt_every", "repo_format", "encrypted"), [(0, 1, False), (40, 1, False), (40, 2, True)],
                         ids=["own-checkpoints-only", "app-truncate-restart", "format2-base-encrypted"])
def test_restore_at_random_instants_gives_what_was_committed(tmp_path, ckpt_every, repo_format, encrypted):
    d, db = _setup(tmp_path, repo_format=repo_format, encrypted=encrypted)
    try:
        log = tmp_path / "commits.log"
        app = _run_app(db, log, 2.5, ckpt_every)
        time.sleep(1.0)
        b = d.cli("backup", "app", "--json")     # while the application writes
        assert b.code == 0, b.err
        assert b.json["archive_base"] is True
        marker = json.loads((tmp_path / "var" / "backups" / "bastion-repo.json").read_text())
        assert marker["format"] == repo_format and ("encryption" in marker) == encrypted
        app.wait(60)
        assert app.returncode == 0
        app = _run_app(db, log, 4.0, ckpt_every)    # and after: pauses to restore at, whatever the load
        app.wait(60)
        assert app.returncode == 0
        time.sleep(1.0)                 # a few archive intervals: the last commits reach the archive
        commits = _commits(log)
        base_instant = json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"][0]["from"]
        rng = json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"]
        assert len(rng) == 1 and rng[0]["gap"] is None
        pauses = _pauses(commits, base_instant, rng[0]["to"])
        assert len(pauses) >= 4, (pauses, rng)
        for i, (at, k) in enumerate(random.Random(7).sample(pauses, 4)):
            r = _restore_at(d, tmp_path / f"r{i}", "--at", f"{at:.6f}")
            assert r.code == 0, r.err
            _check(tmp_path / f"r{i}", k)
        # the position a restore reports gives the same content through --at-position
        r = _restore_at(d, tmp_path / "pos", "--at-position", r.json["files"][0]["position"])
        assert r.code == 0, r.err
        _check(tmp_path / "pos", k)
        # the last archived commit is reachable
        last_k = commits[-1][0]
        r = _restore_at(d, tmp_path / "last", "--at", repr(rng[0]["to"]))
        assert r.code == 0, r.err
        _check(tmp_path / "last", last_k)
        # outside the range: a clear error naming the range
        r = _restore_at(d, tmp_path / "early", "--at", f"{base_instant - 30:.3f}")
        assert r.code != 0 and "before the first backup" in r.err and "restorable" in r.err
        r = _restore_at(d, tmp_path / "late", "--at", f"{time.time() + 3600:.3f}")
        assert r.code != 0 and "after the last archived commit" in r.err
        assert not (tmp_path / "early" / "app.db").exists() and not (tmp_path / "late" / "app.db").exists()
    finally:
        d.stop()


def test_kill9_during_archive_lists_no_partial_segment_and_restore_works(tmp_path):
    d, db = _setup(tmp_path, interval="0.2s")
    log = tmp_path / "commits.log"
    app = _run_app(db, log, 4.0)
    try:
        time.sleep(1.0)
        assert d.cli("backup", "app", "--json").code == 0
        time.sleep(1.5)
        d.kill9()                       # somewhere in a pass: reading, writing a segment, or idle
    finally:
        app.wait(60)
    segs = _segments(tmp_path)
    assert segs
    for s in segs:                      # every listed segment is whole (temporaries are not listed)
        from bastion.backup import segment as sg
        sg.decode(str(s), s.read_bytes())
    d2 = DaemonProc(d.config, d.port, d.data_dir).start()
    try:
        rng = json.loads(d2.cli("backups", "archive", "app", "--json").out)["ranges"]
        to = rng[0]["to"]
        r = _restore_at(d2, tmp_path / "r", "--at", repr(to))
        assert r.code == 0, r.err
        k = max(k for k, t in _commits(log) if t <= to)
        con = sqlite3.connect(tmp_path / "r" / "app.db")
        got = con.execute("SELECT v FROM meta WHERE k='txn'").fetchone()[0]
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        # the archive holds every commit seen before the kill; the writer may be a few ms ahead of it
        assert 0 < got <= k
        _check(tmp_path / "r", got)
    finally:
        d2.stop()


def test_damaged_segment_is_a_named_error(tmp_path):
    d, db = _setup(tmp_path)
    try:
        log = tmp_path / "commits.log"
        app = _run_app(db, log, 4)
        time.sleep(0.3)
        assert d.cli("backup", "app", "--json").code == 0
        app.wait(60)
        time.sleep(1.0)
        to = json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"][0]["to"]
        segs = _segments(tmp_path)
        assert len(segs) > 2
        victim = segs[-2]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        r = _restore_at(d, tmp_path / "r", "--at", repr(to))
        assert r.code != 0
        assert victim.name in r.err and "damaged" in r.err, r.err
        assert not (tmp_path / "r" / "app.db").exists()
    finally:
        d.stop()


def test_archive_catches_up_after_daemon_restart(tmp_path):
    """A restart of the daemon goes on with the same generation when the WAL still holds what
    followed the last segment; else a new generation begins and the range says where."""
    d, db = _setup(tmp_path)
    try:
        log = tmp_path / "commits.log"
        app = _run_app(db, log, 1.0)
        time.sleep(0.3)
        assert d.cli("backup", "app", "--json").code == 0
        app.wait(60)
        time.sleep(0.8)
    finally:
        d.stop()
    d = DaemonProc(d.config, d.port, d.data_dir).start()
    try:
        app = _run_app(db, log, 1.0)
        app.wait(60)
        last = _commits(log)[-1]
        rng = wait_for(lambda: [r for r in json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"]
                                if r["to"] >= last[1] - 0.005], timeout=10)
        assert rng[0]["gap"] is None
        r = _restore_at(d, tmp_path / "r", "--at", repr(rng[0]["to"]))
        assert r.code == 0, r.err
        _check(tmp_path / "r", _commits(log)[-1][0])
    finally:
        d.stop()


def test_retention_keeps_what_a_kept_backup_needs(tmp_path):
    """Segments older than the retention go, unless a kept backup (and a later instant) needs them;
    once that backup is pruned, they go too, and its instants are no longer offered."""
    from bastion.backup.pitr import prune_archive
    from bastion.backup.repository import Repository
    d, db = _setup(tmp_path, interval="0.2s")
    log = tmp_path / "commits.log"
    try:
        ids = []
        for _ in range(2):
            app = _run_app(db, log, 1.5)
            time.sleep(0.7)
            b = d.cli("backup", "app", "--json")
            assert b.code == 0 and b.json["archive_base"] is True, b.err
            ids.append(b.json["backup"])
            app.wait(60)
        time.sleep(0.8)
        repo = Repository.open(f"file://{tmp_path / 'var' / 'backups'}")
        before = _segments(tmp_path)
        rng = json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"]
        assert [r["backup"] for r in rng] == ids
        # a week's retention: nothing is old enough
        assert prune_archive(repo, "app", "app.db", 7 * 86400)["segments_removed"] == 0
        # no retention at all: only what the first backup and later instants need stays
        gone = prune_archive(repo, "app", "app.db", 0)["segments_removed"]
        after = _segments(tmp_path)
        assert len(after) == len(before) - gone
        for i, r in enumerate(rng):
            mid = (r["from"] + r["to"]) / 2
            res = _restore_at(d, tmp_path / f"a{i}", "--at", repr(mid))
            assert res.code == 0, res.err
            k = max(k for k, t in _commits(log) if t <= mid - 0.02)
            got = sqlite3.connect(tmp_path / f"a{i}" / "app.db").execute("SELECT v FROM meta").fetchone()[0]
            assert k <= got <= max(k for k, t in _commits(log) if t <= mid + 0.02)
        # the first backup pruned: what only it needed goes, and its range is no longer offered
        assert d.cli("prune", "--keep-last", "1").code == 0
        gone2 = prune_archive(repo, "app", "app.db", 0)["segments_removed"]
        assert gone2 > 0
        rng2 = json.loads(d.cli("backups", "archive", "app", "--json").out)["ranges"]
        assert [r["backup"] for r in rng2] == ids[1:]
        res = _restore_at(d, tmp_path / "b", "--at", repr((rng[0]["from"] + rng[0]["to"]) / 2))
        assert res.code != 0 and "before the first backup" in res.err
        res = _restore_at(d, tmp_path / "c", "--at", repr(rng2[0]["to"]))
        assert res.code == 0, res.err
    finally:
        d.stop()


def test_an_archive_that_creates_the_repository_gives_it_the_configured_format(tmp_path):
    """With archiving on, the archiver may reach a new repository before any backup does: it must
    create it in the format the config asks for, or every later backup lands in the wrong format."""
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    port = free_port()
    cfg = write_config(tmp_path, port, {"app": [str(db)]},
                       sections={"backups": {"archive": True, "archive_interval": "0.3s", "format": 2}})
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        marker = tmp_path / "var" / "backups" / "bastion-repo.json"
        wait_for(marker.exists, 30, "the archiver to create the repository")
        assert json.loads(marker.read_text())["format"] == 2
        r = d.cli("backup", "app", "--json")
        assert r.code == 0, r.err
        assert any((tmp_path / "var" / "backups" / "packs").rglob("*")), "the backup did not write packs"
    finally:
        d.stop()
