"""Repository format 2 through a real daemon: page-level incremental backups in packs, restore,
quick and full verify, kill -9 in the middle of a backup, prune's repack."""

import json
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from support import DaemonProc, check_bank, dump, free_port, integrity, wait_for, write_config

EXTRA = '[contops]\ngate_timeout = "10s"\n[backups]\nformat = 2\n'


@pytest.fixture
def d2(tmp_path, bank):
    """A daemon whose new repositories are format 2, protecting the bank as database 'bank'."""
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]}, extra=EXTRA)
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    yield d
    d.stop()
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()


def _backup(d, *extra):
    r = d.cli("backup", "bank", "--json", *extra)
    assert r.code == 0, r.err
    return r.json


def _repo(d) -> Path:
    return d.data_dir / "backups"


def _fill(db: Path, rows: int, size: str) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany(f"INSERT INTO big VALUES(?, randomblob({size}))", [(i,) for i in range(rows)])
    con.commit()
    con.close()


def _change(db: Path, rows: int, share: float, seed: int) -> None:
    rnd = random.Random(seed)
    con = sqlite3.connect(db)
    con.executemany("UPDATE big SET v = randomblob(length(v)) WHERE id = ?",
                    [(i,) for i in rnd.sample(range(rows), int(rows * share))])
    con.commit()
    con.close()


def _restore(d, bid, out):
    r = d.cli("restore", bid, "--to", str(out), "--json")
    assert r.code == 0, r.err
    return r.json


def test_format2_backup_while_writing_restores_consistent(d2, bank, tmp_path):
    bank.start()
    b = _backup(d2)
    assert b["verified"] is True
    stats = bank.stop()
    assert stats["errors"] == {}
    assert json.loads((_repo(d2) / "bastion-repo.json").read_text())["format"] == 2
    assert list((_repo(d2) / "packs").rglob("*")) and not (_repo(d2) / "chunks").exists()
    m = json.loads((_repo(d2) / "manifests" / f"{b['backup']}.json").read_text())
    assert m["format"] == 2 and all("chunks" not in f and f["pages"] > 0 for f in m["files"])
    out = tmp_path / "restored"
    _restore(d2, b["backup"], out)
    res = check_bank(out)
    assert res["ok"], res
    lst = d2.cli("backups", "list", "--json").json
    assert [x["id"] for x in lst["backups"]] == [b["backup"]]
    r = d2.cli("verify", "--all", "--full", "--json")
    assert r.code == 0, r.err
    assert r.json["backups"][0]["full"].startswith("integrity ok")


@pytest.mark.parametrize("size,rows", [("100", 60000), ("1024 + abs(random()) % 3073", 4000)])
def test_format2_incremental_after_one_percent_random_rows(d2, bank, tmp_path, size, rows):
    """1 % of rows changed at random: small rows touch about a third of the pages, so only deltas
    keep the incremental small; large rows touch few pages."""
    _fill(bank.bank, rows, size)
    full = _backup(d2)
    before = dump(bank.bank)
    _change(bank.bank, rows, 0.01, 1)
    inc = _backup(d2)
    assert inc["stored_bytes_added"] < 0.05 * full["stored_bytes_added"], (inc, full)
    m = json.loads((_repo(d2) / "manifests" / f"{inc['backup']}.json").read_text())
    assert m["parent"] == full["backup"]
    # both restore exactly: the incremental's pages come from both backups' packs
    _restore(d2, inc["backup"], tmp_path / "inc")
    assert dump(tmp_path / "inc" / "bank.db") == dump(bank.bank)
    _restore(d2, full["backup"], tmp_path / "full")
    assert dump(tmp_path / "full" / "bank.db") == before
    assert integrity(tmp_path / "inc" / "bank.db") == "ok"
    # a third backup with nothing changed stores next to nothing
    same = _backup(d2)
    assert same["stored_bytes_added"] < 0.02 * full["stored_bytes_added"]
    info = d2.cli("repo", "info", "--json")
    assert info.code == 0, info.err
    assert info.json["format"] == 2 and info.json["backups"] == 3 and info.json["packs"] >= 1
    assert info.json["dedup_ratio"] > 2     # three backups of nearly the same pages, stored about once


