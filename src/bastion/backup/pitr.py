"""Point-in-time restore from a base backup and the WAL archive; restorable ranges; archive retention.

A *base* is a backup taken while the archiver ran: ``archive-bases/<database>/<backup id>.json``
records, per file, the archive position its copy equals (generation, WAL epoch, frame), written
once the manifest and the segments up to that position are durable. Restore at an instant:

1. pick the newest base of which every file's archive runs, without a gap, from the base to a
   commit at or after the instant (else a clear error with the restorable ranges);
2. restore the base with restore.py (temp names, fsync, integrity_check, digests, rename) into a
   private directory;
3. per WAL epoch from the base's, write the archived frames (from frame 1 of the base's epoch:
   frames already in the base are re-applied, which changes nothing, and SQLite needs the whole
   chain to check it) up to the last commit at or before the instant as the file's -wal, then let
   SQLite recover and checkpoint it: SQLite checks every frame's salts and checksum chain itself
   and writes the pages; fewer frames recovered than written names the damaged segment;
4. ``PRAGMA integrity_check``, fsync, then rename into the destination (never over a file).
"""

from __future__ import annotations

import calendar
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import apsw

from ..errors import BastionError, DamagedSegment, ObjectMissing, Outcome, RestoreFailed, UsageError
from ..fsutil import fsync_dir
from ..position import Instant
from ..sqlite import connect
from . import names
from . import segment as sg
from .repository import Repository
from .restore import _integrity, restore

BASES = "archive-bases"


# -- bases ------------------------------------------------------------------------------------
def record_base(repo: Repository, backup_id: str, database: str, instant: float,
                positions: dict[str, dict[str, Any]]) -> None:
    """``positions``: file name in the backup -> {"generation", "seq", "frame"}."""
    doc = {"backup": backup_id, "database": database, "instant_epoch": instant, "files": positions}
    repo.store.write(f"{BASES}/{names.file_name(database)}/{names.backup_id(backup_id)}.json",
                     json.dumps(doc).encode())


def bases(repo: Repository, database: str) -> list[dict[str, Any]]:
    """The database's bases whose backup still exists, oldest first."""
    have = set(repo.backup_ids())
    out = []
    for name in repo.store.list(f"{BASES}/{names.file_name(database)}"):
        try:
            doc = json.loads(repo.store.read(name))
            if doc["backup"] in have and doc["database"] == database and isinstance(doc["files"], dict):
                out.append(doc)
        except (ValueError, KeyError, TypeError, ObjectMissing):
            continue
    return sorted(out, key=lambda d: d["instant_epoch"])


# -- the archive of one file -------------------------------------------------------------------
@dataclass
class Chain:
    """One generation of one file's archive: its segments in order, up to the first gap."""
    generation: str
    refs: list[sg.SegRef]
    gap: str | None = None

    def after(self, seq: int) -> list[sg.SegRef]:
        """The segments restore needs from epoch ``seq`` on (``seq`` from frame 1)."""
        return [r for r in self.refs if r.seq >= seq]


def chains(repo: Repository, database: str, file: str) -> dict[str, Chain]:
    by_gen: dict[str, list[sg.SegRef]] = {}
    for name in repo.store.list(sg.stream(database, file)):
        ref = sg.parse_name(name)
        if ref is not None:
            by_gen.setdefault(ref.generation, []).append(ref)
    out = {}
    for gen, refs in by_gen.items():
        refs.sort()
        good: list[sg.SegRef] = []
        gap = None
        for r in refs:
            prev = good[-1] if good else None
            ok = (r.start == prev.end + 1) if prev and prev.seq == r.seq else r.start == 1
            if not ok or r.end < r.start:
                gap = f"segment {r.name} does not follow {prev.name if prev else 'the start of its WAL epoch'}"
                break
            good.append(r)
        out[gen] = Chain(gen, good, gap)
    return out


