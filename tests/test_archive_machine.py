"""A hypothesis state machine over the WAL archive: random bursts of writes, application
checkpoints, backups and restores at random past instants (picked between bursts, where the
committed content is beyond doubt) always give exactly the content the application had then."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support import PY, DaemonProc, free_port, wait_for, write_config
from support import pitr_app

from bastion.backup.pitr import ranges, restore_at
from bastion.backup.repository import Repository


class Archive(RuleBasedStateMachine):
    base_dir: Path

    @initialize()
    def start(self) -> None:
        self.dir = Path(self.base_dir) / f"m{time.time_ns()}"
        (self.dir / "app").mkdir(parents=True)
        self.db = self.dir / "app" / "app.db"
        pitr_app.init(str(self.db))
        port = free_port()
        cfg = write_config(self.dir, port, {"app": [str(self.db)]},
                           sections={"backups": {"archive": True, "archive_interval": "0.2s"}})
        self.daemon = DaemonProc(cfg, port, self.dir / "var").start()
        self.app = subprocess.Popen([PY, pitr_app.__file__, "serve", str(self.db)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        self.commits: list[tuple[float, int]] = [(time.time(), 0)]   # (time, transactions committed by then)
        self.quiet: list[tuple[float, int]] = []     # instants between bursts, with the count then
        self.based = False
        self.n = 0

    def _ask(self, line: str) -> str:
        assert self.app.stdin and self.app.stdout
        self.app.stdin.write(line + "\n")
        self.app.stdin.flush()
        return self.app.stdout.readline().strip()

    @rule(n=st.integers(1, 200))
    def write(self, n: int) -> None:
        before = time.time()
        k, t = self._ask(f"w {n}").split()
        if self.commits[-1][1] and before - self.commits[-1][0] > 0.1:
            self.quiet.append(((self.commits[-1][0] + before) / 2, self.commits[-1][1]))
        self.commits.append((float(t), int(k)))
        time.sleep(0.12)

    @rule(mode=st.sampled_from(["PASSIVE", "RESTART", "TRUNCATE"]))
    def app_checkpoint(self, mode: str) -> None:
        self._ask(f"c {mode}")

    @rule()
    def backup(self) -> None:
        r = self.daemon.cli("backup", "app", "--json")
        assert r.code == 0, r.err
        assert r.json["archive_base"] is True
        self.based = True
        time.sleep(0.12)

    @precondition(lambda self: self.based)
    @rule(pick=st.randoms(use_true_random=False))
    def restore(self, pick: random.Random) -> None:
        repo = Repository.open(f"file://{self.dir / 'var' / 'backups'}")
        rng = ranges(repo, "app")
        usable = [(t, k) for t, k in self.quiet if any(r["from"] + 0.02 < t for r in rng)]
        if not usable:
            return
        at, k = pick.choice(usable)
        wait_for(lambda: any(r["from"] <= at <= r["to"] for r in ranges(repo, "app")), timeout=10)
        self.n += 1
        dest = self.dir / f"r{self.n}"
        restore_at(repo, "app", str(dest), at=at)
        con = sqlite3.connect(dest / "app.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert con.execute("SELECT v FROM meta").fetchone()[0] == k
            assert pitr_app.content(con) == pitr_app.expected(k)
        finally:
            con.close()

    @invariant()
    def app_alive(self) -> None:
        assert self.app.poll() is None

    def teardown(self) -> None:
        if self.app.poll() is None:
            self.app.stdin.close()   # type: ignore[union-attr]
            self.app.wait(30)
        self.daemon.stop()


def test_archive_state_machine(tmp_path):
    Archive.base_dir = tmp_path
    run = settings(max_examples=3, stateful_step_count=10, deadline=None,
                   suppress_health_check=list(HealthCheck))(Archive.TestCase)
    run().runTest()
