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
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
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
        self.base_at = 0.0
        self.backups = 0
        self.n = 0

    def _ask(self, line: str) -> str:
        assert self.app.stdin and self.app.stdout
        self.app.stdin.write(line + "\n")
        self.app.stdin.flush()
        return self.app.stdout.readline().strip()

    @rule(action=st.sampled_from(["write", "write", "write", "checkpoint", "backup", "restore"]),
          n=st.integers(1, 200), mode=st.sampled_from(["PASSIVE", "RESTART", "TRUNCATE"]),
          pick=st.randoms(use_true_random=False))
    def step(self, action: str, n: int, mode: str, pick: random.Random) -> None:
        """One rule drawing the action (hypothesis favoured one rule per run when they were apart)."""
        if action == "backup" and self.backups < 2 and self.commits[-1][1]:
            self.backup()
        elif action == "restore" and self._usable():
            self.restore(pick)
        elif action == "checkpoint":
            self.app_checkpoint(mode)
        else:
            self.write(n)

    def write(self, n: int) -> None:
        before = time.time()
        k, t = self._ask(f"w {n}").split()
        if self.commits[-1][1] and before - self.commits[-1][0] > 0.1:
            self.quiet.append(((self.commits[-1][0] + before) / 2, self.commits[-1][1]))
        self.commits.append((float(t), int(k)))
        time.sleep(0.12)

    def app_checkpoint(self, mode: str) -> None:
        self._ask(f"c {mode}")

    def backup(self) -> None:
        self.backups += 1
        r = self.daemon.cli("backup", "app", "--json")
        assert r.code == 0, r.err
        assert r.json["archive_base"] is True
        self.base_at = self.base_at or time.time()
        time.sleep(0.12)

    def _usable(self) -> list[tuple[float, int]]:
        return [(t, k) for t, k in self.quiet if self.base_at and t > self.base_at]

    def restore(self, pick: random.Random) -> None:
        self._restore(*pick.choice(self._usable()))

    def _restore(self, at: float, k: int) -> None:
        repo = Repository.open(f"file://{self.dir / 'var' / 'backups'}")
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
        if self._usable() and not self.n:    # every example restores at least once
            self._restore(*self._usable()[-1])
        assert self.app.stdin and self.app.stdout
        self.app.stdin.close()
        self.app.wait(30)
        self.app.stdout.close()
        self.daemon.stop()


def test_archive_state_machine(tmp_path):
    Archive.base_dir = tmp_path
    Archive.TestCase.settings = settings(max_examples=4, stateful_step_count=14, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    Archive.TestCase().runTest()