def _load(repo: Repository, ref: sg.SegRef) -> sg.Segment:
    try:
        return sg.decode(ref.name, repo.store.read(ref.name))
    except ObjectMissing:
        raise DamagedSegment(f"archive segment {ref.name} vanished while it was read", details={"segment": ref.name},
                             hint="a prune may have run at the same time: retry") from None


def _commits_after(repo: Repository, refs: list[sg.SegRef], seq: int, frame: int):
    """(ref, commit) for every commit after (seq, frame), in order, reading segments lazily."""
    for r in refs:
        if (r.seq, r.end) <= (seq, frame):
            continue
        seg = _load(repo, r)
        for c in seg.commits:
            if (r.seq, c[0]) > (seq, frame):
                yield r, seg, c


def _fmt(t: float) -> str:
    return Instant(t).iso if t > 0 else "?"


def ranges(repo: Repository, database: str) -> list[dict[str, Any]]:
    """Per base: the instants a restore can reach from it (from its instant to the end of the
    shortest unbroken archive among its files)."""
    out = []
    files_chains: dict[str, dict[str, Chain]] = {}
    for b in bases(repo, database):
        end = None
        why = None
        for fname, pos in b["files"].items():
            ch = files_chains.setdefault(fname, chains(repo, database, fname)).get(pos["generation"])
            t = b["instant_epoch"]
            if ch is not None:
                tail = [r for r in ch.after(pos["seq"]) if (r.seq, r.end) > (pos["seq"], pos["frame"])]
                if tail:
                    h = _load(repo, tail[-1]).header
                    t = max(t, float(h.get("until") or h["commits"][-1][2]))
                if ch.gap:
                    why = ch.gap
            end = t if end is None else min(end, t)
        out.append({"backup": b["backup"], "generation": next(iter(b["files"].values()))["generation"],
                    "from": b["instant_epoch"], "to": end or b["instant_epoch"], "from_iso": _fmt(b["instant_epoch"]),
                    "to_iso": _fmt(end or b["instant_epoch"]), "gap": why})
    return out


