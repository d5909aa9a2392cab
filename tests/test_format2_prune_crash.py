"""kill -9 of a format-2 prune at every step of its work (each object write and delete): the
repository stays readable, every backup still listed restores exactly, and the next prune ends
the job. The prune runs in its own process, killed with SIGKILL by its own store at the Nth call."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_format2_damage import _db, take

from bastion.backup.prune import Policy, prune
from bastion.backup.repository import Repository
from bastion.backup.restore import restore
from bastion.backup.verify import verify
from support import dump, integrity

KILLER = r"""
import os, signal, sys
from bastion.backup.store.local import LocalStore
from bastion.backup.repository import Repository
from bastion.backup.prune import Policy, prune
import bastion.backup.format2 as format2
format2.REPACK_UNUSED = 0.0      # every pack with an unused byte is rewritten: the repack path runs
n = [int(sys.argv[2])]
def hook(orig):
    def f(self, *a, **k):
        n[0] -= 1
        if n[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    return f
LocalStore.write = hook(LocalStore.write)
LocalStore.delete = hook(LocalStore.delete)
prune(Repository.open(sys.argv[1]), Policy(last=1))
print("finished")
"""


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune-crash")
    db = _db(tmp / "app.db", rows=2500)
    repo = Repository.open(str(tmp / "repo"), create=True, format=2)
    states = {}
    for n in range(1, 5):
        m = take(repo, db, n)
        states[m["id"]] = dump(db)
        con = sqlite3.connect(db)
        con.execute(f"UPDATE t SET v = randomblob(900) WHERE id % 11 = {n}")    # later packs supersede parts
        con.commit()
        con.close()
    return tmp, states


def test_kill9_at_every_step_of_a_prune(history, tmp_path, monkeypatch):
    from bastion.backup import format2
    monkeypatch.setattr(format2, "REPACK_UNUSED", 0.0)
    src, states = history
    baseline = tmp_path / "baseline"
    shutil.copytree(src / "repo", baseline)
    ops = _ops_on(baseline)
    assert ops >= 8        # manifests, records, lock, new packs and indexes, old indexes and packs
    for k in range(1, ops + 1):
        work = tmp_path / f"k{k}"
        shutil.copytree(src / "repo", work)
        p = subprocess.run([sys.executable, "-c", KILLER, str(work), str(k)], capture_output=True, text=True)
        assert p.returncode == -9, (k, p.stdout, p.stderr)
        repo = Repository.open(str(work))
        listed = repo.backup_ids()
        assert max(states) in listed, k            # the newest is kept by the policy: never lost
        v = verify(repo, None, full=True, record=False)
        assert v["ok"], (k, v["problems"])
        for bid in listed:
            out = tmp_path / f"r{k}-{bid}"
            restore(repo, bid, str(out))
            assert dump(out / "app.db") == states[bid] and integrity(out / "app.db") == "ok", (k, bid)
        prune(Repository.open(str(work)), Policy(last=1))      # the next prune ends the job
        repo = Repository.open(str(work))
        assert repo.backup_ids() == [max(states)]
        assert verify(repo, None, full=True, record=False)["ok"]
        assert not repo.store.temporaries() and not [n for n in repo.store.list("packs")
                                                     if n.rsplit("/", 1)[-1] not in _indexed(repo)]
        shutil.rmtree(work)


def _indexed(repo: Repository) -> set[str]:
    return {n.rsplit("/", 1)[-1] for n in repo.store.list("index")}


def _ops_on(repo_dir: Path) -> int:
    counter = KILLER.replace("os.kill(os.getpid(), signal.SIGKILL)", "pass").replace(
        'prune(Repository.open(sys.argv[1]), Policy(last=1))',
        'r = prune(Repository.open(sys.argv[1]), Policy(last=1)); assert r["packs_rewritten"]')
    counter = counter.replace('print("finished")', 'print("ops", 100000 - n[0])')
    p = subprocess.run([sys.executable, "-c", counter, str(repo_dir), "100000"], capture_output=True, text=True)
    assert "ops" in p.stdout, p.stderr
    return int(p.stdout.split()[-1])
