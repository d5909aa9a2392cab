"""Daemon and file commands: serve, status, protect, startbu/endbu/exec, recover, freeze/thaw, doctor."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from ..errors import EXIT_FAILED, EXIT_OK, BastionError, UsageError
from .base import (
    _TAIL,
    _client,
    _fmt_bytes,
    _seconds,
    _spinner,
    cli,
    common,
    emit,
    err,
    exit_code_of,
    out,
    targets_option,
)


@cli.command()
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@common
def serve(conf: cfg.Config, as_json: bool, log_level: str) -> None:
    """Run the daemon in the foreground (stop it with Ctrl-C or SIGTERM)."""
    from ..daemon.server import serve as run
    run(conf, log_level)


@cli.command()
@common
def status(conf: cfg.Config, as_json: bool) -> None:
    """Protected databases and files: WAL mode, continuous operations, delta size, freezes."""
    data = _client(conf).status()

    def human(d: dict[str, Any]) -> None:
        dm = d["daemon"]
        out.print(f"daemon pid {dm['pid']} on {dm['listen']} since {dm['started_at']} "
                  f"(bastion {dm['version']}, SQLite {dm['sqlite_version']}, config: {dm['config']})")
        if not d["databases"]:
            out.print("no database protected yet: list them in the config, or name files by path")
        table = Table("database", "file", "protected", "journal", "WAL file", "delta", "continuous operations",
                      "frozen")
        hints: list[str] = []
        for db in d["databases"]:
            for f in db["files"]:
                co = f["contops"]
                co_s = "-" if not co else (f"since {co['since']}" if co["status"] == "active"
                                           else f"{co['status']} (since {co['since']})")
                fr = f["frozen"]
                fr_s = "-" if not fr else (f"since {fr['since']}" if fr["status"] == "active" else fr["status"])
                state = f.get("state") or ("protected" if f["protected"] else "unprotected")
                prot = "yes" if state == "protected" else (
                    f"no: {f['error']}" if state == "unprotected" and f["error"] else f"no: {state.upper()}")
                if f.get("hint"):
                    hints.append(f"{f['path']}: {state}: {f['hint']}")
                delta = "-" if f.get("delta_bytes") is None else _fmt_bytes(f["delta_bytes"])
                table.add_row(db["name"], f["path"], prot, f["journal_mode"] or "-",
                              _fmt_bytes(f["wal_bytes"]), delta, co_s, fr_s)
        out.print(table)
        if d.get("backups"):
            bk = Table("database", "latest backup", "instant", "verified")
            for b in d["backups"]:
                bk.add_row(b["database"], b["backup"] or "none", b["instant"] or "-",
                           f"unknown: {b['error']}" if b["error"] else (b["verified"] or "-"))
            out.print(bk)
        for h in hints:
            err.print(f"hint: {h}")
        if d.get("jobs"):
            jobs = Table("job", "schedule", "next run", "last success", "problem")
            for j in d["jobs"]:
                problem = f"FAILED {j['failures']}x: {j['last_error']}" if j["last_error"] else "-"
                jobs.add_row(j["job"], j["schedule"], j["next_run"] or "-", j["last_ok"] or "never", problem)
            out.print(jobs)
        _print_drills_and_alerts(d)
    emit(data, as_json, human)


def _print_drills_and_alerts(d: dict[str, Any]) -> None:
    if d.get("drills"):
        t = Table("database", "last drill", "backup", "outcome", "RTO", "RPO")
        for name, r in sorted(d["drills"].items()):
            t.add_row(name, r["started"], r.get("backup") or "-", "ok" if r["ok"] else f"FAILED: {r['error']}",
                      "-" if r.get("rto_seconds") is None else f"{r['rto_seconds']:.1f} s",
                      "-" if r.get("rpo_seconds") is None else f"{r['rpo_seconds']:.0f} s")
        out.print(t)
    for a in d.get("alerts") or []:
        err.print(f"alert: {a['message']}" + ("" if a.get("notified_at") else " (not yet notified)"))


@cli.command()
@common
@targets_option
def protect(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool) -> None:
    """Protect files now (WAL mode, kept open), e.g. files not in the config, before the application starts."""
    data = _client(conf).protect(targets, all_)

    def human(d: dict[str, Any]) -> None:
        for f in d["files"]:
            out.print(f"  {f['path']}: protected (journal mode {f['journal_mode']})")
    emit(data, as_json, human)


@cli.command()
@click.option("--max-duration", type=float, default=None, callback=_seconds,
              help="Seconds after which the daemon ends the session on its own (default: config).")
@common
@targets_option
def startbu(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, max_duration: float | None) -> None:
    """Put databases or files into continuous operations at one instant.

    TARGETS are database names, file paths or @LISTFILE (one path per line).
    Until endbu the main files do not change by a byte: copy them with any tool.
    """
    data = _client(conf).startbu(targets, all_, max_duration)
    emit(data, as_json, _print_start)


def _print_start(d: dict[str, Any]) -> None:
    for w in d.get("warnings", []):
        err.print(f"warning: {w}")
    out.print(f"continuous operations started at {d['started_at']} (session {d['session']}); "
              f"writers paused {d['writers_paused_ms']:.1f} ms; ends on its own at {d['expires_at']}")
    for f in d["files"]:
        out.print(f"  {f['path']}: main file {_fmt_bytes(f['main_bytes'])} frozen; copy it now")


@cli.command()
@click.option("--no-wait", is_flag=True, help="Return once the holds are released; roll-in goes on in the daemon.")
@common
@targets_option
def endbu(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, no_wait: bool) -> None:
    """End continuous operations and roll the delta in (waits until done unless --no-wait)."""
    with _spinner(as_json, "rolling in the delta..."):
        data = _client(conf).endbu(targets, all_, wait=not no_wait)
    emit(data, as_json, _print_end)


def _print_end(d: dict[str, Any]) -> None:
    for f in d["files"]:
        if not f["consistent"]:
            err.print(f"error: {f['message']}")
        if f["roll_in"] == "started":
            out.print(f"  {f['path']}: roll-in started in the daemon")
            continue
        secs = f["roll_in_seconds"]
        rate = f" ({_fmt_bytes(f['delta_bytes'] / secs)}/s)" if secs > 0 and f["delta_bytes"] else ""
        out.print(f"  {f['path']}: delta {_fmt_bytes(f['delta_bytes'])} rolled in "
                  f"{'completely' if f['roll_in'] == 'complete' else 'INCOMPLETELY'} in {secs:.3f} s{rate}")
        if f.get("roll_in_problem"):
            err.print(f"warning: {f['path']}: {f['roll_in_problem']}; SQLite will finish the roll-in "
                      "at a later checkpoint")
    if d["consistent"]:
        out.print("continuous operations ended: the copy taken since startbu is consistent")


def _run(command: list[str], as_json: bool) -> tuple[int | None, str | None]:
    """Run the user's command; with --json our stdout is the JSON document, so its output goes to stderr."""
    try:
        return subprocess.call(command, stdout=sys.stderr if as_json else None), None
    except OSError as exc:
        return None, f"cannot run {command[0]}: {exc.strerror}"


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@common
@targets_option
def exec_(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool) -> None:
    """startbu, run a backup COMMAND, endbu even if it failed:  bastion exec NAME... -- COMMAND ARGS...

    Exits non-zero if the command failed or the copy is not consistent.
    """
    command = list(_TAIL)
    if not command:
        raise UsageError("no command given: write it after '--', e.g. bastion exec bank -- tar cf b.tar "
                         "/srv/app/bank.db", hint="bastion exec NAME... -- COMMAND ARGS...")
    client = _client(conf)
    start = client.startbu(targets, all_)
    if not as_json:
        _print_start(start)
    t0 = time.monotonic()
    rc, error = None, None
    try:
        rc, error = _run(command, as_json)
    finally:
        paths = [f["path"] for f in start["files"]]
        try:
            end = client.endbu(paths)
        except BastionError as exc:
            # The daemon is gone or refused: the holds may have died with it.
            raise BastionError(f"{exc.message}; the copy taken since startbu cannot be trusted",
                               hint=exc.hint) from None
    result: dict[str, Any] = {"startbu": start, "command": {"argv": command, "exit_code": rc, "error": error,
                                            "seconds": round(time.monotonic() - t0, 3)},
              "endbu": end}
    ok_cmd = rc == 0
    result["exit_code"] = EXIT_FAILED if not ok_cmd or not end["consistent"] else exit_code_of(end)

    def human(d: dict[str, Any]) -> None:
        if error:
            err.print(f"error: {error}")
        elif not ok_cmd:
            err.print(f"error: the command exited with status {rc}")
        _print_end(end)
    emit(result, as_json, human)


