"""`bastion doctor`: check a machine for running Bastion, without needing the daemon.

Each check gives ok | warning | failed | unknown, a message and, when it is not ok, what to
do. Exit code: 0 all ok (unknown allowed), 1 a warning, 2 a failed check.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from typing import Any

import httpx

from .config import Config
from .errors import Outcome

FREE_FAIL, FREE_WARN = 5.0, 15.0      # percent free


def _c(check: str, status: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"check": check, "status": status, "message": message, "hint": hint}


def _perm(path: str, what: str, secret: bool) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _c(f"permissions of {what}", "unknown", f"{path} does not exist yet",
                  "the daemon creates it on its first start")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        return _c(f"permissions of {what}", "failed", f"{path} is writable by everyone (mode {mode:o})",
                  f"chmod o-w {path}")
    if secret and mode & 0o077:
        return _c(f"permissions of {what}", "failed", f"{path} is readable by other users (mode {mode:o})",
                  f"chmod 600 {path}: whoever reads it has admin access to the daemon")
    if not secret and mode & 0o007:
        return _c(f"permissions of {what}", "warning", f"{path} is open to other users (mode {mode:o})",
                  f"chmod o-rwx {path}: it holds copies of your data")
    return _c(f"permissions of {what}", "ok", f"{path} mode {mode:o}, owner uid {st.st_uid}")


def _journal_mode(path: str) -> str:
    from .sqlite import connect
    con = connect.reader(path, busy_ms=connect.REPORT_BUSY_MS)
    try:
        return str(con.execute("PRAGMA journal_mode").fetchall()[0][0]).lower()
    finally:
        con.close()


def _free(path: str) -> dict[str, Any]:
    p = path
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    u = shutil.disk_usage(p or "/")
    pct = 100.0 * u.free / u.total if u.total else 100.0
    msg = f"{path}: {u.free / 2**30:.1f} GiB free ({pct:.0f}%)"
    if pct < FREE_FAIL:
        return _c("free space", "failed", msg, "free space or move it: backups, WAL growth during continuous "
                  "operations and restores need room")
    if pct < FREE_WARN:
        return _c("free space", "warning", msg, "plan for more space before it runs out")
    return _c("free space", "ok", msg)


def _clock() -> dict[str, Any]:
    if shutil.which("timedatectl"):
        try:
            p = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                               text=True, timeout=5)
            if p.returncode == 0 and p.stdout.strip() in ("yes", "no"):
                if p.stdout.strip() == "yes":
                    return _c("clock sync", "ok", "the system clock is NTP-synchronised (timedatectl)")
                return _c("clock sync", "warning", "the system clock is not NTP-synchronised (timedatectl)",
                          "enable time sync (timedatectl set-ntp true, or chrony): sync conflicts, leases and "
                          "RPO figures rely on the clock")
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("chronyc"):
        try:
            p = subprocess.run(["chronyc", "tracking"], capture_output=True, text=True, timeout=5)
            if p.returncode == 0:
                ok = "Normal" in p.stdout
                return _c("clock sync", "ok" if ok else "warning", "chrony: " + (
                    "synchronised" if ok else "not synchronised"), None if ok else "check `chronyc sources`")
        except (OSError, subprocess.TimeoutExpired):
            pass
    return _c("clock sync", "unknown", "no timedatectl or chronyc answered: clock sync unknown",
              "make sure the clock is synchronised (NTP); sync conflict order and lease timing depend on it")


def _reach(what: str, url: str) -> dict[str, Any]:
    if "://" not in url:
        url = "http://" + url
    try:
        r = httpx.get(url.rstrip("/") + "/v1/health", timeout=3, verify=False)
        return _c(f"reach {what}", "ok", f"{url} answers (HTTP {r.status_code})")
    except httpx.HTTPError as exc:
        return _c(f"reach {what}", "failed", f"{url} does not answer: {type(exc).__name__}",
                  "check that its daemon runs, the address, and the firewall between the two machines")


def run(config: Config) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    # data_dir and token
    d = config.data_dir
    if os.path.isdir(d):
        checks.append(_c("data_dir", "ok" if os.access(d, os.W_OK) else "failed",
                         f"{d} exists" + ("" if os.access(d, os.W_OK) else " but is not writable"),
                         None if os.access(d, os.W_OK) else f"give the daemon's user write access to {d}"))
        checks.append(_perm(d, "data_dir", secret=False))
    else:
        parent = os.path.dirname(d.rstrip("/")) or "/"
        ok = os.access(parent, os.W_OK)
        checks.append(_c("data_dir", "ok" if ok else "failed", f"{d} does not exist yet" + (
            "; the daemon will create it" if ok else f" and {parent} is not writable"),
            None if ok else f"create {d} and give the daemon's user write access"))
    checks.append(_perm(config.token_file, "token file", secret=True))
    # protected files
    for name, db in sorted(config.databases.items()):
        for f in db.files:
            if not os.path.exists(f):
                checks.append(_c(f"database {name}", "warning", f"{f} does not exist",
                                 "check the path; the daemon protects it once it appears"))
                continue
            try:
                mode = _journal_mode(f)
            except Exception as exc:  # not a database, locked, unreadable: all worth saying
                checks.append(_c(f"database {name}", "failed", f"{f}: cannot be read as SQLite: {exc}",
                                 "check the file and its permissions"))
                continue
            if mode == "wal":
                checks.append(_c(f"database {name}", "ok", f"{f}: WAL mode"))
            else:
                checks.append(_c(f"database {name}", "warning", f"{f}: journal_mode={mode}, not WAL",
                                 "the daemon switches it to WAL when it protects it; start it (`bastion serve`)"))
    # repositories
    from .backup.backups import default_repository
    repos = {default_repository(config, n) for n in config.databases} or {default_repository(config, "x")}
    for url in sorted(repos):
        if url.startswith("file://"):
            path = url[7:]
            checks.append(_perm(path, f"repository {url}", secret=False))
            checks.append(_free(path))
        else:
            try:
                from .backup import Repository
                Repository.open(url)
                checks.append(_c(f"repository {url}", "ok", "reachable and readable"))
            except Exception as exc:
                checks.append(_c(f"repository {url}", "failed", f"{getattr(exc, 'message', exc)}",
                                 getattr(exc, "hint", None) or "check the URL, the credentials and the network"))
    seen_dirs = {os.path.dirname(f) for db in config.databases.values() for f in db.files} | {d}
    for p in sorted(seen_dirs):
        checks.append(_free(p))
    checks.append(_clock())
    # peers and targets
    for name, db in sorted(config.databases.items()):
        if db.replicate_to:
            checks.append(_reach(f"replication target of {name}", db.replicate_to))
    for gname, g in sorted(config.sync.groups.items()):
        for site in g.neighbours:
            checks.append(_reach(f"sync site {site} ({gname})", g.sites[site]))
    for node, addr in sorted((config.cluster.peers if config.cluster else {}).items()):
        if config.cluster and node != config.cluster.node:
            checks.append(_reach(f"cluster node {node}", addr))
    # dedupe identical free-space lines (several paths on one file system)
    seen, unique = set(), []
    for c in checks:
        k = (c["check"], c["message"])
        if k not in seen:
            seen.add(k)
            unique.append(c)
    failed = sum(c["status"] == "failed" for c in unique)
    warned = sum(c["status"] == "warning" for c in unique)
    verdict = Outcome.FAILED if failed else (Outcome.PARTIAL if warned else Outcome.OK)
    summary = (f"{failed} failed, {warned} warning(s), {len(unique) - failed - warned} ok or unknown"
               if failed or warned else f"all {len(unique)} checks ok (or unknown)")
    return {"checks": unique, "failed": failed, "warnings": warned, "summary": summary, "verdict": verdict}
