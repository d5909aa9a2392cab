"""What each dashboard page shows: gathered from the same library calls the admin API makes.

Every function returns plain data for a template; a part that cannot be read (a remote
repository down, a passive cluster node with no daemon open) becomes an error line in
its own section, never a failed page. A SQL user sees only the databases [users] gives
them a role on; the daemon-wide history is the admin's."""

from __future__ import annotations

import os
import shlex
import time
from typing import Any
from collections.abc import Callable

from ..errors import BastionError
from ..state import epoch, iso
from . import svg


def _err(exc: BaseException) -> str:
    if isinstance(exc, BastionError):
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    return f"{type(exc).__name__}: {exc}"


def guarded(fn: Callable[[], Any], default: Any) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # one section's failure is shown in that section
        return default, _err(exc)


def visible(principal: Any, names: list[str]) -> list[str]:
    return [n for n in names if principal.admin or principal.role(n)]


def conflict_counts(daemon: Any, names: list[str]) -> dict[str, int]:
    from ..sync import conflict_log
    out = {}
    for name in names:
        n = 0
        for path in daemon.config.databases[name].files:
            if os.path.exists(path):
                n += len(conflict_log.listing(path, unresolved=True))
        out[name] = n
    return out


def overview(daemon: Any, principal: Any) -> dict[str, Any]:
    st = daemon.status()
    names = visible(principal, [d["name"] for d in st["databases"]])
    dbs = [d for d in st["databases"] if d["name"] in names]
    latest = {b["database"]: b for b in st["backups"]}
    counts, cerr = guarded(lambda: conflict_counts(daemon, [n for n in names if n in daemon.config.databases]), {})
    repl = {r["database"]: r for r in st["replication"]}
    sync = {s["database"]: s for s in st["sync"]}
    drills = st.get("drills") or {}
    for d in dbs:
        d["drill"] = drills.get(d["name"])
        d["backup"] = latest.get(d["name"])
        d["conflicts"] = counts.get(d["name"], 0)
        d["replication"] = repl.get(d["name"])
        d["sync"] = sync.get(d["name"])
        d["protected_files"] = sum(1 for f in d["files"] if f["state"] == "protected")
    return {"daemon": st["daemon"], "databases": dbs, "jobs": st["jobs"] if principal.admin else [],
            "conflict_error": cerr}


def restore_command(backup_id: str, database: str, repository: str, default_repo: str) -> str:
    """What to paste into a shell: quoted, so an odd id or URL stays one argument."""
    cmd = ["bastion", "restore", backup_id, "--to", f"./restored-{database}"]
    if repository != default_repo:
        cmd += ["--from", repository]
    return " ".join(shlex.quote(c) for c in cmd)


def backups(daemon: Any, principal: Any) -> list[dict[str, Any]]:
    from ..backup import Repository
    from ..backup.backups import default_repository, list_backups
    from ..backup.repository import NoRepository
    out = []
    for name in visible(principal, sorted(daemon.config.databases)):
        url = default_repository(daemon.config, name)
        entry: dict[str, Any] = {"database": name, "repository": url, "backups": [], "problems": [], "error": None}
        try:
            listed = list_backups(Repository.open(url), name)
            entry["backups"] = list(reversed(listed["backups"]))      # newest first
            entry["problems"] = listed["problems"]
        except NoRepository:
            pass
        except Exception as exc:  # a repository that cannot be read is shown as such
            entry["error"] = _err(exc)
        for b in entry["backups"]:
            b["restore"] = restore_command(b["id"], name, url, url)
            v = b["verification"]["latest"]
            b["verify_state"] = "never" if not v else ("ok" if v.get("ok") else "failed")
        entry["sizes"] = [(b["id"], b["logical_bytes"], b["stored_bytes_added"]) for b in reversed(entry["backups"])]
        out.append(entry)
    return out


def replication(daemon: Any, principal: Any, history: Any) -> dict[str, Any]:
    history.sample(min_gap=1.0)     # a fresh point for whoever looks now
    rep, rerr = guarded(lambda: daemon.replication.status()["databases"], [])
    syn, serr = guarded(lambda: daemon.sync.status()["databases"], [])
    rep = [r for r in rep if r["database"] in visible(principal, [r["database"]])]
    syn = [s for s in syn if s["database"] in visible(principal, [s["database"]])]
    for r in rep:
        r["history"] = history.series("replication", r["database"]) if r.get("role") == "primary" else {}
    for s in syn:
        s["history"] = history.series("sync", s["database"])
    return {"replication": rep, "replication_error": rerr, "sync": syn, "sync_error": serr}


def conflicts(daemon: Any, principal: Any, show_all: bool = False) -> list[dict[str, Any]]:
    from ..sync import conflict_log
    found = []
    for name in visible(principal, sorted(daemon.config.databases)):
        for i, path in enumerate(daemon.config.databases[name].files):
            if not os.path.exists(path):
                continue
            for c in conflict_log.listing(path, unresolved=not show_all, limit=None):
                c = conflict_log.for_json(c)
                cols = list(dict.fromkeys([*(c["local"]["values"] or {}), *(c["remote"]["values"] or {})]))
                rows = []
                for col in cols:
                    lv = None if c["local"]["values"] is None else c["local"]["values"].get(col)
                    rv = None if c["remote"]["values"] is None else c["remote"]["values"].get(col)
                    rows.append({"column": col, "local": _show(lv), "remote": _show(rv), "differs": lv != rv})
                c.update(database=name, file=i, path=path, rows=rows, at_iso=iso(c["at"]),
                         may_resolve=principal.admin or principal.role(name) == "read-write",
                         needs_version=c["outcome"] not in ("local", "remote"))
                found.append(c)
    found.sort(key=lambda c: c["at"], reverse=True)
    return found


