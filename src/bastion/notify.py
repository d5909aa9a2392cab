"""Notifications: one facility for every failure the daemon can detect.

A thread looks at the daemon's own state every ``interval`` (the same state `bastion status`
and /metrics show) and derives the set of problems open now, each under a stable key such as
``backup_failed:bank``. A key that appears opens a *streak*: one "failing" message goes to
every channel. While it stays open nothing more is sent (no storm every interval). When it
disappears a "recovered" message goes out and the streak closes. Open streaks live in the
state database, so a restart neither repeats nor forgets them. One-off events (a node became
active: a failover) are sent once, with no streak.

Channels: webhook (a JSON POST, retried, signed with HMAC-SHA256 in ``X-Bastion-Signature``),
e-mail over SMTP, and a command (run like every hook: bastion.hooks; a string through the
shell, a list as argv, with ``BASTION_NOTIFY_*`` in its environment).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import smtplib
import socket
import threading
import time
from email.message import EmailMessage
from typing import Any
from collections.abc import Callable

import httpx

from . import hooks
from .config import NotifyConfig
from .state import epoch, iso

log = logging.getLogger("bastion.notify")

SIGNATURE_HEADER = "X-Bastion-Signature"


# -- what is wrong now ---------------------------------------------------------------------

def _age(text: str | None) -> float | None:
    t = epoch(text)
    return None if t is None else time.time() - t


def problems(daemon: Any, conf: NotifyConfig) -> dict[str, tuple[str, str, str]]:
    """key -> (kind, subject, message) for every failure open now. A part that cannot be read
    is left out (its own failure shows in the log and in bastion_scrape_errors)."""
    out: dict[str, tuple[str, str, str]] = {}
    parts: list[Callable[[], None]] = []

    def jobs() -> None:
        for job in daemon.scheduler.jobs:
            s = daemon.state.job(job.name) or {}
            if s.get("failures"):
                kind, _, name = job.name.partition(" ")
                out[f"{kind}_failed:{name}"] = (f"{kind}_failed", name, f"scheduled {job.name} failed "
                                                f"{s['failures']} time(s) in a row: {s.get('last_error')}")

    def backups() -> None:
        for name in daemon.config.databases:
            b = daemon.backups.latest(name)
            age = _age(b.get("instant"))
            limit = conf.backup_max_age
            if limit and (age is None or age > limit) and not b.get("error"):
                what = "no backup yet" if age is None else f"the newest backup is {age / 3600:.1f} h old"
                out[f"backup_overdue:{name}"] = ("backup_overdue", name, f"backup of {name} overdue: {what} "
                                                 f"(limit {limit / 3600:g} h)")
            v = b.get("verification")
            if v and not v.get("ok"):
                out[f"verify_failed:{name}"] = ("verify_failed", name, f"the newest backup of {name} "
                                                f"({b.get('backup')}) failed its {v.get('mode')} verify")
            vlimit = conf.verify_max_age
            if vlimit and b.get("backup") and (not v or (_age(v.get("at")) or 0) > vlimit):
                out[f"verify_overdue:{name}"] = ("verify_overdue", name, f"the newest backup of {name} was not "
                                                 f"verified in the last {vlimit / 3600:g} h")

    def contops() -> None:
        for r in daemon.state.open_files("contops"):
            if r["status"] in ("interrupted", "expired"):
                out[f"contops_interrupted:{r['path']}"] = (
                    "contops_interrupted", r.get("database") or r["path"],
                    f"continuous operations on {r['path']} {r['status']}: {r.get('reason') or ''} "
                    "(the copy taken during it is not consistent; `bastion endbu` or `bastion recover`)")

    def replication() -> None:
        lag_limit = conf.replication_lag
        for r in daemon.replication.status()["databases"]:
            name = r["database"]
            if r.get("failures"):
                out[f"replication_failing:{name}"] = ("replication_failing", name, f"replication of {name} to "
                                                      f"{r.get('peer')} failing: {r.get('last_error')}")
            if lag_limit and (r.get("lag_seconds") or 0) > lag_limit:
                out[f"replication_lagging:{name}"] = ("replication_lagging", name, f"replication of {name} is "
                                                      f"{r['lag_seconds']:.0f} s behind (limit {lag_limit:g} s)")
            if r.get("degraded"):
                out[f"durability_degraded:{name}"] = ("durability_degraded", name, f"commits to {name} are "
                                                      "acknowledged without the standby (degraded durability)")
            if r.get("divergence"):
                out[f"replica_diverged:{name}"] = ("replica_diverged", name, f"the replica {name} has "
                                                   f"{r['divergence']} local change(s) the primary does not have")

    def sync() -> None:
        limit = conf.sync_lag_changes
        for r in daemon.sync.status()["databases"]:
            name = r["database"]
            if r.get("failures"):
                out[f"sync_failing:{name}"] = ("sync_failing", name, f"sync of {name} failing: {r.get('last_error')}")
            if limit:
                for f in r.get("files", []):
                    for p, s in (f.get("peers") or {}).items():
                        if (s.get("lag_changes") or 0) > limit:
                            out[f"sync_lagging:{name}:{p}"] = ("sync_lagging", name, f"{p} lacks "
                                                               f"{s['lag_changes']} changes of {name}")

    def drills() -> None:
        for name, r in daemon.state.latest_drills().items():
            if not r.get("ok"):
                out[f"drill_failed:{name}"] = ("drill_failed", name, f"recovery drill of {name} failed: "
                                               f"{r.get('error')}")

    def disks() -> None:
        limit = conf.disk_free_percent
        dirs = {daemon.config.data_dir}
        for d in daemon.config.databases.values():
            dirs |= {os.path.dirname(p) for p in d.files}
            from .backup.backups import default_repository
            url = default_repository(daemon.config, d.name)
            if url.startswith("file://"):
                dirs.add(url[7:])
        seen: set[int] = set()
        for path in sorted(dirs):
            while path and not os.path.exists(path):
                path = os.path.dirname(path)
            try:
                dev = os.stat(path).st_dev
                if dev in seen:
                    continue
                seen.add(dev)
                u = shutil.disk_usage(path)
            except OSError:
                continue
            free = 100.0 * u.free / u.total if u.total else 100.0
            if free < limit:
                out[f"disk_full:{path}"] = ("disk_full", path, f"{path}: only {free:.1f}% free "
                                            f"({u.free / 2**30:.1f} GiB; limit {limit:g}%)")

    parts = [jobs, backups, contops, replication, sync, drills, disks]
    for part in parts:
        try:
            part()
        except Exception as exc:  # NotActive, an unreachable repository: the rest still counts
            log.debug("notify: %s: %s", part.__name__, exc)
    return out


# -- channels --------------------------------------------------------------------------------

def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def send(conf: NotifyConfig, message: dict[str, Any]) -> dict[str, str | None]:
    """Deliver one message on every channel; channel -> None if delivered, else the error."""
    results: dict[str, str | None] = {}
    body = json.dumps(message, sort_keys=True).encode()
    for url in conf.webhook:
        results[f"webhook {url}"] = _webhook(conf, url, body)
    if conf.email_to:
        results["email"] = _email(conf, message)
    if conf.command:
        env = {"BASTION_NOTIFY_" + k.upper(): str(v) for k, v in message.items() if v is not None}
        env["BASTION_NOTIFY_JSON"] = body.decode()
        res = hooks.run(conf.command, "notify command", env=env)
        results["command"] = res["error"]
    for channel, error in results.items():
        if error:
            log.error("notification %s via %s not delivered: %s", message.get("key"), channel, error)
    return results


def _webhook(conf: NotifyConfig, url: str, body: bytes) -> str | None:
    headers = {"content-type": "application/json", "user-agent": "bastion-notify"}
    if conf.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(conf.webhook_secret, body)
    error = None
    for attempt in range(conf.webhook_retries + 1):
        if attempt:
            time.sleep(min(30.0, 0.5 * 2 ** attempt))
        try:
            r = httpx.post(url, content=body, headers=headers, timeout=conf.webhook_timeout)
            if r.status_code < 300:
                return None
            error = f"HTTP {r.status_code}"
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                return error            # the receiver refuses it: retrying sends the same refusal
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
    return error


def _email(conf: NotifyConfig, message: dict[str, Any]) -> str | None:
    msg = EmailMessage()
    state = {"failing": "FAILING", "recovered": "RECOVERED", "event": "EVENT"}.get(message["event"], "")
    msg["Subject"] = f"[bastion {message.get('host')}] {state}: {message['kind']} {message['subject']}"
    msg["From"] = conf.email_from or ""
    msg["To"] = ", ".join(conf.email_to)
    msg.set_content(f"{message['message']}\n\n" + json.dumps(message, indent=2, sort_keys=True) + "\n")
    try:
        with smtplib.SMTP(conf.smtp_host or "", conf.smtp_port, timeout=30) as s:
            if conf.smtp_starttls:
                s.starttls()
            if conf.smtp_user:
                s.login(conf.smtp_user, conf.smtp_password or "")
            s.send_message(msg)
        return None
    except (OSError, smtplib.SMTPException) as exc:
        return f"{type(exc).__name__}: {exc}"


# -- the loop --------------------------------------------------------------------------------

class Notifier:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.conf: NotifyConfig | None = daemon.config.notify     # None: nothing to send
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent: list[dict[str, Any]] = []     # the last messages, for status

    def start(self) -> None:
        if not self.conf:
            return
        self._thread = threading.Thread(target=self._loop, name="bastion-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def poke(self) -> None:
        """Look now (a job just failed or succeeded)."""
        self._wake.set()

    def event(self, kind: str, subject: str, text: str) -> None:
        """A one-off event (no streak): sent once, from the notify thread."""
        if self.conf:
            threading.Thread(target=self._deliver, args=("event", f"{kind}:{subject}", kind, subject, text,
                                                         time.time()), daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # the notifier must not die
                log.exception("notify")
            self._wake.wait(self.conf.interval if self.conf else 30.0)
            self._wake.clear()

    def check(self) -> dict[str, Any]:
        state = self.daemon.state
        assert self.conf is not None
        now_open = problems(self.daemon, self.conf)
        known = state.alerts()
        for key, (kind, subject, text) in now_open.items():
            if key not in known:
                state.open_alert(key, kind, subject, text)
                known[key] = {"key": key, "since": time.time(), "notified_at": None}
            # not yet delivered: (re)try
            if known[key].get("notified_at") is None and self._deliver("failing", key, kind, subject, text,
                                                                         known[key]["since"]):
                state.alert_notified(key)
        for key, row in known.items():
            if key not in now_open:
                if row.get("notified_at") is not None:
                    self._deliver("recovered", key, row["kind"], row["subject"],
                                  f"recovered after {time.time() - row['since']:.0f} s: {row['message']}",
                                  row["since"])
                state.close_alert(key)
        return {"open": sorted(now_open)}

    def _deliver(self, event: str, key: str, kind: str, subject: str, text: str, since: float) -> bool:
        msg = {"event": event, "key": key, "kind": kind, "subject": subject, "message": text,
               "since": iso(since), "at": iso(time.time()), "host": self.host, "daemon": self.daemon.config.listen}
        assert self.conf is not None
        res = send(self.conf, msg)
        self.sent = (self.sent + [{**msg, "delivered": {k: v is None for k, v in res.items()}}])[-20:]
        log.warning("notification %s %s: %s", event, key, text) if event != "recovered" else \
            log.info("notification recovered %s", key)
        return any(v is None for v in res.values())