@cli.command()
@click.option("--discard-changes", is_flag=True,
              help="Return the files to their startbu instant (only when provably safe).")
@common
@targets_option
def recover(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, discard_changes: bool) -> None:
    """After an interrupted continuous operations: roll the delta in (default) or discard it."""
    data = _client(conf).recover(targets, all_, discard_changes)

    def human(d: dict[str, Any]) -> None:
        for f in d["files"]:
            if f["action"] == "discarded":
                out.print(f"  {f['path']}: back to {f['back_to']}; {_fmt_bytes(f['discarded_wal_bytes'])} of "
                          f"changes set aside as {f['wal_kept_as']}; quick_check {f['quick_check']}")
            else:
                out.print(f"  {f['path']}: delta {_fmt_bytes(f['delta_bytes'])} rolled in "
                          f"{'completely' if f['complete'] else 'INCOMPLETELY'}")
    emit(data, as_json, human)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--timeout", type=float, default=None, callback=_seconds,
              help="Seconds before an automatic thaw (default 10).")
@common
@targets_option
def freeze(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, timeout: float | None) -> None:
    """Hold every writer (readers go on) until thaw or --timeout.

    With `-- COMMAND ARGS...`: freeze, run the command (e.g. a filesystem snapshot), thaw, report the hold.
    """
    client = _client(conf)
    data = client.freeze(targets, all_, timeout)
    command = list(_TAIL)
    if not command:
        def human(d: dict[str, Any]) -> None:
            for w in d.get("warnings", []):
                err.print(f"warning: {w}")
            out.print(f"frozen at {d['frozen_at']} (freeze {d['freeze']}); thaws on its own at {d['thaw_by']}")
            for f in d["files"]:
                out.print(f"  {f['path']}: main file {'complete' if f['main_file_complete'] else 'needs its WAL'}")
        emit(data, as_json, human)
        return
    rc, error = None, None
    try:
        rc, error = _run(command, as_json)
    finally:
        try:
            thaw = client.thaw([f["path"] for f in data["files"]])
        except BastionError as exc:
            raise BastionError(f"{exc.message}; the snapshot taken under this freeze cannot be trusted",
                               hint=exc.hint) from None
    result = {"freeze": data, "command": {"argv": command, "exit_code": rc, "error": error}, "thaw": thaw,
              "hold_seconds": thaw["hold_seconds"]}
    result["exit_code"] = EXIT_FAILED if rc != 0 or not thaw["consistent"] else EXIT_OK

    def human2(d: dict[str, Any]) -> None:
        if error:
            err.print(f"error: {error}")
        elif rc != 0:
            err.print(f"error: the command exited with status {rc}")
        _print_thaw(thaw)
    emit(result, as_json, human2)