def _show(v: Any) -> str:
    """A value as text for a table cell (escaped by the template, never here)."""
    if v is None:
        return "NULL"
    if isinstance(v, dict) and "$blob" in v:
        return f"BLOB (base64) {v['$blob'][:64]}{'…' if len(v['$blob']) > 64 else ''}"
    if isinstance(v, dict) and "$float" in v:
        return str(v["$float"])
    return str(v)


def resolve(daemon: Any, principal: Any, database: str, cid: int, action: str, version: str | None,
            file: int) -> dict[str, Any]:
    """The admin API's conflict resolution, as the logged-in user."""
    from ..errors import AuthError, UnknownTarget, UsageError
    from ..sync import conflict_log
    db = daemon.config.databases.get(database)
    if db is None:
        raise UnknownTarget(f"no database {database!r} in this daemon's config")
    if not (principal.admin or principal.role(database) == "read-write"):
        raise AuthError(f"{principal.name} may not change {database}", hint="a read-write role in [users] is needed")
    if action not in ("reapply", "dismiss") or version not in (None, "local", "remote"):
        raise UsageError("resolve with reapply or dismiss (version local or remote)")
    if not 0 <= file < len(db.files):
        raise UsageError(f"database {database} has {len(db.files)} file(s): file {file} is out of range")
    by = "admin" if principal.admin else principal.name
    return conflict_log.resolve(db.files[file], cid, action, by=f"{by} (dashboard)", version=version)


def cluster(node: Any) -> dict[str, Any] | None:
    if node is None:
        return None
    d, err = guarded(node.describe, {})
    if d:
        d["since_iso"] = iso(d.get("since"))
        d["events"] = [{**e, "at_iso": iso(e.get("at")),
                        "detail": ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event"))}
                       for e in reversed(d.get("events") or [])]
    return {**d, "error": err}


def events(daemon: Any, node: Any, limit: int = 50) -> list[dict[str, Any]]:
    """Recent things worth knowing, newest first: sessions from the state database, scheduled
    jobs' outcomes, replication and sync errors, cluster role changes."""
    out: list[dict[str, Any]] = []
    for r in daemon.state.recent_files(limit):
        bad = r["status"] in ("interrupted", "expired", "timed_out")
        out.append({"at": r["ended_at"] or r["started_at"], "kind": r["kind"], "level": "error" if bad else "info",
                    "what": f"{r['status']} {r['path']}", "detail": r["reason"] or r["session_id"]})
    for j in daemon.scheduler.describe():
        if j["last_run"]:
            err = j["last_error"]
            out.append({"at": epoch(j["last_run"]), "kind": "job", "level": "error" if err else "info",
                        "what": f"{j['job']}: {'failed' if err else 'ok'}", "detail": err or f"next {j['next_run']}"})
    for st, kind in ((daemon.replication.status()["databases"], "replication"),
                     (daemon.sync.status()["databases"], "sync")):
        for r in st:
            if r.get("last_error"):
                out.append({"at": epoch(r["last_error_at"]), "kind": kind, "level": "error",
                            "what": f"{r['database']}: {r.get('failures', 0)} failure(s)", "detail": r["last_error"]})
    admin = type("Admin", (), {"admin": True, "role": lambda self, n: "read-write"})()
    for repo in backups(daemon, admin):
        if repo["error"]:
            out.append({"at": time.time(), "kind": "backup", "level": "error", "what": f"{repo['database']}: "
                        "repository unreadable", "detail": repo["error"]})
        for b in repo["backups"][:10]:
            out.append({"at": epoch(b["instant"]), "kind": "backup", "level": "info",
                        "what": f"{b['database']}: backup {b['id']}",
                        "detail": f"{svg.human_bytes(b['logical_bytes'])}, "
                                  f"{svg.human_bytes(b['stored_bytes_added'])} new"})
            v = b["verification"]["latest"]
            if v:
                out.append({"at": epoch(v.get("at")), "kind": "verify", "level": "info" if v.get("ok") else "error",
                            "what": f"{b['database']}: {v.get('mode', '')} verify of {b['id']}",
                            "detail": "ok" if v.get("ok") else "FAILED: " + "; ".join(
                                str(p.get("problem", p)) if isinstance(p, dict) else str(p)
                                for p in v.get("problems") or [])})
    if node is not None:
        for e in node.events[-20:]:
            out.append({"at": e["at"], "kind": "cluster", "level": "info", "what": f"{node.name} {e['event']}",
                        "detail": ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event"))})
    out = [e for e in out if e["at"]]
    out.sort(key=lambda e: e["at"], reverse=True)
    for e in out:
        e["at_iso"] = iso(e["at"])
    return out[:limit]

