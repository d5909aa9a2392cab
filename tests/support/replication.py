"""A primary daemon protecting the bank and a backup daemon holding its replica."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from support.bank import App, check_bank
from support.daemon import DaemonProc, write_config
from support.data import integrity, user_rows
from support.proc import free_port


class Pair:
    """A primary daemon protecting the bank and a backup daemon holding its replica."""

    def __init__(self, tmp_path: Path, bank: App, schedule: str = "continuous", primary_extra: str = "") -> None:
        self.tmp, self.bank = tmp_path, bank
        self.token_file = tmp_path / "peer.token"
        self.token_file.write_text(secrets.token_hex(32) + "\n")
        self.copy = tmp_path / "backup" / "copy"
        bdir = tmp_path / "backup"
        bdir.mkdir()
        bport = free_port()
        repl = f'[replication]\npeer_token_file = "{self.token_file}"\n'
        cfg = write_config(bdir, bport, {"bank": {"files": [self.copy / "bank.db", self.copy / "audit.db"],
                                                  "replica_of": "bank"}}, extra=repl)
        self.backup = DaemonProc(cfg, bport, bdir / "var")
        pdir = tmp_path / "primary"
        pdir.mkdir()
        pport = free_port()
        cfg = write_config(pdir, pport, {"bank": {"files": [bank.bank, bank.audit],
                                                  "replicate_to": f"http://127.0.0.1:{bport}",
                                                  "replicate_schedule": schedule}}, extra=repl, db_text=primary_extra)
        self.primary = DaemonProc(cfg, pport, pdir / "var")

    def start(self, backup: bool = True) -> Pair:
        if backup:
            self.backup.start()
        self.primary.start()
        return self

    def stop(self) -> None:
        for d in (self.primary, self.backup):
            try:
                d.stop()
            except Exception:
                pass

    def status(self, d: DaemonProc | None = None) -> dict:
        r = (d or self.primary).cli("replicate", "status", "--json")
        assert r.code in (0, 1), r.err
        return r.json["databases"][0]

    def catch_up(self, timeout: float = 60) -> dict:
        """Ship everything now (whatever the schedule) until nothing is pending."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.primary.cli("replicate", "run", "bank", "--json")
            st = self.status()
            if r.code == 0 and st["lag_changes"] == 0:
                return r.json
            assert time.monotonic() < deadline, (r.out, r.err, st)
            time.sleep(0.5)

    def assert_same(self) -> None:
        for name in ("bank.db", "audit.db"):
            want = user_rows(self.bank.dir / name)
            got = user_rows(self.copy / name)
            assert [t[0] for t in got] == [t[0] for t in want]
            assert got == want, f"{name}: replica differs from primary"
            assert integrity(self.copy / name) == "ok"
        res = check_bank(self.copy)
        assert res["ok"], res
