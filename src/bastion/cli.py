"""The command line: parse, call the daemon's API, print. Nothing else lives here.

Exit codes (like BUTIL): 0 success, 1 partial (done, with a warning such as an
incomplete roll-in), 2 failed (including "the copy is not consistent" and "no
daemon"), 3 usage (bad command line, unknown database; nothing was done).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from . import config as cfg
from .daemon.client import AdminClient
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BastionError, UsageError
from .tls import trust

# Piped or redirected, rich would squeeze tables into 80 columns and cut paths with '…':
# give them the room they need, so `bastion status | grep` sees whole paths.
out = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# `bastion exec NAME... -- CMD` and `bastion freeze NAME... -- CMD`: click drops "--",
# so main() cuts the command off argv before click parses the rest.
_TAIL: list[str] = []


def _fmt_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --json mean the same on every command."""
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Config file (default ./bastion.toml if present, else the embedded default).")
    @functools.wraps(f)
    def wrapper(*args: Any, config_path: str | None, as_json: bool, **kw: Any) -> Any:
        ctx = click.get_current_context()
        path = config_path or (ctx.obj or {}).get("config")
        conf = cfg.load(path)
        return f(conf, as_json, *args, **kw)
    return wrapper


def targets_option(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.argument("targets", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every configured database (and protected file).")
    @functools.wraps(f)
    def wrapper(conf: cfg.Config, as_json: bool, targets: tuple[str, ...], all_: bool, **kw: Any) -> Any:
        return f(conf, as_json, expand_targets(conf, targets), all_, **kw)
    return wrapper


def expand_targets(conf: cfg.Config, args: tuple[str, ...]) -> list[str]:
    """Database names stay names; '@list' files and paths become absolute paths."""
    names: list[str] = []
    for a in args:
        if a.startswith("@"):
            names.extend(cfg.read_list_file(a[1:]))
        elif a in conf.databases:
            names.append(a)
        elif os.sep in a or os.path.exists(a):
            names.append(os.path.abspath(a))
        else:
            names.append(a)  # the daemon says it is unknown and lists what it knows
    return names


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A positive, finite number of seconds: 'nan'/'inf' parse as floats but cannot be sent as JSON."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of seconds, got {value:g}")
    return value


def emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human(data)
    code = int(data.get("exit_code", EXIT_OK))
    if code:
        sys.exit(code)


def _client(conf: cfg.Config) -> AdminClient:
    return AdminClient(conf)


def _spinner(as_json: bool, text: str):  # type: ignore[no-untyped-def]
    import contextlib
    if as_json or not err.is_terminal:
        return contextlib.nullcontext()
    return err.status(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file for every command (each command also takes --config).")
@click.version_option(__version__, prog_name="bastion")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Bastion protects the SQLite databases of unmodified applications.

    \b
    Exit codes: 0 success, 1 partial, 2 failed (or copy not consistent), 3 usage.
    """
    ctx.obj = {"config": config_path}


@cli.command()
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@common
def serve(conf: cfg.Config, as_json: bool, log_level: str) -> None:
    """Run the daemon in the foreground (stop it with Ctrl-C or SIGTERM)."""
    from .daemon.server import serve as run
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
    result = {"startbu": start, "command": {"argv": command, "exit_code": rc, "error": error,
                                            "seconds": round(time.monotonic() - t0, 3)},
              "endbu": end}
    ok_cmd = rc == 0
    result["exit_code"] = EXIT_FAILED if not ok_cmd or not end["consistent"] else end["exit_code"]

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
@click.option("--to", "to", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
@targets_option
def backup(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, to: str | None) -> None:
    """Back up databases while applications keep writing (chunked, deduplicated, verified).

    Each database named (every configured one with --all) gets its own backup, taken at one
    instant across its files. Several databases: exit 1 if some failed, 2 if all did."""
    from .backup.store import check_url
    if to is not None:
        check_url(to)       # a mistyped URL is refused here, before the daemon does anything
    client = _client(conf)
    with _backup_progress(as_json) as bar:
        if bar is None:
            data = client.backup(targets, all_, to)
        else:   # the backup call blocks: poll the daemon for its progress meanwhile
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(client.backup, targets, all_, to)
                tasks: dict[str, Any] = {}
                while not fut.done():
                    try:
                        running = client.request("GET", "/v1/backups/running").get("running", [])
                    except BastionError:
                        running = []       # progress is a courtesy: the backup's own answer decides
                    for r in running:
                        _show_progress(bar, tasks, r)
                    time.sleep(0.1)    # a loopback GET: cheap, and a one-second backup still shows
                data = fut.result()

    def one(d: dict[str, Any]) -> None:
        if "error" in d:
            e = d["error"]
            err.print(f"error: backup of {d['database']} failed: {e['message']}", markup=False)
            if e.get("hint"):
                err.print(f"hint: {e['hint']}", markup=False)
            return
        out.print(f"backup {d['backup']} of {d['database']} at {d['instant']} in {d['repository']}: "
                  f"{_fmt_bytes(d['logical_bytes'])} read, {_fmt_bytes(d['stored_bytes_added'])} stored "
                  f"({d['chunks_new']} new of {d['chunks_total']} chunks) in {d['seconds']:.2f} s; "
                  f"quick verify {'ok' if d['verified'] else 'FAILED'}")
        _print_problems(d)

    def human(d: dict[str, Any]) -> None:
        for b in d.get("backups", [d]):
            one(b)
        if "backups" in d and d["failed"]:
            err.print(f"{d['failed']} of {len(d['backups'])} backup(s) failed", markup=False)
    emit(data, as_json, human)


def _show_progress(bar: Any, tasks: dict[str, Any], r: dict[str, Any]) -> None:
    """One line per database under way: bytes read of the total while copying, else its phase."""
    name = str(r.get("database"))
    done, total = int(r.get("done") or 0), int(r.get("total") or 0)
    phase = str(r.get("phase") or "copying")
    if name not in tasks:
        tasks[name] = bar.add_task(name, total=None, bytes="")
    counted = f"{_fmt_bytes(done)} of {_fmt_bytes(total)}" if total else f"{_fmt_bytes(done)}"
    bar.update(tasks[name], description=f"{name}: {phase}", completed=done if total else 0,
               total=total or None, bytes=counted)


def _print_problems(d: dict[str, Any]) -> None:
    """Each verify problem on stderr, naming the backup, file and chunk it concerns."""
    for p in d.get("problems", []):
        err.print(f"error: backup {p['backup']}" + (f", file {p['file']}" if p.get("file") else "")
                  + (f", chunk {p['chunk'][:16]}" if p.get("chunk") else "") + f": {p['problem']}")
    if d.get("message"):
        err.print(f"error: {d['message']}")
    if d.get("hint"):
        err.print(f"hint: {d['hint']}")
    for n in d.get("notes", []):
        err.print(f"note: {n}")


def _repo(conf: cfg.Config, url: str | None, database: str | None = None):  # type: ignore[no-untyped-def]
    from .backup import Repository
    from .backup.backups import default_repository
    return Repository.open(url or default_repository(conf, database))


def _backup_progress(as_json: bool):  # type: ignore[no-untyped-def]
    """Per database under way: bytes as the daemon counts them ("3.0 MiB of 12.0 MiB"); while the
    total is unknown, a spinner and a pulsing bar with the bytes so far, never a made-up "0/?"."""
    import contextlib
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
    if as_json or not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                    TextColumn("{task.fields[bytes]}", markup=False), TimeRemainingColumn(),
                    console=err, transient=True)


def _progress(as_json: bool, what: str):  # type: ignore[no-untyped-def]
    """A rich progress bar on a terminal (stderr); nothing otherwise."""
    import contextlib
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    if as_json or not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


@cli.group()
def backups() -> None:
    """Backups in a repository (needs only the repository, not the daemon)."""


@backups.command("list")
@click.argument("database", required=False)
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
def backups_list(conf: cfg.Config, as_json: bool, database: str | None, repo_url: str | None) -> None:
    """List backups: id, database, instant, logical size, bytes added, verified state."""
    from .backup.backups import default_repository, list_backups
    from .backup.repository import NoRepository
    try:
        data = list_backups(_repo(conf, repo_url, database), database)
    except NoRepository:
        if repo_url:
            raise
        # the default repository appears with the first backup
        data = {"repository": default_repository(conf, database), "backups": [], "problems": [], "exit_code": 0}

    def human(d: dict[str, Any]) -> None:
        table = Table("id", "database", "instant", "size", "added", "verified")
        for b in d["backups"]:
            table.add_row(b["id"], b["database"], b["instant"], _fmt_bytes(b["logical_bytes"]),
                          _fmt_bytes(b["stored_bytes_added"]), b["verified"])
        out.print(table)
        for p in d["problems"]:
            err.print(f"error: {p}")
    emit(data, as_json, human)


@cli.command()
@click.argument("backup_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every backup in the repository.")
@click.option("--full", is_flag=True, help="Also restore into scratch space, integrity_check, compare digests.")
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
def verify(conf: cfg.Config, as_json: bool, backup_ids: tuple[str, ...], all_: bool, full: bool,
           repo_url: str | None) -> None:
    """Verify backups: manifests checked, every chunk read back and re-hashed; --full restores and checks them.

    Every outcome is recorded in the repository (shown by `backups list` and `status`)."""
    from .backup import verify as run
    if not backup_ids and not all_:
        raise UsageError("name backups to verify, or use --all", hint="see `bastion backups list`")
    repo = _repo(conf, repo_url)
    with _progress(as_json, "verify") as bar:
        task = bar.add_task("verifying", total=None) if bar else None
        data = run(repo, list(backup_ids) or None, full,
                   progress=(lambda d, t: bar.update(task, completed=d, total=t)) if bar else None)

    def human(d: dict[str, Any]) -> None:
        for b in d["backups"]:
            what = (f"{b['database']}, {b['instant']}" if b["database"] else "manifest damaged")
            out.print(f"  {b['backup']} ({what}): {b['chunks_checked']} chunks, "
                      f"{'ok' if b['ok'] else 'DAMAGED'}" + (f"; {b['full']}" if "full" in b else ""))
        _print_problems(d)
        if not d.get("recorded", True):
            err.print("warning: the outcome was not recorded in the repository")
    emit(data, as_json, human)


@cli.command()
@click.argument("backup_id")
@click.option("--to", "dest", default=None, type=click.Path(file_okay=False), help="Directory to restore into.")
@click.option("--replace", is_flag=True,
              help="Put the backup back in place of the protected files it came from (through the daemon; "
                   "applications must be stopped for the swap; the old files are kept aside).")
@click.option("--from", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@click.option("--force", is_flag=True,
              help="Replace existing files in the directory (refused while any process has them open; the old "
                   "files and their WAL are kept aside).")
@common
def restore(conf: cfg.Config, as_json: bool, backup_id: str, dest: str | None, replace: bool,
            repo_url: str | None, force: bool) -> None:
    """Restore a backup into a directory (temp names, fsync, integrity_check, digests, then rename)."""
    from .backup import names, restore as run
    if (dest is None) == (not replace):
        raise UsageError("give exactly one of --to DIR or --replace", hint="bastion restore ID --to DIR")
    try:
        names.backup_id(backup_id)
    except names.UnsafeName as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    if replace:
        with _spinner(as_json, "restoring in place..."):
            res = _client(conf).restore_in_place(backup_id, repo_url)

        def human_replace(d: dict[str, Any]) -> None:
            for f in d["replaced"]:
                out.print(f"  {f['path']}: restored (quick_check {f['quick_check']}); previous file kept as "
                          f"{f['previous_kept_as']}")
        emit(res, as_json, human_replace)
        return
    repo = _repo(conf, repo_url)
    with _progress(as_json, "restore") as bar:
        task = bar.add_task("restoring", total=None) if bar else None
        data = run(repo, backup_id, dest, force,
                   progress=(lambda d, t: bar.update(task, completed=d, total=t)) if bar else None,
                   configured={os.path.realpath(p): db.name for db in conf.databases.values() for p in db.files})

    def human(d: dict[str, Any]) -> None:
        for f in d["files"]:
            out.print(f"  {f['path']}: integrity {f['integrity']}, {f['tables']} tables match the manifest"
                      + (f"; previous file kept as {f['previous_kept_as']}" if f.get("previous_kept_as") else ""))
        out.print(f"restored backup {d['backup']} of {d['database']} (instant {d['instant']}): "
                  f"{_fmt_bytes(d['bytes'])} in {d['seconds']:.2f} s")
    emit(data, as_json, human)


@cli.command()
@click.option("--keep-last", type=click.IntRange(0), default=0, help="Keep the N newest backups.")
@click.option("--keep-hourly", type=click.IntRange(0), default=0, help="Keep the newest of each of the last N hours.")
@click.option("--keep-daily", type=click.IntRange(0), default=0, help="Keep the newest of each of the last N days.")
@click.option("--keep-weekly", type=click.IntRange(0), default=0, help="Keep the newest of each of the last N weeks.")
@click.option("--keep-monthly", type=click.IntRange(0), default=0,
              help="Keep the newest of each of the last N months.")
@click.option("--database", default=None, help="Only prune the backups of this database.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
def prune(conf: cfg.Config, as_json: bool, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, database: str | None, dry_run: bool, repo_url: str | None) -> None:
    """Remove backups by retention policy, then the chunks nothing references (safe during a backup)."""
    from .backup.prune import Policy, prune as run
    data = run(_repo(conf, repo_url, database), Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly),
               database, dry_run)

    def human(d: dict[str, Any]) -> None:
        verb = "would remove" if d["dry_run"] else "removed"
        for b in d["removed"]:
            out.print(f"  {verb} {b['id']} ({b['database']}, {b['instant']})")
        out.print(f"kept {len(d['kept'])} backup(s), {verb} {len(d['removed'])}; chunks: {d['chunk_cleanup']}, "
                  f"{d['chunks_removed']} chunk(s), {_fmt_bytes(d['bytes_freed'])}")
    emit(data, as_json, human)


@cli.command()
@click.argument("database")
@click.option("-c", "--command", "commands", multiple=True, help="Run this SQL and exit (repeatable).")
@click.option("--dsn", default=None,
              help="Connect to bastion://user@host:port,.../DB instead of this config's daemon with its admin token.")
@click.option("--user", default=None, help="Connect as this [users] user (password from $BASTION_PASSWORD or asked).")
@common
def sql(conf: cfg.Config, as_json: bool, database: str, commands: tuple[str, ...], dsn: str | None,
        user: str | None) -> None:
    """SQL on DATABASE through the daemon's SQL server: -c "..." or an interactive shell."""
    from . import client
    from .shell import interactive, run_one, show
    # this daemon first, then the other nodes of its cluster: the driver follows the active one
    hosts = ",".join(dict.fromkeys([conf.base_url.split("://", 1)[1], *(conf.cluster.peers if conf.cluster else {}).values()]))
    scheme = "bastions" if conf.tls_cert else "bastion"
    try:
        if dsn:
            con = client.connect(dsn, ca=conf.tls_ca or conf.tls_cert)
        elif user:
            pw = os.environ.get("BASTION_PASSWORD")
            if pw is None:
                pw = click.prompt(f"password for {user}", hide_input=True, err=True)
            con = client.connect(f"{scheme}://{user}@{hosts}/{database}", password=pw, ca=conf.tls_ca or conf.tls_cert,
                                 autocommit=True, failover_timeout=5)
        else:
            from .daemon.auth import read_token
            con = client.connect(f"{scheme}://{hosts}/{database}", token=read_token(conf.token_file),
                                 ca=conf.tls_ca or conf.tls_cert, autocommit=True, failover_timeout=5)
        con.autocommit = True
    except client.Error as exc:
        if dsn:
            raise BastionError(str(exc), hint="check the DSN's hosts and credentials (docs/sql.md, DSN)") from None
        raise _no_sql_node(conf, exc) from None
    try:
        if not commands:
            sys.exit(interactive(con, out, err))
        results = []
        for c in commands:
            try:
                results.append(run_one(con, c))
            except client.Error as exc:
                raise BastionError(f"{exc.message}", hint=exc.hint,
                                   details={"completed": len(results)}) from None
        if as_json:
            print(json.dumps({"database": database, "results": results}, indent=2, default=lambda b: b.hex()))
        else:
            for r in results:
                show(out, r)
    finally:
        con.close()


def _no_sql_node(conf: cfg.Config, exc: Exception) -> BastionError:
    """Why `bastion sql` found no node to talk to, and what to do: the daemon is down, or
    this node is passive (then: which node is active, if any answers)."""
    import httpx
    from .daemon.auth import read_token
    verify = trust(conf.tls_ca or conf.tls_cert)
    try:
        health = httpx.get(f"{conf.base_url}/v1/health", timeout=3, verify=verify).json()
    except (httpx.HTTPError, ValueError):
        return BastionError(f"{exc}", hint=f"is the daemon running? nothing answers on {conf.listen} "
                                           "(start it with `bastion serve`; `bastion status` checks it)")
    if not conf.cluster or health.get("role") == "active":
        return BastionError(str(exc))
    name, role = conf.cluster.node, health.get("role")
    holder = None
    try:
        st = httpx.get(f"{conf.base_url}/v1/cluster/status", timeout=3, verify=verify,
                       headers={"Authorization": f"Bearer {read_token(conf.token_file)}"}).json()
        holder = ((st.get("lease") or {}).get("holder") or {}).get("node")
    except (httpx.HTTPError, ValueError, BastionError, AttributeError):
        pass
    peers = conf.cluster.peers
    if holder and holder != name:
        where = f" at {peers[holder]}" if holder in peers else " (not in this config's [cluster] peers)"
        return BastionError(f"this node ({name}) is {role}; the active node is {holder}{where}, and it did not "
                            f"answer: {exc}",
                            hint=f"run the command on {holder}, or pass --dsn bastion://HOST:PORT/DATABASE with its "
                                 "address; `bastion cluster status` shows every node")
    return BastionError(f"this node ({name}) is {role} and no node is active: {exc}",
                        hint="see `bastion cluster status`; a node becomes active once it holds the lease")


@cli.command()
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking.")
@common
def passwd(conf: cfg.Config, as_json: bool, password_stdin: bool) -> None:
    """Make a password hash for a [users] entry of the config (the password itself is never stored)."""
    from .sql.users import hash_password
    if password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    if len(pw) < 8:
        raise UsageError("the password is too short (less than 8 characters)", hint="choose a longer one")
    h = hash_password(pw)
    emit({"password_hash": h, "exit_code": 0}, as_json,
         lambda d: out.print(f'password_hash = "{d["password_hash"]}"'))


@cli.group()
def cluster() -> None:
    """Active/passive cluster: roles of the nodes, planned switchover."""


def _nodes(conf: cfg.Config) -> dict[str, str]:
    if not conf.cluster:
        raise UsageError(f"{conf.source} has no [cluster] section: this daemon is not part of a cluster")
    nodes = dict(conf.cluster.peers)
    nodes.setdefault(conf.cluster.node, conf.base_url.split("://", 1)[1])
    return nodes


@cluster.command("status")
@common
def cluster_status(conf: cfg.Config, as_json: bool) -> None:
    """Every node's role (from [cluster] peers), the lease holder and its fencing token."""
    import httpx
    from .daemon.auth import read_token
    token = read_token(conf.token_file)
    rows = []
    for name, addr in sorted(_nodes(conf).items()):
        try:
            r = httpx.get(f"{conf.scheme}://{addr}/v1/cluster/status", headers={"Authorization": f"Bearer {token}"},
                          timeout=5, verify=trust(conf.tls_ca or conf.tls_cert))
            d = r.json()
            rows.append({"node": name, "address": addr, "role": d.get("role"), "writable": d.get("writable"),
                         "token": d.get("token"), "lease_holder": (d.get("lease") or {}).get("holder"),
                         "last_error": d.get("last_error")})
        except (httpx.HTTPError, ValueError) as exc:
            rows.append({"node": name, "address": addr, "role": "unreachable", "error": str(exc)})
    active = [r["node"] for r in rows if r.get("role") == "active"]
    data = {"nodes": rows, "active": active, "exit_code": 0 if len(active) == 1 else 1}

    def human(d: dict[str, Any]) -> None:
        t = Table("node", "address", "role", "writable", "fencing token", "error")
        for r in d["nodes"]:
            t.add_row(r["node"], r["address"], str(r["role"]), str(r.get("writable", "")), str(r.get("token") or ""),
                      str(r.get("last_error") or r.get("error") or ""))
        out.print(t)
        out.print(f"active: {', '.join(d['active']) or 'NONE'}")
    emit(data, as_json, human)


@cluster.command("switchover")
@click.option("--to", "to", default=None, help="The node to hand over to (default: any passive node).")
@click.option("--timeout", type=float, default=30.0, callback=_seconds, help="Seconds to wait for the new active.")
@common
def cluster_switchover(conf: cfg.Config, as_json: bool, to: str | None, timeout: float) -> None:
    """Planned switchover: the active node stops, hands the lease over, and a passive one takes it."""
    import httpx
    from .daemon.auth import read_token
    token = read_token(conf.token_file)
    nodes = _nodes(conf)
    if to and to not in nodes:
        raise UsageError(f"unknown node {to!r}", hint="known: " + ", ".join(sorted(nodes)))
    hdr = {"Authorization": f"Bearer {token}"}

    def role(addr: str) -> str:
        try:
            return httpx.get(f"{conf.scheme}://{addr}/v1/health", timeout=3, verify=trust(conf.tls_ca or conf.tls_cert)).json()["role"]
        except (httpx.HTTPError, ValueError, KeyError):
            return "unreachable"
    active = [n for n, a in nodes.items() if role(a) == "active"]
    if len(active) != 1:
        raise BastionError(f"expected one active node, found {len(active)}: {', '.join(active) or 'none'}",
                           hint="see `bastion cluster status`")
    t0 = time.monotonic()
    r = httpx.post(f"{conf.scheme}://{nodes[active[0]]}/v1/cluster/switchover", json={"to": to}, headers=hdr,
                   timeout=60, verify=trust(conf.tls_ca or conf.tls_cert))
    if r.status_code >= 400:
        raise BastionError.from_dict(r.json().get("error", {}))
    new = None
    while time.monotonic() - t0 < timeout:
        cands = [n for n, a in nodes.items() if n != active[0] and (to is None or n == to) and role(a) == "active"]
        if cands:
            new = cands[0]
            break
        time.sleep(0.1)
    data = {"from": active[0], "to": new, "seconds": round(time.monotonic() - t0, 3), "exit_code": 0 if new else 2}
    emit(data, as_json, lambda d: out.print(f"switchover {d['from']} -> {d['to'] or 'NONE (no node took over)'} "
                                            f"in {d['seconds']:.2f} s"))


@cli.group()
def replicate() -> None:
    """Real-time backup to a second Bastion daemon (see docs/replication.md)."""


@replicate.command("status")
@click.argument("database", required=False)
@common
def replicate_status(conf: cfg.Config, as_json: bool, database: str | None) -> None:
    """Per database: positions shipped and applied, lag in changes and seconds, last error, divergence."""
    q = f"?database={database}" if database else ""
    data = _client(conf).request("GET", "/v1/replication/status" + q)

    def human(d: dict[str, Any]) -> None:
        if not d["databases"]:
            out.print("no database replicates on this daemon")
        for r in d["databases"]:
            if r["role"] == "primary":
                out.print(f"{r['database']}: primary -> {r['peer']} ({r['schedule']}), {r['state']}; "
                          f"lag {r['lag_changes']} changes, {r['lag_seconds']} s; "
                          f"last error: {r['last_error'] or 'none'}"
                          + (f" ({r['failures']} failures in a row)" if r["failures"] else ""))
                t = Table("file", "position", "shipped", "applied", "lag (changes)", "lag (s)")
                for f in r["files"]:
                    t.add_row(f["path"], str(f["position"]), str(f["shipped"]), str(f["applied"]),
                              str(f["lag_changes"]), str(f["lag_seconds"]))
            else:
                state = "PROMOTED (writable)" if r["promoted"] else "replica (read-only)"
                out.print(f"{r['database']}: {state} of {r['replica_of']} from {r['primary_origin']}; "
                          f"seeded {r['seeded_at']}; last batch {r['last_apply_at']}; "
                          + (f"DIVERGENCE: {r['divergence']} local changes" if r["divergence"] else "no divergence"))
                t = Table("file", "applied", "applied at", "local changes")
                for f in r["files"]:
                    t.add_row(f["path"], str(f.get("applied")), str(f.get("applied_at")), str(f.get("local_changes")))
            out.print(t)
    emit(data, as_json, human)


@replicate.command("run")
@click.argument("database")
@click.option("--timeout", type=float, default=300.0, callback=_seconds, help="Seconds to wait for the pass.")
@common
def replicate_run(conf: cfg.Config, as_json: bool, database: str, timeout: float) -> None:
    """Ship every pending change of DATABASE now (whatever its schedule)."""
    data = _client(conf).request("POST", "/v1/replication/run", {"database": database, "timeout": timeout},
                                 timeout=timeout + 30)
    emit(data, as_json, lambda d: out.print(
        f"{database}: shipped {d.get('shipped', 0)} changes" + (" after seeding the replica" if d.get("seeded") else "")
        + (" (blackout window: nothing sent)" if d.get("blackout") else "")
        + (f"; FAILED: {d['error']}" if d.get("error") else "")))


@replicate.command("promote")
@click.argument("database")
@common
def replicate_promote(conf: cfg.Config, as_json: bool, database: str) -> None:
    """On the backup daemon: make the replica DATABASE a normal writable, protected database."""
    data = _client(conf).request("POST", "/v1/replication/promote", {"database": database})
    emit(data, as_json, lambda d: out.print(
        f"{database}: " + ("was already promoted" if d["already"] else "promoted: writable; it no longer follows "
                           "the primary")))


@cli.group()
def sync() -> None:
    """Multi-site sync of databases in a [sync_groups.NAME] (see docs/sync.md)."""


@sync.command("status")
@click.argument("database", required=False)
@common
def sync_status(conf: cfg.Config, as_json: bool, database: str | None) -> None:
    """Per synced database: group, neighbours, state, per-neighbour lag, conflicts, last error."""
    q = f"?database={database}" if database else ""
    data = _client(conf).request("GET", "/v1/sync/status" + q)

    def human(d: dict[str, Any]) -> None:
        if not d["databases"]:
            out.print("no database is in a sync group on this daemon")
        for r in d["databases"]:
            out.print(f"{r['database']}: site {r['site']} of group {r['group']} ({r['topology']}, {r['policy']}, "
                      f"{r['schedule']}), {r['state']}; last error: {r['last_error'] or 'none'}"
                      + (f" ({r['failures']} failures in a row)" if r["failures"] else ""))
            t = Table("file", "neighbour", "lag (changes)", "unresolved conflicts")
            for f in r["files"]:
                for p, st in (f.get("peers") or {}).items():
                    t.add_row(f["path"], p, str(st["lag_changes"]), str(f.get("unresolved_conflicts")))
            out.print(t)
    emit(data, as_json, human)


@sync.command("run")
@click.argument("database")
@click.option("--timeout", type=float, default=300.0, callback=_seconds, help="Seconds to wait for the pass.")
@common
def sync_run(conf: cfg.Config, as_json: bool, database: str, timeout: float) -> None:
    """Exchange every pending change of DATABASE with its neighbours now (whatever the schedule)."""
    data = _client(conf).request("POST", "/v1/sync/run", {"database": database, "timeout": timeout},
                                 timeout=timeout + 30)
    emit(data, as_json, lambda d: out.print(
        f"{database}: sent {d.get('sent', 0)} changes" + (" (blackout window: nothing sent)" if d.get("blackout") else "")
        + (f"; FAILED: {d['error']}" if d.get("error") else "")
        + ("".join(f"; {e}" for e in d.get("errors") or []))))


@sync.command("check")
@click.argument("database")
@common
def sync_check(conf: cfg.Config, as_json: bool, database: str) -> None:
    """Ask every site of DATABASE's group: same rows everywhere? do the group's invariants hold?"""
    data = _client(conf).request("GET", f"/v1/sync/check?database={database}", timeout=120)

    def human(d: dict[str, Any]) -> None:
        out.print(f"{d['database']} (group {d['group']}, asked from {d['site']}): "
                  + ("converged" if d["converged"] else "NOT converged"))
        t = Table("invariant", "expect", "result", "values per site")
        for name, r in d["invariants"].items():
            t.add_row(name, str(r["expect"]), "ok" if r["ok"] else "VIOLATED",
                      ", ".join(f"{s}={v}" for s, v in r["values"].items())
                      + "".join(f" {s}: {e}" for s, e in r["errors"].items()))
        if d["invariants"]:
            out.print(t)
        for p in d["problems"]:
            out.print(f"problem: {p}")
    emit(data, as_json, human)


@cli.group()
def conflicts() -> None:
    """The conflict log: versions that lost (sync) or never reached the new primary (failover)."""


def _conflict_line(c: dict[str, Any]) -> str:
    r, l_ = c["remote"], c["local"]
    return (f"#{c['id']} {c['database']}[{c['file']}] {c['table']} {c['key']}: {c['policy']}, kept {c['outcome']}; "
            f"local {'deleted' if l_['deleted'] else l_['values']} ({l_['origin']}), "
            f"remote {'deleted' if r['deleted'] else r['values']} ({r['origin']})"
            + (f"; resolved: {c['resolution']}" if c.get("resolved_at") else ""))


@conflicts.command("list")
@click.argument("database", required=False)
@click.option("--all", "all_", is_flag=True, help="Resolved ones too.")
@common
def conflicts_list(conf: cfg.Config, as_json: bool, database: str | None, all_: bool) -> None:
    """Conflicts not resolved yet (of DATABASE, or every database)."""
    q = "?" + "&".join(p for p in (f"database={database}" if database else "", "all=true" if all_ else "") if p)
    data = _client(conf).request("GET", "/v1/conflicts" + (q if q != "?" else ""))

    def human(d: dict[str, Any]) -> None:
        if not d["conflicts"]:
            out.print("no conflict" + ("" if all_ else " to resolve"))
        for c in d["conflicts"]:
            out.print(_conflict_line(c))
    emit(data, as_json, human)


@conflicts.command("show")
@click.argument("database")
@click.argument("conflict_id", type=int)
@click.option("--file", "file_", type=int, default=0, show_default=True, help="Which file of the database.")
@common
def conflicts_show(conf: cfg.Config, as_json: bool, database: str, conflict_id: int, file_: int) -> None:
    """One conflict, with both versions."""
    data = _client(conf).request("GET", f"/v1/conflicts/{database}/{conflict_id}?file={file_}")
    emit(data, as_json, lambda d: out.print(json.dumps(d, indent=2, default=str)))


@conflicts.command("resolve")
@click.argument("database")
@click.argument("conflict_id", type=int)
@click.option("--reapply", "action", flag_value="reapply", help="Write the losing version again, as a new change.")
@click.option("--dismiss", "action", flag_value="dismiss", help="Keep what won; mark the conflict resolved.")
@click.option("--version", "version", type=click.Choice(["local", "remote"]),
              help="After a merge: which version --reapply writes.")
@click.option("--file", "file_", type=int, default=0, show_default=True, help="Which file of the database.")
@common
def conflicts_resolve(conf: cfg.Config, as_json: bool, database: str, conflict_id: int, action: str | None,
                      version: str | None, file_: int) -> None:
    """Settle a conflict: --reapply its losing version, or --dismiss it."""
    if action is None:
        raise UsageError("say how to resolve it: --reapply (write the losing version again) or --dismiss")
    data = _client(conf).request("POST", f"/v1/conflicts/{database}/{conflict_id}/resolve",
                                 {"action": action, "version": version, "file": file_})
    emit(data, as_json, lambda d: out.print(f"conflict #{conflict_id}: {d['resolution']}"))


@cli.command()
@click.argument("database")
@click.option("--from", "url", default=None, help="Repository URL (default: the database's repository).")
@common
def drill(conf: cfg.Config, as_json: bool, database: str, url: str | None) -> None:
    """Disaster-recovery drill: restore the newest backup into scratch space, verify it, run the
    application's checks (drill_check, drill_command) and report the measured RTO and RPO.

    Exit 0 if the restored copy passed every check, 2 if a step failed (the output says which)."""
    if url is not None:
        from .backup.store import check_url
        check_url(url)
    with _spinner(as_json, f"drill of {database}"):
        data = _client(conf).request("POST", "/v1/drill", {"database": database, "repository": url}, timeout=None)

    def human(d: dict[str, Any]) -> None:
        if d["ok"]:
            out.print(f"drill of {d['database']} ok: backup {d['backup']} (instant {d['instant']}) restored, "
                      f"verified and checked; RTO {d['rto_seconds']:.1f} s (time to a usable database), "
                      f"RPO {d['rpo_seconds']:.0f} s (age of its newest data)")
        else:
            err.print(f"error: drill of {d['database']} FAILED at step '{d['step']}': {d['error']}")
        for c in d.get("checks", []):
            out.print(f"  check {'ok' if c['ok'] else 'FAILED'}: {c['check']} -> {c.get('error') or c['value']!r}")
        if d.get("command"):
            out.print(f"  drill_command exit code {d['command']['exit_code']}")
    emit(data, as_json, human)


@cli.command()
@common
def doctor(conf: cfg.Config, as_json: bool) -> None:
    """Check this machine for Bastion: WAL mode of protected files, permissions of the token, data_dir
    and repository, clock sync, free space, reachable peers and targets.

    Runs without the daemon. Exit 0 if all is well, 1 if there are warnings, 2 if a check failed."""
    from .doctor import run as run_doctor
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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _TAIL.clear()
    if "--" in args and any(c in args[: args.index("--")] for c in ("exec", "freeze")):
        i = args.index("--")
        _TAIL.extend(args[i + 1:])
        args = args[:i]
    try:
        cli.main(args=args, prog_name="bastion", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(EXIT_FAILED)
    except click.UsageError as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except BastionError as exc:
        err.print(f"error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
