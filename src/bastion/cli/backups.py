"""Backups: backup, backups list, verify, restore, prune, drill."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from ..errors import BastionError, UsageError
from .base import (
    _backup_progress,
    _client,
    _fmt_bytes,
    _progress,
    _repo,
    _spinner,
    cli,
    common,
    emit,
    err,
    out,
    secret_options,
    targets_option,
)


@cli.command()
@click.option("--to", "to", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
@targets_option
def backup(conf: cfg.Config, as_json: bool, targets: list[str], all_: bool, to: str | None) -> None:
    """Back up databases while applications keep writing (chunked, deduplicated, verified).

    Each database named (every configured one with --all) gets its own backup, taken at one
    instant across its files. Several databases: exit 1 if some failed, 2 if all did."""
    from ..backup.store import check_url
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


@cli.group()
def backups() -> None:
    """Backups in a repository (needs only the repository, not the daemon)."""


@backups.command("list")
@click.argument("database", required=False)
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
@secret_options
def backups_list(conf: cfg.Config, as_json: bool, database: str | None, repo_url: str | None) -> None:
    """List backups: id, database, instant, logical size, bytes added, verified state."""
    from ..backup.backups import default_repository, list_backups
    from ..backup.repository import NoRepository
    data: Mapping[str, Any]
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


@backups.command("archive")
@click.argument("database")
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
def backups_archive(conf: cfg.Config, as_json: bool, database: str, repo_url: str | None) -> None:
    """The instants `restore DB --at` can reach: per backup taken while the WAL archive ran."""
    from ..backup.pitr import ranges
    rng = ranges(_repo(conf, repo_url, database), database)
    data = {"database": database, "ranges": rng, "verdict": "ok"}

    def human(d: dict[str, Any]) -> None:
        if not d["ranges"]:
            out.print(f"no backup of {database} was taken while the WAL archive ran: nothing to restore a "
                      "point in time from")
        for r in d["ranges"]:
            out.print(f"{r['from_iso']} .. {r['to_iso']}  (backup {r['backup']}, generation {r['generation']})"
                      + (f"  stops at a gap: {r['gap']}" if r["gap"] else ""))
    emit(data, as_json, human)


@cli.command()
@click.argument("backup_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every backup in the repository.")
@click.option("--full", is_flag=True, help="Also restore into scratch space, integrity_check, compare digests.")
@click.option("--repo", "repo_url", default=None, help="Repository URL (default file://<data_dir>/backups).")
@common
@secret_options
def verify(conf: cfg.Config, as_json: bool, backup_ids: tuple[str, ...], all_: bool, full: bool,
           repo_url: str | None) -> None:
    """Verify backups: manifests checked, every chunk read back and re-hashed; --full restores and checks them.

    Every outcome is recorded in the repository (shown by `backups list` and `status`)."""
    from ..backup import verify as run
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
@click.option("--at", "at", default=None,
              help='Point-in-time restore of database BACKUP_ID as of this instant ("2026-12-03 14:05:07", UTC '
                   "unless an offset is given): a backup plus the WAL archive.")
@click.option("--at-position", "at_position", default=None, help="Point-in-time restore up to GEN:SEQ:FRAME.")
@common
@secret_options
def restore(conf: cfg.Config, as_json: bool, backup_id: str, dest: str | None, replace: bool,
            repo_url: str | None, force: bool, at: str | None, at_position: str | None) -> None:
    """Restore a backup into a directory (temp names, fsync, integrity_check, digests, then rename).

    With --at (or --at-position) BACKUP_ID names a database: the newest backup before the instant is
    restored and the archived WAL applied up to the last commit at or before it."""
    from ..backup import names
    from ..backup import restore as run
    if at is not None or at_position is not None:
        _restore_at(conf, as_json, backup_id, dest, replace, repo_url, force, at, at_position)
        return
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
    assert dest is not None   # exactly one of --to and --replace: checked above
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


def _restore_at(conf: cfg.Config, as_json: bool, database: str, dest: str | None, replace: bool,
                repo_url: str | None, force: bool, at: str | None, at_position: str | None) -> None:
    from ..backup.pitr import parse_instant, parse_position, restore_at
    if dest is None or replace or force:
        raise UsageError("a point-in-time restore goes into a new directory: give --to DIR (not --replace or "
                         "--force)", hint=f'bastion restore {database} --at "2026-12-03 14:05:07" --to DIR')
    if (at is None) == (at_position is None):
        raise UsageError("give one of --at and --at-position")
    with _spinner(as_json, "restoring to a point in time..."):
        data = restore_at(_repo(conf, repo_url, database), database, dest,
                          at=parse_instant(at) if at is not None else None,
                          position=parse_position(at_position) if at_position is not None else None)

    def human(d: dict[str, Any]) -> None:
        for f in d["files"]:
            out.print(f"  {f['name']}: position {f['position']} (commit seen {f['commit_seen_at'] or 'at the backup'}),"
                      f" {f['frames_applied']} frames applied, integrity {f['integrity']}")
        out.print(f"restored {d['database']} as of {d['at'] or 'the position'} from backup {d['base']} "
                  f"into {d['to']} in {d['seconds']:.2f} s")
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
@secret_options
def prune(conf: cfg.Config, as_json: bool, keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, database: str | None, dry_run: bool, repo_url: str | None) -> None:
    """Remove backups by retention policy, then the chunks nothing references (safe during a backup)."""
    from ..backup.prune import Policy
    from ..backup.prune import prune as run
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
@click.option("--from", "url", default=None, help="Repository URL (default: the database's repository).")
@common
def drill(conf: cfg.Config, as_json: bool, database: str, url: str | None) -> None:
    """Disaster-recovery drill: restore the newest backup into scratch space, verify it, run the
    application's checks (drill_check, drill_command) and report the measured RTO and RPO.

    Exit 0 if the restored copy passed every check, 2 if a step failed (the output says which)."""
    if url is not None:
        from ..backup.store import check_url
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
