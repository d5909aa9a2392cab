"""Notifications driven by real failures of a real daemon, delivered to a real webhook receiver
(an HTTP server in this test), a real SMTP server (aiosmtpd on loopback) and a command hook."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from support import DaemonProc, free_port, wait_for, write_config
from support.receivers import Mailbox, Receiver

SECRET = "s3cret-for-hmac"


@pytest.fixture
def smtp():
    box = Mailbox()
    port = free_port()
    c = Controller(box, hostname="127.0.0.1", port=port)
    c.start()
    yield box, port
    c.stop()


def test_failing_backup_notifies_once_per_streak_then_recovers(tmp_path: Path, bank, smtp):
    box, smtp_port = smtp
    hook = Receiver(fail_first=1)        # the first delivery attempt fails: the retry must deliver it
    (tmp_path / "secret").write_text(SECRET + "\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the repository's parent directory should be")
    ran = tmp_path / "command.log"
    port = free_port()
    db = {"files": [bank.bank, bank.audit], "repository": f"file://{blocker}/repo", "schedule": "every 2s"}
    cfg = write_config(tmp_path, port, {"bank": db}, extra=(
        f'[notify]\nwebhook = "{hook.url}"\nwebhook_secret_file = "{tmp_path / "secret"}"\n'
        f'smtp_host = "127.0.0.1"\nsmtp_port = {smtp_port}\nemail_to = ["ops@example.com"]\n'
        f'email_from = "bastion@example.com"\ninterval = "1s"\n'
        f'command = "echo $BASTION_NOTIFY_EVENT $BASTION_NOTIFY_KEY >> {ran}"\n'))
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        wait_for(lambda: hook.events("backup_failed:bank"), 60, "the failing notification")
        # several failed runs in a row: still one message for the streak
        wait_for(lambda: (d.api("GET", "/v1/status").json()["jobs"][0]["failures"] or 0) >= 3, 60,
                 "3 failures")
        time.sleep(1.5)
        assert hook.events("backup_failed:bank") == [("failing", "backup_failed:bank")]
        assert hook.attempts >= 2                      # a 500 was retried
        post = hook.posts[0]
        expected = "sha256=" + hmac.new(SECRET.encode(), post["raw"], hashlib.sha256).hexdigest()
        assert post["signature"] == expected
        assert "failed" in post["body"]["message"] and post["body"]["subject"] == "bank"
        mails = wait_for(lambda: [m for m in box.messages if "backup_failed" in m[1]], 60, "the e-mail")
        assert mails[0][0] == ["ops@example.com"] and "FAILING" in mails[0][1]
        wait_for(lambda: ran.exists() and "failing backup_failed:bank" in ran.read_text(), 60, "the command")
        alerts = d.api("GET", "/v1/status").json()["alerts"]
        assert [a["key"] for a in alerts if a["kind"] == "backup_failed"] == ["backup_failed:bank"]

        # fix the cause: the next scheduled run succeeds and a recovery goes out, once
        blocker.unlink()
        blocker.mkdir()
        wait_for(lambda: ("recovered", "backup_failed:bank") in hook.events("backup_failed:bank"), 60, "recovery")
        wait_for(lambda: [m for m in box.messages if "RECOVERED" in m[1]], 60, "the recovery e-mail")
        wait_for(lambda: "recovered backup_failed:bank" in ran.read_text(), 60, "the recovery command")
        time.sleep(2.5)
        assert hook.events("backup_failed:bank") == [("failing", "backup_failed:bank"),
                                                      ("recovered", "backup_failed:bank")]
        assert not [a for a in d.api("GET", "/v1/status").json()["alerts"] if a["kind"] == "backup_failed"]
    finally:
        d.stop()
        hook.server.shutdown()
        hook.server.server_close()


def test_interrupted_continuous_operations_notify_and_survive_restart(tmp_path: Path, bank):
    """A streak is kept in the state database: a restart does not send it again."""
    hook = Receiver()
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       extra=f'[notify]\nwebhook = "{hook.url}"\ninterval = "1s"\n')
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    assert d.cli("startbu", "bank").code == 0
    d.kill9()                                   # the session dies with the daemon
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        got = wait_for(lambda: len(hook.events("contops_interrupted:")) >= 2 and hook.events("contops_interrupted:"),
                       60, "the interrupted notifications of both files")
        assert sorted(k for _, k in got) == sorted(f"contops_interrupted:{p}" for p in (bank.bank, bank.audit))
        d.stop()
        d = DaemonProc(cfg, port, tmp_path / "var").start()
        time.sleep(2.5)
        assert len(hook.events("contops_interrupted:")) == 2        # not sent again after the restart
        r = d.cli("endbu", "bank")                                  # acknowledged: the streak ends
        assert r.code != 0 and "interrupted" in (r.err + r.out)
        wait_for(lambda: len([e for e in hook.events("contops_interrupted:") if e[0] == "recovered"]) == 2,
                 60, "recovery of both files")
    finally:
        d.stop()
        hook.server.shutdown()
        hook.server.server_close()


def test_notify_config_errors_are_clear(tmp_path: Path):
    from bastion.config import load
    from bastion.errors import ConfigError
    for body, msg in [('webhook = "ftp://x"', "webhook must be a URL"),
                      ('email_to = "ops@example.com"', "smtp_host"),
                      ('interval = "1s"', "names no channel"),
                      ('webhook = "http://x"\nbogus = 1', "unknown key 'bogus'"),
                      ('webhook = "http://x"\nwebhook_secret_file = "nope"', "webhook_secret_file")]:
        p = tmp_path / "b.toml"
        p.write_text(f"[notify]\n{body}\n")
        with pytest.raises(ConfigError, match=msg):
            load(str(p))
