"""Backups taken while the bank application writes: restorable, verified, damage found."""

import json
import sqlite3
import time
from pathlib import Path

from support import DaemonProc, check_bank, dump, free_port, wait_for, write_config


def _backup(daemon, *extra):
    r = daemon.cli("backup", "bank", "--json", *extra)
    assert r.code == 0, r.err
    return r.json


def test_backup_while_writing_restores_consistent(daemon, bank, tmp_path):
    bank.start()
    b = _backup(daemon)
    assert b["verified"] is True and b["chunks_new"] == b["chunks_total"] > 0
    stats = bank.stop()
    assert stats["errors"] == {}
    out = tmp_path / "restored"
    r = daemon.cli("restore", b["backup"], "--to", str(out), "--json")
    assert r.code == 0, r.err
    res = check_bank(out)
    assert res["ok"], res
    assert 0 < res["transfers"] <= stats["commits"]
    # listed with its verified state
    lst = daemon.cli("backups", "list", "--json").json
    assert [x["id"] for x in lst["backups"]] == [b["backup"]]
    assert lst["backups"][0]["verified"].startswith("quick ok")
    # restore refuses to overwrite, --force overwrites
    r = daemon.cli("restore", b["backup"], "--to", str(out))
    assert r.code == 3 and "already exists" in r.err
    assert daemon.cli("restore", b["backup"], "--to", str(out), "--force").code == 0


def test_incremental_backup_stores_only_changed_chunks(daemon, bank, tmp_path):
    con = sqlite3.connect(bank.bank)
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big VALUES(?, randomblob(4000))", [(i,) for i in range(2000)])
    con.commit()
    first = _backup(daemon)
    con.execute("UPDATE big SET blob = randomblob(4000) WHERE id < 20")   # 1% of rows, clustered
    con.commit()
    con.close()
    second = _backup(daemon)
    assert second["stored_bytes_added"] < 0.1 * first["stored_bytes_added"]
    out = tmp_path / "r2"
    assert daemon.cli("restore", second["backup"], "--to", str(out)).code == 0
    assert dump(out / "bank.db") == dump(bank.bank)


