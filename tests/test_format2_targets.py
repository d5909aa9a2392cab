"""Format 2 on every target: file://, sftp:// (a real OpenSSH sshd) and s3:// (moto's S3 server).
Backup, page-level incremental, restore (ranged reads), verify, prune's repack, a missing pack."""

from __future__ import annotations

import sqlite3

import pytest
from test_format2_damage import _db, take
from test_store import _target

from bastion.backup import format2
from bastion.backup.pack import pack_name
from bastion.backup.prune import Policy, prune
from bastion.backup.repository import Repository
from bastion.backup.restore import restore
from bastion.backup.verify import verify
from bastion.errors import RestoreFailed
from support import dump, integrity


@pytest.fixture(params=["file", "sftp", "s3"])
def target(request, tmp_path, monkeypatch):
    return _target(request.param, request, tmp_path, monkeypatch)


def test_format2_round_trip_on_every_target(target, tmp_path):
    db = _db(tmp_path / "app.db", rows=1500)
    url = target.url("repo2")
    repo = Repository.open(url, create=True, format=2)
    assert Repository.open(url).format == 2
    m1 = take(repo, db, 1)
    first = dump(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE t SET v = randomblob(900) WHERE id % 50 = 0")
    con.commit()
    con.close()
    m2 = take(repo, db, 2)
    assert m2["stored_bytes_added"] < m1["stored_bytes_added"] / 5 and m2["pages_delta"] > 0
    fresh = Repository.open(url)          # what another machine sees: only the URL
    restore(fresh, m2["id"], str(tmp_path / "r2"))
    restore(fresh, m1["id"], str(tmp_path / "r1"))
    assert dump(tmp_path / "r2" / "app.db") == dump(db) and dump(tmp_path / "r1" / "app.db") == first
    assert integrity(tmp_path / "r2" / "app.db") == "ok"
    assert verify(fresh, None, full=True)["ok"]
    info = format2.info(fresh)
    assert info["backups"] == 2 and info["packs"] >= 2 and info["dedup_ratio"] > 1.5
    # prune keeps the newest; what it needs stays (its unchanged pages live in the first backup's packs)
    res = prune(fresh, Policy(last=1))
    assert [b["id"] for b in res["removed"]] == [m1["id"]]
    restore(Repository.open(url), m2["id"], str(tmp_path / "after-prune"))
    assert dump(tmp_path / "after-prune" / "app.db") == dump(db)
    assert verify(Repository.open(url), None, full=True)["ok"]
    # a pack gone: named by quick verify and by restore, nothing restored
    idx = format2.reader_of(Repository.open(url)).index
    victim = next(iter(idx.packs))
    Repository.open(url).store.delete(pack_name(victim))
    v = verify(Repository.open(url), None)
    assert not v["ok"] and any(victim in p["problem"] for p in v["problems"])
    with pytest.raises(RestoreFailed, match="missing"):
        restore(Repository.open(url), m2["id"], str(tmp_path / "gone"))
    assert not list((tmp_path / "gone").glob("*.db")) if (tmp_path / "gone").exists() else True