def test_format1_stays_the_default_and_readable(daemon, bank, tmp_path):
    b = daemon.cli("backup", "bank", "--json").json
    repo = daemon.data_dir / "backups"
    assert json.loads((repo / "bastion-repo.json").read_text())["format"] == 1
    assert (repo / "chunks").is_dir() and not (repo / "packs").exists()
    _restore(daemon, b["backup"], tmp_path / "r")
    assert dump(tmp_path / "r" / "bank.db") == dump(bank.bank)


def test_config_refuses_an_unknown_format(tmp_path, bank):
    from support import serve_refused
    cfg = write_config(tmp_path, free_port(), {"bank": [str(bank.bank)]}, extra="[backups]\nformat = 3\n")
    p = serve_refused(cfg)
    assert p.returncode != 0 and "format must be 1 or 2" in p.stderr


# -- kill -9 in the middle of a backup ----------------------------------------------------

@pytest.mark.parametrize("when", ["first temporary", "first index", "second index"])
def test_kill9_during_format2_backup_lists_nothing_and_repo_stays_usable(d2, bank, tmp_path, when):
    _fill(bank.bank, 14000, "4000")      # ~60 MB of incompressible pages: several 16 MB packs
    first = _backup(d2)
    _change(bank.bank, 14000, 1.0, 2)    # the next backup has about 60 MB to store: 4 packs
    repo = _repo(d2)
    before = {p.name for p in (repo / "index").iterdir()}
    proc = subprocess.Popen([d2.python, "-m", "bastion", "--config", str(d2.config), "backup", "bank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=d2.env)

    def reached():
        try:
            if when == "first temporary":    # a pack half-written
                return any(".tmp-" in p.name for p in (repo / "packs").rglob("*"))
            new = {p.name for p in (repo / "index").iterdir()} - before
            return len(new) >= (1 if when == "first index" else 2)
        except FileNotFoundError:      # renamed while listed
            return False
    wait_for(reached, timeout=60, every=0.005)
    d2.kill9()
    proc.wait(30)
    d2.start()
    lst = d2.cli("backups", "list", "--json").json
    assert [b["id"] for b in lst["backups"]] == [first["backup"]] and lst["problems"] == []
    r = d2.cli("verify", "--all", "--full", "--json")
    assert r.code == 0, r.out + r.err
    # a new backup works (it may reuse what the killed one stored) and restores exactly
    again = _backup(d2)
    _restore(d2, again["backup"], tmp_path / "again")
    assert dump(tmp_path / "again" / "bank.db") == dump(bank.bank)
    assert integrity(tmp_path / "again" / "bank.db") == "ok"
    _restore(d2, first["backup"], tmp_path / "first")
    assert integrity(tmp_path / "first" / "bank.db") == "ok"
    # prune removes what the killed backup left (packs without index, temporaries), keeps what is used
    r = d2.cli("prune", "--keep-last", "2", "--json")
    assert r.code == 0, r.err
    assert not [p for p in repo.rglob("*") if ".tmp-" in p.name]
    r = d2.cli("verify", "--all", "--full", "--json")
    assert r.code == 0, r.out + r.err


# -- prune ----------------------------------------------------------------------------------

def test_prune_repacks_and_keeps_what_remaining_backups_need(d2, bank, tmp_path):
    _fill(bank.bank, 3000, "3000")
    ids, states = [], []
    for i in range(4):
        ids.append(_backup(d2)["backup"])
        states.append(dump(bank.bank))
        _change(bank.bank, 3000, 0.3, 10 + i)
        time.sleep(1.1)      # distinct instants
    repo = _repo(d2)
    size = lambda: sum(p.stat().st_size for p in (repo / "packs").rglob("*") if p.is_file())  # noqa: E731
    before = size()
    r = d2.cli("prune", "--keep-last", "1", "--json")
    assert r.code == 0, r.err
    assert r.json["packs_removed"] + r.json["packs_rewritten"] > 0
    assert size() < before
    assert [b["id"] for b in d2.cli("backups", "list", "--json").json["backups"]] == [ids[-1]]
    r = d2.cli("verify", "--all", "--full", "--json")
    assert r.code == 0, r.out + r.err
    _restore(d2, ids[-1], tmp_path / "last")
    assert dump(tmp_path / "last" / "bank.db") == states[-1]
