"""Real-time backup between two real daemons on loopback (issue 4).

The primary protects the bank (bank.db + audit.db) and ships its captured changes to a
backup daemon whose config lists a copy of both files with replica_of = "bank". The bank
workload writes on the primary's files from its own process. Contents are compared with
stdlib sqlite3 in the test process (user tables only: the _bastion_* control tables differ
by design between the two sides).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.workload import BALANCE
from support import check_bank, dump, user_rows, wait_for
from support.replication import Pair

pytestmark = pytest.mark.timeout(180)


class InvariantWatch:
    """Samples the replica while batches arrive, as a reader that takes every file's write
    lock (Bastion's own pause does the same): between two applied cuts, the bank's
    invariants must hold across both files. Without cuts applied as one unit, bank.db runs
    ahead of audit.db and this fails.

    While the backup daemon is dead (kill -9) nothing can hold the files at one instant: SQLite
    has no atomic commit across WAL files, and the daemon applies a half-committed cut again
    when it starts, before it answers. ``down()`` covers that window: no samples in it."""

    def __init__(self, copy: Path) -> None:
        self.copy = copy
        self.samples: list[int] = []          # transfer counts seen
        self.bad: list[dict] = []
        self._stop = threading.Event()
        self._sampling = threading.Lock()
        self._down = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InvariantWatch:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=30)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        with self._sampling:              # a sample under way ends first
            self._down = True
        try:
            yield
        finally:
            self._down = False

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._sampling:
                try:
                    if not self._down:
                        self.sample()
                except sqlite3.Error:       # the copy is being seeded or its daemon restarts
                    time.sleep(0.05)
            time.sleep(0.002)

    def sample(self) -> None:
        cons = [sqlite3.connect(self.copy / n, timeout=10, isolation_level=None) for n in ("bank.db", "audit.db")]
        try:
            for c in cons:
                c.execute("BEGIN IMMEDIATE")
            accounts = cons[0].execute("SELECT value FROM meta WHERE key='accounts'").fetchone()[0]
            total = cons[0].execute("SELECT sum(balance) FROM accounts").fetchone()[0]
            transfers = cons[0].execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
            rows, top = cons[1].execute("SELECT count(*), coalesce(max(seq), 0) FROM audit").fetchone()
            if total != accounts * BALANCE or not transfers == rows == top:
                self.bad.append({"total": total, "transfers": transfers, "audit_rows": rows, "audit_max": top})
            self.samples.append(transfers)
        finally:
            for c in cons:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                c.close()


@pytest.fixture
def pair(tmp_path, bank):
    made: list[Pair] = []

    def make(backup: bool = True, **kw) -> Pair:
        p = Pair(tmp_path, bank, **kw).start(backup)
        made.append(p)
        return p
    yield make
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()
        bank.proc.wait()
    for p in made:
        p.stop()


def test_streams_survives_kill9_of_backup_and_catches_up(pair, bank):
    p = pair(backup=False)            # the backup comes up while the application writes:
    bank.start(seconds=120)           # the first seed is taken under load
    time.sleep(1)
    p.backup.start()
    deadline = time.monotonic() + 30
    while not (p.copy / "bank.db").exists():        # seeded from a consistent copy
        assert time.monotonic() < deadline, p.primary.log.read_text()[-3000:]
        time.sleep(0.1)
    with InvariantWatch(p.copy) as watch:
        time.sleep(2)
        st = p.status()
        assert st["state"] in ("shipping", "caught up") and st["files"][0]["applied"] is not None, st
        applied_before = [f["applied"] for f in st["files"]]
        with watch.down():
            p.backup.kill9()                              # mid-stream: batches are arriving all the time
            deadline = time.monotonic() + 15
            while not (down := p.status())["failures"]:
                assert time.monotonic() < deadline, down
                time.sleep(0.3)
            assert "unreachable" in down["last_error"] and down["state"] == "failing", down
            p.backup.start()                              # answers once a half-applied cut is whole again
        time.sleep(2)
        stats = bank.stop()
        p.catch_up()
    # the invariant held at every state sampled, and the samples saw the copy move many times
    assert not watch.bad, watch.bad[:5]
    assert len(set(watch.samples)) > 20, (len(watch.samples), len(set(watch.samples)))
    assert stats["commits"] > 20 and not stats["errors"], stats
    p.catch_up()
    p.assert_same()
    st = p.status()
    assert st["failures"] == 0 and all(f["applied"] >= b for f, b in zip(st["files"], applied_before)), st
    assert st["seeds"] == 1, st       # the kill -9 of the backup needed no re-seed
    assert 0 < st["cut_pause_max_ms"] < 5000, st       # writers were paused to cut, and let go
    print(f"longest writer pause for a cut: {st['cut_pause_max_ms']} ms")
    rep = p.status(p.backup)
    assert rep["role"] == "replica" and not rep["promoted"] and rep["divergence"] == 0, rep
    # and the transfer count on the replica is the primary's: nothing lost, nothing twice
    assert check_bank(p.copy)["transfers"] == bank.transfers()


def test_stopped_backup_queues_then_catches_up_and_runs_on_failure_once(pair, bank, tmp_path):
    flag = tmp_path / "failures.log"
    p = pair(primary_extra=f'on_failure = "echo $BASTION_DATABASE >> {flag}"\n')
    bank.start(seconds=120)
    deadline = time.monotonic() + 30
    while None in [f["applied"] for f in p.status()["files"]]:   # seeded, streaming
        assert time.monotonic() < deadline
        time.sleep(0.3)
    p.backup.stop()
    # writes go on; several retries fail (polled: a loaded machine may take longer than the 4 s this slept)
    st = wait_for(lambda: (s := p.status())["state"] == "failing" and s["failures"] >= 2 and s["lag_seconds"] > 1
                  and s, 30, "the stopped backup's retries failing, lag growing")
    assert st["lag_changes"] > 0, st
    assert "unreachable" in st["last_error"], st
    p.backup.start()
    bank.stop()
    p.catch_up()
    p.assert_same()
    assert flag.read_text().split() == ["bank"], "on_failure must run once per failure streak"
    assert check_bank(p.copy)["transfers"] == bank.transfers()


def test_manual_schedule_divergence_and_promotion(pair, bank):
    p = pair(schedule="manual")
    bank.start(seconds=120)
    time.sleep(1)
    assert not (p.copy / "bank.db").exists()          # manual: nothing is sent before `replicate run`
    bank.stop()
    res = p.primary.cli("replicate", "run", "bank", "--json")
    assert res.code == 0 and res.json["seeded"], (res.out, res.err)
    p.catch_up()
    p.assert_same()
    human = p.primary.cli("replicate", "status")
    assert human.code == 0 and "primary -> http://127.0.0.1" in human.out and "lag 0 changes" in human.out, human
    human = p.backup.cli("replicate", "status", "bank")
    assert human.code == 0 and "replica (read-only) of bank" in human.out and "no divergence" in human.out, human
    wrong = p.primary.cli("replicate", "run", "nope")
    assert wrong.code == 3 and "no replicate_to" in wrong.err, wrong
    # peer routes take the peer token only, and the peer token opens nothing else
    tok = p.token_file.read_text().strip()
    body = {"database": "bank", "origin": "x", "files": 2}
    assert p.backup.api("POST", "/v1/peer/positions", body).status_code == 401          # admin token
    assert p.backup.api("POST", "/v1/peer/positions", body, token=tok).status_code == 200
    assert p.backup.api("GET", "/v1/status", token=tok).status_code == 401
    # the replica refuses writes through the SQL server until promoted
    w = {"statements": ["UPDATE meta SET value = value WHERE key = 'transfers'"]}
    r = p.backup.api("POST", "/v1/sql/bank", w)
    assert r.status_code == 409 and "replica" in r.json()["error"]["message"], r.text
    # a write made on the copy behind Bastion's back is reported as divergence
    con = sqlite3.connect(p.copy / "bank.db", timeout=30)
    con.execute("UPDATE meta SET value = value WHERE key = 'transfers'")
    con.commit()
    con.close()
    rep = p.status(p.backup)
    assert rep["divergence"] == 1, rep
    assert p.backup.cli("replicate", "status").code == 1     # divergence makes status exit 1
    out = p.backup.cli("replicate", "promote", "bank", "--json")
    assert out.code == 0 and out.json["promoted"] and not out.json["already"], out.err
    r = p.backup.api("POST", "/v1/sql/bank", {"statements": [
        "UPDATE accounts SET balance = balance - 5 WHERE id = 1",
        "UPDATE accounts SET balance = balance + 5 WHERE id = 2"]})
    assert r.status_code == 200, r.text
    assert check_bank(p.copy)["ok"]
    rep = p.status(p.backup)
    assert rep["promoted"], rep
    # the old primary can no longer ship into it
    con = sqlite3.connect(bank.bank, timeout=30)
    con.execute("UPDATE meta SET value = value WHERE key = 'transfers'")
    con.commit()
    con.close()
    res = p.primary.cli("replicate", "run", "bank", "--json")
    assert res.code != 0 and "promoted" in (res.out + res.err), (res.out, res.err)
    assert not any(n.startswith("_bastion_") for n, _ in dump(p.copy / "bank.db"))   # capture removed


def test_kill9_of_primary_and_schema_change_while_streaming(pair, bank):
    p = pair()
    bank.start(seconds=120)
    deadline = time.monotonic() + 30
    while None in [f["applied"] for f in p.status()["files"]]:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # DDL while the application writes: a new table with rows, a new column on a busy table
    con = sqlite3.connect(bank.bank, timeout=30)
    con.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, data BLOB)")
    con.executemany("INSERT INTO notes VALUES (?, ?, ?)",
                    [(i, f"n\u00e9-{i}\x00x", os.urandom(i)) for i in range(50)])
    con.commit()
    con.execute("ALTER TABLE accounts ADD COLUMN note TEXT")
    con.execute("UPDATE accounts SET note = 'x' || id WHERE id % 7 = 0")
    con.commit()
    con.close()
    time.sleep(1)
    p.primary.kill9()                                 # mid-stream, between or inside a batch
    time.sleep(1)
    p.primary.start()
    time.sleep(1.5)
    bank.stop()
    p.catch_up()
    p.assert_same()
    assert p.status()["seeds"] == 0   # the restarted primary went on from the peer's positions
    assert ("notes", user_rows(bank.bank)[2][1]) == user_rows(p.copy / "bank.db")[2]   # the new table came along
    cols = [r[1] for r in sqlite3.connect(p.copy / "bank.db").execute("PRAGMA table_info(accounts)")]
    assert "note" in cols
    assert check_bank(p.copy)["transfers"] == bank.transfers()


def test_backup_killed_between_the_commits_of_a_cut_redoes_it(pair, bank, monkeypatch):
    """SQLite commits WAL files one by one: the backup dies with bank.db committed and
    audit.db not. The primary is lost too; on restart the promotion first applies the cut
    again from its durable copy: both files at one instant, nothing half-applied."""
    p = pair(backup=False)
    monkeypatch.setenv("BASTION_CRASH_POINT", "replica-cut-half-committed")
    p.backup.start()
    monkeypatch.delenv("BASTION_CRASH_POINT")
    bank.start(seconds=120)
    assert p.backup.proc.wait(60) != 0          # died at the first cut over both files
    stats = bank.stop()
    assert stats["commits"] > 0 and not stats["errors"], stats
    p.primary.kill9()                           # and the primary is gone for good
    ready = list((p.backup.data_dir / "replication").glob("bank.cut.ready"))
    assert ready, list((p.backup.data_dir / "replication").iterdir())
    half = InvariantWatch(p.copy)
    half.sample()
    assert half.bad, "the crash point was not between the two commits"   # bank.db ahead of audit.db
    p.backup.start()
    # started, with no primary to ask for positions: the cut is whole again all the same
    assert not (p.backup.data_dir / "replication" / "bank.cut.ready").exists()
    whole = InvariantWatch(p.copy)
    whole.sample()
    assert not whole.bad, whole.bad
    out = p.backup.cli("replicate", "promote", "bank", "--json")
    assert out.code == 0 and out.json["promoted"], out.err
    assert not (p.backup.data_dir / "replication" / "bank.cut.ready").exists()
    res = check_bank(p.copy)
    assert res["ok"], res
    assert 0 < res["transfers"] <= bank.transfers()
    # the copy is the primary as of that cut: audit rows are a prefix of the primary's
    want = next(t for t in user_rows(bank.audit) if t[0] == "audit")[1]
    got = next(t for t in user_rows(p.copy / "audit.db") if t[0] == "audit")[1]
    assert got == want[:len(got)]


def test_every_n_seconds_schedule_ships_on_its_own(pair, bank):
    p = pair(schedule="every 2s")
    p.catch_up()
    assert p.status()["schedule"] == "every 2s"
    con = sqlite3.connect(bank.bank, timeout=30)
    con.execute("UPDATE accounts SET owner = owner || ' (moved)' WHERE id = 1")
    con.commit()
    con.close()
    want = user_rows(bank.bank)
    deadline = time.monotonic() + 20          # a pass every 2 s ships it without `replicate run`
    while user_rows(p.copy / "bank.db") != want:
        assert time.monotonic() < deadline, p.status()
        time.sleep(0.2)


def test_config_is_checked_and_blackout_windows():
    import datetime as dt

    from bastion.config.parse import _build
    from bastion.errors import ConfigError
    from bastion.replication.window import Timing

    base = {"databases": {"bank": {"files": ["/tmp/x.db"], "replicate_to": "http://h:1"}}}
    with pytest.raises(ConfigError, match="peer_token_file"):
        _build(base, "t.toml", "/")
    ok = {**base, "replication": {"peer_token_file": "tok"}}
    c = _build(ok, "t.toml", "/etc")
    assert c.databases["bank"].replicate_to == "http://h:1" and c.replication.peer_token_file == "/etc/tok"
    for key, bad, msg in [("replicate_schedule", "sometimes", "replicate_schedule"),
                          ("blackout", ["25:00-26:00"], "not a time of day"),
                          ("replicate_to", "h:1", "replicate_to"),
                          ("replica_of", "bank", "both")]:
        raw = {"databases": {"bank": {**base["databases"]["bank"], key: bad}}, "replication": ok["replication"]}
        with pytest.raises(ConfigError, match=msg):
            _build(raw, "t.toml", "/")
    with pytest.raises(ConfigError, match="needs replicate_to"):
        _build({"databases": {"b": {"files": ["/x"], "blackout": ["01:00-02:00"]}}}, "t.toml", "/")
    t = Timing.parse("every 10s", ("22:00-23:00", "23:30-00:30"))
    assert t.mode == "every" and t.every == 10
    at = lambda h, m: dt.datetime(2026, 1, 1, h, m)   # noqa: E731
    assert t.in_blackout(at(22, 0)) and t.in_blackout(at(23, 45)) and t.in_blackout(at(0, 10))
    assert not t.in_blackout(at(23, 0)) and not t.in_blackout(at(0, 30)) and not t.in_blackout(at(12, 0))


def test_restore_in_place_on_the_primary_reseeds_the_replica(pair, bank):
    p = pair()
    bank.start(seconds=60)
    time.sleep(1.5)
    b = p.primary.cli("backup", "bank", "--json")
    assert b.code == 0, b.err
    time.sleep(1.5)                                   # more changes after the backup, shipped too
    bank.stop()
    p.catch_up()
    ahead = bank.transfers()
    # the files go back to the backup's instant: positions the replica already holds would
    # otherwise be reused by new changes (and skipped there as already applied)
    r = p.primary.cli("restore", b.json["backup"], "--replace", "--json")
    assert r.code == 0, (r.out, r.err)
    assert bank.transfers() < ahead
    bank.start(seconds=60)
    time.sleep(1)
    bank.stop()
    p.catch_up()
    p.assert_same()
    assert p.status()["seeds"] == 2, p.status()


def test_replicated_durability_acknowledges_only_what_the_backup_applied(pair, bank):
    """durability = "replicated": a commit through the SQL server returns once the backup
    server has applied it; with the backup down it fails with NotReplicated (and stays
    committed here, queued for later)."""
    import sqlite3

    import bastion.client as bc
    p = pair(primary_extra='durability = "replicated"\n')
    p.catch_up()
    con = bc.connect(f"bastion://127.0.0.1:{p.primary.port}/bank", token=p.primary.token, autocommit=True)
    con.execute("CREATE TABLE IF NOT EXISTS rep(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(20):
        con.execute("INSERT INTO rep(id, v) VALUES (?, ?)", (i, f"v{i}"))
        # acknowledged: it is on the backup server already, read by another process there
        copy = sqlite3.connect(f"file:{p.copy / 'bank.db'}?mode=ro", uri=True, timeout=10)
        try:
            assert copy.execute("SELECT v FROM rep WHERE id = ?", (i,)).fetchone() == (f"v{i}",)
        finally:
            copy.close()
    p.backup.stop()
    t0 = time.monotonic()
    with pytest.raises(bc.NotReplicated, match="did not apply it"):
        con.execute("INSERT INTO rep(id, v) VALUES (100, 'queued')")
    assert time.monotonic() - t0 < 30
    # committed here all the same, and shipped once the backup is back
    assert con.execute("SELECT v FROM rep WHERE id = 100").fetchone() == ("queued",)
    p.backup.start()
    con.execute("INSERT INTO rep(id, v) VALUES (101, 'after')")
    copy = sqlite3.connect(f"file:{p.copy / 'bank.db'}?mode=ro", uri=True, timeout=10)
    try:
        assert copy.execute("SELECT v FROM rep WHERE id IN (100, 101) ORDER BY id").fetchall() == [
            ("queued",), ("after",)]
    finally:
        copy.close()
    con.close()


def test_a_hostile_seed_commit_is_refused_before_anything_is_swapped(pair, bank, tmp_path):
    """The cut a seed commit names comes from the network: a negative position or clock value, a
    missing seq, or the wrong number of files is a usage error (400) before any file is touched;
    the replica keeps the positions it held and its contents."""
    import httpx

    p = pair(schedule="manual")
    bank.start(seconds=120)
    time.sleep(1)
    bank.stop()
    p.catch_up()
    before = p.status(p.backup)
    applied = [f["applied"] for f in before["files"]]
    assert all(isinstance(a, int) for a in applied), before
    tok = p.token_file.read_text().strip()
    hdr = {"Authorization": f"Bearer {tok}"}
    for bad in ([{"seq": -1, "hlc": 0}, {"seq": 5, "hlc": 0}],
                [{"seq": 5, "hlc": -3}, {"seq": 5, "hlc": 0}],
                [{"hlc": 1}, {"hlc": 1}],
                [{"seq": 5, "hlc": 0}]):
        sid = os.urandom(8).hex()
        for i, name in enumerate(("bank.db", "audit.db")):   # real SQLite copies, as a primary uploads
            staged = tmp_path / f"{sid}-{name}"
            src, dst = sqlite3.connect(p.copy / name), sqlite3.connect(staged)
            src.backup(dst)
            src.close()
            dst.close()
            r = httpx.post(f"{p.backup.url}/v1/peer/seed/upload", headers=hdr, content=staged.read_bytes(),
                           params={"database": "bank", "files": 2, "file": i, "seed": sid}, timeout=60)
            assert r.status_code == 200, r.text
        r = p.backup.api("POST", "/v1/peer/seed/commit", {"database": "bank", "origin": before["primary_origin"],
                                                            "files": 2, "seed": sid, "positions": bad}, token=tok)
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert r.json()["error"]["type"] == "UsageError", r.text
    after = p.status(p.backup)
    assert [f["applied"] for f in after["files"]] == applied and after["seeded_at"] == before["seeded_at"]
    p.assert_same()
