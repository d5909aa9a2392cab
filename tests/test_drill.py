"""Recovery drills end to end: a real daemon protecting the bank while the bank application
writes; restore, verify, the application's checks, RTO/RPO; kept, shown, exported, notified."""

from __future__ import annotations

import json
import time
from pathlib import Path

from support import DaemonProc, free_port, wait_for, write_config
from support.metrics import scrape, value
from support.receivers import Receiver


def start(tmp_path: Path, bank, db_extra: str, extra: str = "") -> DaemonProc:
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]}, extra=extra, db_text=db_extra)
    return DaemonProc(cfg, port, tmp_path / "var").start()


CHECKS = ('drill_check = ["SELECT count(*) = 200 FROM accounts", '
          '"SELECT count(*) >= 0 FROM audit.audit"]\n'
          'drill_command = "test -s \\"$BASTION_DRILL_DIR/bank.db\\" && test \\"$BASTION_DRILL_DATABASE\\" = bank"')


def test_drill_restores_checks_and_measures_then_a_damaged_backup_fails_and_notifies(tmp_path, bank):
    hook = Receiver()
    d = start(tmp_path, bank, CHECKS, extra=f'[notify]\nwebhook = "{hook.url}"\ninterval = "1s"\n')
    try:
        bank.start(60)
        time.sleep(0.5)
        r = d.cli("backup", "bank", "--json")
        assert r.code == 0, r.err
        instant = r.json["instant"]
        time.sleep(1.0)                              # the newest data is now at least 1 s old
        r = d.cli("drill", "bank", "--json")
        assert r.code == 0, r.err + r.out
        res = r.json
        assert res["ok"] and res["backup"] and res["instant"] == instant
        assert [c["ok"] for c in res["checks"]] == [True, True]
        assert res["command"]["exit_code"] == 0
        assert 0 < res["rto_seconds"] <= res["seconds"]
        assert res["rpo_seconds"] >= 1.0
        assert not list((tmp_path / "var" / "drills").glob("bank-*"))        # scratch removed
        # kept, shown and exported
        st = d.api("GET", "/v1/status").json()
        assert st["drills"]["bank"]["backup"] == res["backup"] and st["drills"]["bank"]["ok"]
        assert st["backups"][0]["verification"]["mode"] == "full"      # the drill verified it fully
        m = scrape(d)
        assert value(m, "bastion_drill_last_ok", database="bank") == 1.0
        assert value(m, "bastion_drill_rto_seconds", database="bank") == res["rto_seconds"]
        human = d.cli("drill", "bank")
        assert human.code == 0 and "RTO" in human.out and "RPO" in human.out

        # damage every chunk of the repository: the drill must fail, say where, and notify
        chunks = [p for p in (tmp_path / "var" / "backups" / "chunks").rglob("*") if p.is_file()]
        assert chunks
        for p in chunks:
            p.write_bytes(b"not the chunk that was stored")
        r = d.cli("drill", "bank", "--json")
        assert r.code == 2, r.out
        assert not r.json["ok"] and "restore" in r.json["step"] and r.json["rto_seconds"] is None
        m = scrape(d)
        assert value(m, "bastion_drill_last_ok", database="bank") == 0.0
        wait_for(lambda: ("failing", "drill_failed:bank") in hook.events("drill_failed"), 60, "drill notification")
        hist = d.api("GET", "/v1/drills?database=bank").json()["drills"]
        assert [h["ok"] for h in hist[:3]] == [False, True, True]
    finally:
        d.stop()
        if bank.proc and bank.proc.poll() is None:
            bank.stop()
        hook.server.shutdown()
        hook.server.server_close()


def test_failing_application_check_fails_the_drill(tmp_path, bank):
    d = start(tmp_path, bank, 'drill_check = ["SELECT count(*) > 0 FROM accounts", '
                              '"SELECT count(*) FROM accounts WHERE balance < -1000000000"]')
    try:
        assert d.cli("backup", "bank").code == 0
        r = d.cli("drill", "bank", "--json")
        assert r.code == 2
        assert r.json["step"] == "application check (drill_check)"
        assert [c["ok"] for c in r.json["checks"]] == [True, False]
        r = d.cli("drill", "bank")                      # human form: the failing step on stderr
        assert r.code == 2 and "FAILED at step 'application check (drill_check)'" in r.err
        # no backup in another repository: a clear failure, not a crash
        r = d.cli("drill", "bank", "--from", f"file://{tmp_path / 'empty-repo'}", "--json")
        assert r.code == 2 and "not a Bastion backup repository" in r.json["error"]
        r = d.cli("drill", "nope")
        assert r.code == 3 and "not configured" in r.err
    finally:
        d.stop()


def test_drills_run_on_schedule(tmp_path, bank):
    d = start(tmp_path, bank, 'drill_check = ["SELECT count(*) = 200 FROM accounts"]',
              extra='[backups]\ndrill_schedule = "every 2s"\n')
    try:
        assert d.cli("backup", "bank").code == 0
        hist = wait_for(lambda: [h for h in d.api("GET", "/v1/drills?database=bank").json()["drills"] if h["ok"]],
                        60, "a scheduled drill")
        assert hist[0]["checks"][0]["ok"]
        jobs = {j["job"]: j for j in d.api("GET", "/v1/status").json()["jobs"]}
        wait_for(lambda: {j["job"]: j for j in d.api("GET", "/v1/status").json()["jobs"]}["drill bank"]["last_ok"],
                 60, "the job's success")
        assert "drill bank" in jobs
        assert json.loads(json.dumps(hist[0]))["rpo_seconds"] >= 0
    finally:
        d.stop()
