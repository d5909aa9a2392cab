"""Disaster-recovery drills: prove that the newest backup gives back a usable database, and how fast.

A drill does what a person would do after losing the machine, into a scratch directory:

1. find the database's newest backup in its repository (or the one given with --from);
2. restore it: every file's SHA-256, ``PRAGMA integrity_check`` and the per-table content
   digests are checked against the manifest on the restored copy (the checks of
   ``verify --full``), and the outcome is recorded as the backup's full verification;
3. run the application's own check: the SQL assertions of ``drill_check`` (each must return a
   true first value) and/or the ``drill_command`` (exit 0), against the restored files;
4. report the measured RTO (from the start to a database that passed step 3) and RPO (the
   age of the newest data it holds: end of the drill minus the backup's instant).

Results are kept in the state database (last 100 per database), shown by `bastion status`,
exported by /metrics, and a failed drill is notified like any failure (bastion.notify).
The scratch copy is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from typing import TYPE_CHECKING, Any

import apsw

from . import hooks
from .config import Config
from .errors import BastionError, Outcome, UnknownTarget
from .state import StateStore, iso
from .sqlite import connect

if TYPE_CHECKING:
    from .backup import Repository
    from .backup.manifest import Manifest

log = logging.getLogger("bastion.drill")


def latest_all(state: StateStore) -> dict[str, dict[str, Any]]:
    return state.latest_drills()


def _newest(repo: Repository, database: str) -> Manifest | None:
    for bid in reversed(repo.backup_ids()):      # ids begin with the instant: newest last
        try:
            m = repo.manifest(bid)
        except BastionError:
            continue
        if m.database == database:
            return m
    return None


def check_sql(paths: list[str], queries: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """Run each query against the restored files (the first as main, the others attached under
    their file name's stem, as the SQL server names them); each must return a true first value."""
    from urllib.parse import quote
    con = connect.reader(paths[0])
    out = []
    try:
        for p in paths[1:]:
            stem = os.path.splitext(os.path.basename(p))[0]
            con.execute("ATTACH ? AS " + '"' + stem.replace('"', '""') + '"', (f"file:{quote(p)}?mode=ro",))
        for q in queries:
            try:
                rows = con.execute(q).fetchall()
                value = rows[0][0] if rows and rows[0] else None
                out.append({"check": q, "value": value, "ok": bool(value)})
            except apsw.Error as exc:
                out.append({"check": q, "value": None, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        con.close()
    return out


def run(config: Config, state: StateStore, database: str, url: str | None = None,
        keep: bool = False) -> dict[str, Any]:
    """One drill of ``database``; never raises for a failed step: the result says which failed."""
    from .backup import Repository
    from .backup.backups import default_repository
    from .backup.restore import restore
    db = config.databases.get(database)
    if db is None:
        raise UnknownTarget(f"database {database!r} is not configured",
                            hint="drills run on databases named in the config: " + (", ".join(config.databases)
                                                                                   or "none"))
    started = time.time()
    t0 = time.monotonic()
    url = url or default_repository(config, database)
    scratch = os.path.join(config.data_dir, "drills", f"{database}-{time.strftime('%Y%m%dT%H%M%S')}-"
                                                      f"{uuid.uuid4().hex[:6]}")
    result: dict[str, Any] = {"database": database, "repository": url, "started_at": started,
                              "started": iso(started), "backup": None, "instant": None, "ok": False,
                              "step": "find the newest backup", "error": None, "rto_seconds": None,
                              "rpo_seconds": None, "restore_seconds": None, "checks": [], "command": None}
    try:
        repo = Repository.open(url)
        m = _newest(repo, database)
        if m is None:
            raise BastionError(f"no backup of {database} in {url}", hint=f"take one: bastion backup {database}")
        result.update(backup=m.id, instant=m.instant_text)
        result["step"] = "restore and verify (SHA-256, integrity_check, content digests)"
        try:
            r = restore(repo, m.id, scratch)
        except BastionError as exc:
            _record(repo, m.id, False, exc.message)
            raise
        _record(repo, m.id, True, None)
        result["restore_seconds"] = r["seconds"]
        paths = [f["path"] for f in r["files"]]
        if db.drill_check:
            result["step"] = "application check (drill_check)"
            result["checks"] = check_sql(paths, db.drill_check)
            bad = [c for c in result["checks"] if not c["ok"]]
            if bad:
                raise BastionError(f"drill_check failed on the restored copy: {bad[0]['check']!r} returned "
                                   f"{bad[0].get('error') or bad[0]['value']!r}",
                                   hint="the backup restores, but the application would not find its data")
        if db.drill_command:
            result["step"] = "application check (drill_command)"
            env = {"BASTION_DRILL_DATABASE": database, "BASTION_DRILL_DIR": scratch,
                   "BASTION_DRILL_FILES": "\n".join(paths), "BASTION_DRILL_BACKUP": m.id}
            res = hooks.run(db.drill_command, f"drill command of {database}", env=env, timeout=600)
            result["command"] = {"exit_code": res["exit_code"], "output": res["output"][-2000:]}
            if res["error"]:
                raise BastionError(f"drill_command {res['error']}",
                                   hint="the command checks the restored copy in $BASTION_DRILL_DIR")
        result["rto_seconds"] = round(time.monotonic() - t0, 3)
        result["rpo_seconds"] = round(max(0.0, time.time() - m.instant.epoch), 3)
        result.update(ok=True, step="done")
    except BastionError as exc:
        result["error"] = exc.message + (f" ({exc.hint})" if exc.hint else "")
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["verdict"] = Outcome.OK if result["ok"] else Outcome.FAILED
    if not result["ok"]:
        result["message"] = f"drill of {database} failed at step '{result['step']}': {result['error']}"
        log.error("%s", result["message"])
    else:
        log.info("drill of %s ok: RTO %.1f s, RPO %.1f s (backup %s)", database, result["rto_seconds"],
                 result["rpo_seconds"], result["backup"])
    state.save_drill(database, started, result["ok"], result)
    return result


def _record(repo: Any, backup_id: str, ok: bool, problem: str | None) -> None:
    try:
        repo.record_verification(backup_id, "full", ok, iso(time.time()),
                                 [] if ok else [{"backup": backup_id, "file": None, "chunk": None,
                                                 "problem": f"recovery drill: {problem}"}])
    except (BastionError, OSError) as exc:      # a read-only repository: the drill's own record stays
        log.warning("drill: could not record the verification of %s: %s", backup_id, exc)