def _print_thaw(d: dict[str, Any]) -> None:
    for f in d["files"]:
        if f["consistent"]:
            out.print(f"  {f['path']}: thawed after {f['hold_seconds'] * 1000:.1f} ms")
        else:
            err.print(f"error: {f['message']}")


@cli.command()
@common
@targets_option
def thaw(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool) -> None:
    """End a freeze; fails if the freeze had already timed out."""
    data = _client(conf).thaw(targets, all_)
    emit(data, as_json, _print_thaw)


@cli.command()
@common
def doctor(conf: cfg.Config, as_json: bool) -> None:
    """Check this machine for Bastion: WAL mode of protected files, permissions of the token, data_dir
    and repository, clock sync, free space, reachable peers and targets.

    Runs without the daemon. Exit 0 if all is well, 1 if there are warnings, 2 if a check failed."""
    from ..doctor import run as run_doctor
    data = run_doctor(conf)

    def human(d: dict[str, Any]) -> None:
        marks = {"ok": "ok  ", "warning": "WARN", "failed": "FAIL", "unknown": "??  "}
        for c in d["checks"]:
            line = f"{marks[c['status']]} {c['check']}: {c['message']}"
            (out if c["status"] in ("ok", "unknown") else err).print(line)
            if c.get("hint") and c["status"] != "ok":
                err.print(f"     hint: {c['hint']}")
        out.print(f"{d['summary']}")
    emit(data, as_json, human)