def test_repository_from_url_alone_restores_on_a_fresh_machine(daemon, bank, tmp_path):
    repo = tmp_path / "offsite"
    b = _backup(daemon, "--to", f"file://{repo}")
    # no config, no daemon: just the repository URL
    import subprocess
    import sys
    out = tmp_path / "dr"
    p = subprocess.run([sys.executable, "-m", "bastion", "restore", b["backup"], "--from", f"file://{repo}",
                        "--to", str(out), "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert dump(out / "bank.db") == dump(bank.bank) and dump(out / "audit.db") == dump(bank.audit)


def _chunk_files(repo: Path):
    return sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())


def test_damage_is_found_and_named(daemon, bank, tmp_path):
    b = _backup(daemon)
    repo = daemon.data_dir / "backups"
    chunks = _chunk_files(repo)
    # a flipped byte in one chunk, another chunk deleted
    victim = chunks[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    chunks[1].unlink()
    r = daemon.cli("verify", "--all", "--json")
    assert r.code == 2
    problems = r.json["problems"]
    named = {p["chunk"][:16] for p in problems if p.get("chunk")}
    assert victim.name[:16] in named and chunks[1].name[:16] in named
    assert all(p["backup"] == b["backup"] for p in problems)
    r = daemon.cli("restore", b["backup"], "--to", str(tmp_path / "x"))
    assert r.code == 2 and ("missing" in r.err or "does not match" in r.err or "decompress" in r.err)
    assert not any((tmp_path / "x").glob("*.db")) and not any((tmp_path / "x").glob("*tmp*"))


def test_truncated_manifest_is_found(daemon, bank, tmp_path):
    b = _backup(daemon)
    m = daemon.data_dir / "backups" / "manifests" / f"{b['backup']}.json"
    m.write_bytes(m.read_bytes()[:100])
    r = daemon.cli("verify", b["backup"], "--json")
    assert r.code == 2 and "damaged" in r.json["problems"][0]["problem"]
    r = daemon.cli("restore", b["backup"], "--to", str(tmp_path / "y"))
    assert r.code == 2 and "damaged" in r.err


def test_full_verify_restores_and_compares(daemon, bank):
    b = _backup(daemon)
    r = daemon.cli("verify", b["backup"], "--full", "--json")
    assert r.code == 0, r.err
    assert r.json["backups"][0]["full"].startswith("integrity ok")


def test_incompatible_repository_is_refused(daemon, bank, tmp_path):
    repo = tmp_path / "future"
    repo.mkdir()
    (repo / "bastion-repo.json").write_text(json.dumps({"format": 99}))
    r = daemon.cli("backup", "bank", "--to", f"file://{repo}")
    assert r.code == 3 and "format 99" in r.err
    st = daemon.cli("status", "--json").json
    assert all(f["contops"] is None for d in st["databases"] for f in d["files"])


def test_prune_policy_and_orphan_chunks(daemon, bank, tmp_path):
    ids = [_backup(daemon)["backup"]]
    con = sqlite3.connect(bank.bank)
    for i in range(3):
        con.execute("UPDATE accounts SET owner = ? WHERE id = ?", (f"x{i}" * 500, i + 1))
        con.commit()
        ids.append(_backup(daemon)["backup"])
    con.close()
    # an orphan left by a crashed upload: a chunk no manifest names
    from bastion.backup import Repository
    repo = Repository.open(f"file://{daemon.data_dir / 'backups'}")
    orphan, _ = repo.put_chunk(b"orphaned by a crash" * 100)
    r = daemon.cli("prune", "--keep-last", "2", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert {b["id"] for b in r.json["removed"]} == set(ids[:2])
    assert len(daemon.cli("backups", "list", "--json").json["backups"]) == 4   # dry run removed nothing
    r = daemon.cli("prune", "--keep-last", "2", "--json")
    assert r.code == 0, r.err
    assert r.json["chunks_removed"] >= 1
    assert not repo.store.exists(repo.chunk_name(orphan))
    left = [b["id"] for b in daemon.cli("backups", "list", "--json").json["backups"]]
    assert left == ids[2:]
    # what is left is whole
    r = daemon.cli("verify", "--all", "--full", "--json")
    assert r.code == 0, r.json["problems"]
    r = daemon.cli("prune")
    assert r.code == 3 and "policy" in r.err


def test_prune_defers_chunk_deletion_while_a_backup_runs(daemon, bank):
    first = _backup(daemon)["backup"]
    _backup(daemon)
    from bastion.backup import Repository
    repo = Repository.open(f"file://{daemon.data_dir / 'backups'}")
    orphan, _ = repo.put_chunk(b"uploaded by a running backup, manifest not written yet" * 50)
    running = repo.lock("backup")          # held by a live process (this one)
    try:
        r = daemon.cli("prune", "--keep-last", "1", "--json")
        assert r.code == 0, r.err
        assert r.json["chunk_cleanup"].startswith("deferred")
        assert repo.store.exists(repo.chunk_name(orphan))
        assert first not in [b["id"] for b in daemon.cli("backups", "list", "--json").json["backups"]]
    finally:
        repo.unlock(running)
    r = daemon.cli("prune", "--keep-last", "1", "--json")
    assert r.json["chunk_cleanup"] == "done" and not repo.store.exists(repo.chunk_name(orphan))


def test_kill9_during_backup_lists_nothing_partial(daemon, bank, tmp_path):
    import subprocess
    import sys
    import time
    con = sqlite3.connect(bank.bank)
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big VALUES(?, randomblob(8000))", [(i,) for i in range(25000)])  # ~200 MB
    con.commit()
    con.close()
    bank.start()
    p = subprocess.Popen([sys.executable, "-m", "bastion", "--config", str(daemon.config), "backup", "bank"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    repo_dir = daemon.data_dir / "backups"
    deadline = time.monotonic() + 30
    while not (repo_dir / "chunks").exists() or len(list((repo_dir / "chunks").rglob("*"))) < 50:
        assert time.monotonic() < deadline, "the backup never started uploading"
        time.sleep(0.01)
    daemon.kill9()                              # daemon and its reader child, mid-upload
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "daemon" in err
    daemon.start()
    assert daemon.cli("backups", "list", "--json").json["backups"] == []   # nothing partial is listed
    stats = bank.stop()
    assert stats["errors"] == {}
    b = _backup(daemon)                         # the next backup succeeds
    r = daemon.cli("prune", "--keep-last", "1", "--json")
    assert r.code == 0 and r.json["chunk_cleanup"] == "done"
    out = tmp_path / "after-crash"
    assert daemon.cli("restore", b["backup"], "--to", str(out)).code == 0
    res = check_bank(out)
    assert res["ok"] and res["transfers"] == stats["commits"]
    assert dump(out / "bank.db") == dump(bank.bank)
    assert not list(repo_dir.rglob("*.tmp-*"))


def test_scheduled_backups_run_retain_and_failures_show(tmp_path, bank):
    port = free_port()
    extra = '[backups]\nschedule = "every 1s"\nkeep_last = 2\n'
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]}, extra=extra)
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        bank.start()
        wait_for(lambda: (lambda b: b if len(b) >= 2 else None)(
            d.cli("backups", "list", "--json").json["backups"]))
        job = d.cli("status", "--json").json["jobs"][0]
        assert job["job"] == "backup bank" and job["last_ok"] and job["failures"] == 0
        time.sleep(3)
        assert len(d.cli("backups", "list", "--json").json["backups"]) <= 3   # retention keeps 2 (+1 racing)
        bank.stop()
    finally:
        d.stop()
    # a repository that cannot be written: the failure is shown and retried
    bad = tmp_path / "not-a-dir"
    bad.write_text("a file where the repository should be")
    cfg.write_text(cfg.read_text().replace('keep_last = 2\n', f'keep_last = 2\nrepository = "{bad}"\n'))
    d.start()
    try:
        job = wait_for(lambda: (lambda j: j if j["failures"] >= 2 else None)(
            d.cli("status", "--json").json["jobs"][0]))
        assert job["last_error"] and str(bad) in job["last_error"]
        r = d.cli("status")
        assert "FAILED" in r.out
    finally:
        d.stop()


def test_restore_replace_puts_backup_back_in_place(daemon, bank, tmp_path):
    b = _backup(daemon)
    before = dump(bank.bank), dump(bank.audit)
    bank.start()
    time.sleep(0.5)
    # the application still has the files open: refused, nothing changed
    r = daemon.cli("restore", b["backup"], "--replace")
    assert r.code == 2 and "open in" in r.err and "stop the application" in r.err
    stats = bank.stop()
    assert check_bank(bank.dir)["transfers"] == stats["commits"] > 0
    r = daemon.cli("restore", b["backup"], "--replace", "--json")
    assert r.code == 0, r.err
    assert (dump(bank.bank), dump(bank.audit)) == before
    kept = [f["previous_kept_as"] for f in r.json["replaced"]]
    assert all(Path(k).exists() for k in kept)
    assert check_bank(bank.dir)["ok"]
    # the daemon protects the restored files again and the application can run on them
    st = daemon.cli("status", "--json").json
    assert all(f["protected"] and f["journal_mode"] == "wal" for d in st["databases"] for f in d["files"])
    bank.start()
    time.sleep(0.3)
    assert bank.stop()["errors"] == {}
    assert check_bank(bank.dir)["ok"]


def test_manifest_naming_a_missing_chunk_is_found(daemon, bank, tmp_path):
    b = _backup(daemon)
    m = daemon.data_dir / "backups" / "manifests" / f"{b['backup']}.json"
    data = json.loads(m.read_text())
    ghost = "ab" * 32
    data["files"][1]["chunks"].append([ghost, 4096])
    data["files"][1]["size"] += 4096         # an edit that keeps the manifest consistent: only the chunk is absent
    data["logical_bytes"] += 4096
    data["chunks_total"] += 1
    m.write_text(json.dumps(data))
    r = daemon.cli("verify", "--all", "--json")
    assert r.code == 2
    p = r.json["problems"]
    assert len(p) == 1 and p[0]["chunk"] == ghost and p[0]["file"] == data["files"][1]["name"]
    r = daemon.cli("restore", b["backup"], "--to", str(tmp_path / "z"))
    assert r.code == 2 and "missing" in r.err


def test_manifest_instant_keeps_its_format_and_is_one_moment(daemon, bank):
    """The instant is written as it always was (ISO text, then the epoch number; the id starts with
    its stamp). A manifest whose text and number name different moments was edited: list sorts by
    one and prune's buckets use the other, so it counts as damaged, and prune removes nothing."""
    import time
    b = _backup(daemon)
    m = daemon.data_dir / "backups" / "manifests" / f"{b['backup']}.json"
    data = json.loads(m.read_text())
    assert list(data)[:5] == ["format", "id", "database", "instant", "instant_epoch"]
    assert data["instant"] == b["instant"] and isinstance(data["instant_epoch"], float)
    assert b["backup"].startswith(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(data["instant_epoch"])) + "-")
    data["instant_epoch"] -= 86400 * 40          # forty days earlier by the number, not by the text
    m.write_text(json.dumps(data))
    r = daemon.cli("verify", "--all", "--json")
    assert r.code == 2 and "name different moments" in json.dumps(r.json["problems"]), r.out
    r = daemon.cli("prune", "--keep-last", "5", "--json")
    assert r.code == 2 and "damaged" in r.err, (r.out, r.err)
    assert m.exists()