def parse_instant(text: str) -> float:
    """'2026-12-03 14:05:07[.123]' (UTC unless it carries an offset), ISO 8601, or Unix seconds."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is not an instant", hint='write it as "2026-12-03 14:05:07" (UTC), '
                                                                  "ISO 8601 with an offset, or Unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_position(text: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"(\d{8}T\d{6}Z-[0-9a-f]{6}):(\d+):(\d+)", text.strip())
    if not m:
        raise UsageError(f"--at-position {text!r} is not GENERATION:SEQ:FRAME",
                         hint="see the positions in `bastion backups archive DB`")
    return m[1], int(m[2]), int(m[3])


# -- restore -------------------------------------------------------------------------------------
def restore_at(repo: Repository, database: str, dest: str, at: float | None = None,
               position: tuple[str, int, int] | None = None) -> dict[str, Any]:
    """Rebuild ``database`` as of instant ``at`` (or archive ``position``) into directory ``dest``."""
    if (at is None) == (position is None):
        raise UsageError("give one of --at INSTANT or --at-position GEN:SEQ:FRAME")
    names.file_name(database)
    all_bases = bases(repo, database)
    if not all_bases:
        raise RestoreFailed(f"no backup of {database!r} in {repo.url} was taken while the WAL archive ran: "
                            "nothing to restore a point in time from", hint="turn the archive on ([backups] "
                            "archive = true) and take a backup; nothing was restored")
    plan = _plan(repo, database, all_bases, at, position)
    base = plan["base"]
    dest = os.path.abspath(dest)
    os.makedirs(dest, mode=0o700, exist_ok=True)
    for fname in base["files"]:
        for p in (fname, fname + "-wal", fname + "-shm"):
            if os.path.lexists(os.path.join(dest, p)):
                raise UsageError(f"{os.path.join(dest, p)} already exists; nothing was restored",
                                 hint="restore into an empty directory")
    staging = os.path.join(dest, f".bastion-pitr-{secrets.token_hex(6)}")
    t0 = time.monotonic()
    try:
        restore(repo, base["backup"], staging)
        results = []
        for fname, target in plan["targets"].items():
            results.append(_roll_forward(repo, os.path.join(staging, fname), fname, target))
        for fname in base["files"]:
            os.rename(os.path.join(staging, fname), os.path.join(dest, fname))
        fsync_dir(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"database": database, "to": dest, "base": base["backup"], "base_instant": _fmt(base["instant_epoch"]),
            "at": _fmt(at) if at is not None else None, "files": results,
            "seconds": round(time.monotonic() - t0, 3), "verdict": Outcome.OK}


def _plan(repo: Repository, database: str, all_bases: list[dict[str, Any]], at: float | None,
          position: tuple[str, int, int] | None) -> dict[str, Any]:
    """The base and, per file, the frames to apply: {"base", "targets": {file: (chain, base pos, commit)}}."""
    rng = ranges(repo, database)
    listed = "; ".join(f"{r['from_iso']} to {r['to_iso']} (backup {r['backup']})" for r in rng)
    if at is not None:
        usable = [b for b in all_bases if b["instant_epoch"] <= at]
        if not usable:
            raise RestoreFailed(f"{_fmt(at)} is before the first backup of {database!r} the archive can start "
                                f"from; restorable: {listed}", hint="choose an instant in a restorable range")
        covering = [b for b, r in zip(all_bases, rng) if b["instant_epoch"] <= at <= r["to"]]
        if not covering:
            raise RestoreFailed(f"{_fmt(at)} is after the last archived commit of {database!r} reachable from a "
                                f"backup; restorable: {listed}",
                                hint="choose an instant in a restorable range (the archive may also be behind: "
                                     "see `bastion backups archive`)")
        base = covering[-1]
    else:
        assert position is not None
        gen, seq, frame = position
        cands = [b for b in all_bases if all(p["generation"] == gen and (p["seq"], p["frame"]) <= (seq, frame)
                                              for p in b["files"].values())]
        if not cands or len(all_bases[0]["files"]) != 1:
            raise RestoreFailed(f"no backup of {database!r} in generation {gen} is at or before position "
                                f"{seq}:{frame}; restorable: {listed}",
                                hint="--at-position works on single-file databases; use --at otherwise")
        base = cands[-1]
    targets = {}
    for fname, pos in base["files"].items():
        ch = chains(repo, database, fname).get(pos["generation"])
        refs = ch.after(pos["seq"]) if ch else []
        last = None
        for r, _seg, c in _commits_after(repo, refs, pos["seq"], pos["frame"]):
            if (at is not None and c[2] > at) or (position is not None and (r.seq, c[0]) > position[1:]):
                break
            last = (r.seq, c[0], c[2])
        targets[fname] = (refs, pos, last)
    return {"base": base, "targets": targets}


def _roll_forward(repo: Repository, path: str, fname: str,
                  target: tuple[list[sg.SegRef], dict[str, Any], tuple[int, int, float] | None]) -> dict[str, Any]:
    refs, pos, last = target
    applied = 0
    if last is not None:
        for seq in sorted({r.seq for r in refs if r.seq <= last[0]}):
            upto = last[1] if seq == last[0] else None
            applied += _apply_epoch(repo, path, [r for r in refs if r.seq == seq], upto)
    check = _integrity(path)
    if check != "ok":
        raise RestoreFailed(f"{fname}: integrity_check failed after the archive was applied: {check[:300]}",
                            details={"file": fname})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    where = last or (pos["seq"], pos["frame"], None)
    return {"name": fname, "position": f"{pos['generation']}:{where[0]}:{where[1]}",
            "commit_seen_at": _fmt(where[2]) if where[2] else None, "frames_applied": applied, "integrity": check}


def _apply_epoch(repo: Repository, path: str, refs: list[sg.SegRef], upto: int | None) -> int:
    """Write one epoch's frames 1..upto as ``path``-wal and have SQLite recover and checkpoint it."""
    wal = path + "-wal"
    fd = os.open(wal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    count = 0
    ends: list[tuple[int, str]] = []
    try:
        for r in refs:
            if upto is not None and r.start > upto:
                break
            seg = _load(repo, r)
            if count == 0:
                os.write(fd, seg.wal_header)
            fsz = sg.FRAME_HEADER + seg.header["page_size"]
            n = (min(r.end, upto) if upto is not None else r.end) - r.start + 1
            view = memoryview(seg.frames)[:n * fsz]
            while view:
                view = view[os.write(fd, view):]
            count += n
            ends.append((r.start + n - 1, r.name))
    finally:
        os.close(fd)
    con = connect.staged(path)
    try:
        con.execute("PRAGMA schema_version").fetchall()      # reading runs SQLite's WAL recovery
        nlog, nckpt = con.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        if nlog == count and nckpt == nlog:
            con.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    except apsw.Error as exc:
        raise RestoreFailed(f"{os.path.basename(path)}: SQLite refused the archived WAL: {exc}",
                            hint="run the restore to an earlier instant") from None
    finally:
        con.close()
    if nlog != count:
        bad = next((name for end, name in ends if end > nlog), ends[-1][1] if ends else "?")
        raise DamagedSegment(f"archive segment {bad} is damaged: SQLite's check of the WAL checksum chain stopped "
                             f"at frame {nlog + 1} of {count}", details={"segment": bad},
                             hint="restore to an instant before it (see `bastion backups archive`)")
    if os.path.exists(wal) and os.path.getsize(wal):
        raise RestoreFailed(f"{os.path.basename(path)}: the archived WAL could not be checkpointed completely")
    for p in (wal, path + "-shm"):
        if os.path.exists(p):
            os.remove(p)
    return count


# -- retention -------------------------------------------------------------------------------------
def prune_archive(repo: Repository, database: str, file: str, keep_seconds: float,
                  now: float | None = None) -> dict[str, Any]:
    """Delete segments older than ``keep_seconds`` that no kept backup needs (a backup needs every
    segment of its generation from its own WAL epoch on). Base records of deleted backups go too."""
    now = now or time.time()
    cutoff = now - keep_seconds
    kept = bases(repo, database)
    need: dict[str, int] = {}
    for b in kept:
        pos = b["files"].get(file)
        if pos:
            need[pos["generation"]] = min(need.get(pos["generation"], 1 << 62), pos["seq"])
    removed = 0
    if repo.live_locks("backup"):
        # a backup under way becomes a base only after its manifest: what it will need is not known yet
        return {"database": database, "file": file, "segments_removed": 0, "deferred": "a backup is running"}
    refs = sorted(r for r in map(sg.parse_name, repo.store.list(sg.stream(database, file))) if r)
    done: set[str] = set()           # generations whose next segment is newer than the cutoff
    for r in refs:
        gen = r.generation
        if gen in done or (gen in need and r.seq >= need[gen]):
            continue
        try:
            h = _load(repo, r).header
            newest = float(h.get("until") or h["commits"][-1][2])
        except BastionError:
            # damaged and needed by no backup: its generation's start is the age it has for sure
            newest = calendar.timegm(time.strptime(r.generation[:16], "%Y%m%dT%H%M%SZ"))
        if newest >= cutoff:
            done.add(gen)            # segments of a generation only get newer: stop reading it
            continue
        repo.store.delete(r.name)
        removed += 1
    have = set(repo.backup_ids())
    for name in list(repo.store.list(f"{BASES}/{names.file_name(database)}")):
        bid = name.rsplit("/", 1)[-1][:-5]
        if bid not in have:
            repo.store.delete(name)
    return {"database": database, "file": file, "segments_removed": removed}
