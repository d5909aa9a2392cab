"""A catalogue of repository corruptions: every one found and named by verify, none restored.

The repository is made once by real backups (two backups of the bank database through a
real daemon, the second reusing most chunks of the first); each case copies it, damages
the copy in one way, then runs `bastion verify`, `bastion verify --full` and `bastion
restore` on it, as a user would. Each case states which verify is needed to see the
damage: "quick" (then full sees it too), "full" (quick cannot: it needs the data), or
"none" for things that are not damage (reported as notes at most, never a failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
import zstandard

from support import PY, DaemonProc, Result, free_port, init_bank, write_config

FIGURES: dict[str, list[int]] = {"quick": [0, 0], "full": [0, 0]}   # mode -> [detected, injected]
DONE: list[str] = []


@dataclass
class Pristine:
    repo: Path
    b1: str
    b2: str


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("catalogue")
    app = base / "app"
    init_bank(app)
    con = sqlite3.connect(app / "bank.db")
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, blob BLOB)")
    con.executemany("INSERT INTO big VALUES(?, randomblob(3000))", [(i,) for i in range(700)])   # ~2 MB, 9 chunks
    con.commit()
    port = free_port()
    cfg = write_config(base, port, {"bank": [str(app / "bank.db"), str(app / "audit.db")]})
    d = DaemonProc(cfg, port, base / "var").start()
    try:
        r1 = d.cli("backup", "bank", "--json")
        assert r1.code == 0, r1.err
        con.execute("UPDATE big SET blob = randomblob(3000) WHERE id > 650")   # the tail changes, the rest is reused
        con.commit()
        r2 = d.cli("backup", "bank", "--json")
        assert r2.code == 0, r2.err
        assert 0 < r2.json["chunks_new"] < r2.json["chunks_total"]
    finally:
        d.stop()
        con.close()
    return Pristine(base / "var" / "backups", r1.json["backup"], r2.json["backup"])


class Repo:
    """A damaged copy of the pristine repository, and what the cases need to know about it."""

    def __init__(self, pristine: Pristine, dir: Path) -> None:
        self.dir = dir
        shutil.copytree(pristine.repo, dir)
        self.url = f"file://{dir}"
        self.b1, self.b2 = pristine.b1, pristine.b2
        m1, m2 = self.manifest(self.b1), self.manifest(self.b2)
        bank1 = [c[0] for c in m1["files"][0]["chunks"]]
        bank2 = [c[0] for c in m2["files"][0]["chunks"]]
        assert m2["files"][0]["name"] == "bank.db" and len(bank2) >= 4
        self.shared = next(d for d in bank2 if d in bank1)          # in both backups
        self.own2 = next(d for d in bank2 if d not in bank1)        # only in the second
        self.other = next(d for d in bank2 if d not in (self.shared, self.own2))
        self.audit = m2["files"][1]["chunks"][0][0]

    def mpath(self, bid: str) -> Path:
        return self.dir / "manifests" / f"{bid}.json"

    def manifest(self, bid: str) -> dict[str, Any]:
        return json.loads(self.mpath(bid).read_text())

    def edit(self, bid: str, fn: Callable[[dict[str, Any]], None]) -> None:
        m = self.manifest(bid)
        fn(m)
        self.mpath(bid).write_text(json.dumps(m))

    def chunk(self, digest: str) -> Path:
        return self.dir / "chunks" / digest[:2] / digest

    def flip(self, digest: str, where: Callable[[int], int]) -> None:
        p = self.chunk(digest)
        data = bytearray(p.read_bytes())
        data[where(len(data))] ^= 0xFF
        p.write_bytes(bytes(data))


@dataclass
class Expect:
    needs: str                          # "quick", "full", "none" (not damage) or "open" (the repository itself)
    backups: tuple[str, ...] = ()       # every backup the damage must be named against
    file: str | None = None             # the file it must be named against, when it concerns one
    chunk: str | None = None            # the chunk it must be named against, when it concerns one
    restore: tuple[str, ...] = ()       # backups whose restore must fail (default: backups)


def _bank(m: dict[str, Any]) -> dict[str, Any]:
    return m["files"][0]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(m: dict[str, Any]) -> None:
        keys = path.split(".")
        node: Any = m
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is _DEL:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return fn


_DEL = object()


def _swap_chunks(r: Repo) -> Expect:
    a, b = r.chunk(r.own2), r.chunk(r.other)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _other_zstd(r: Repo) -> Expect:
    r.chunk(r.own2).write_bytes(zstandard.ZstdCompressor().compress(b"not the page you are looking for" * 8192))
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _raw(r: Repo) -> Expect:
    p = r.chunk(r.own2)
    p.write_bytes(zstandard.ZstdDecompressor().decompress(p.read_bytes()))   # stored uncompressed
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _misplaced(r: Repo) -> Expect:
    p = r.chunk(r.own2)
    (r.dir / "chunks" / "zz").mkdir()
    p.rename(r.dir / "chunks" / "zz" / p.name)
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _chunk_truncated(r: Repo) -> Expect:
    p = r.chunk(r.own2)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _digest_to_other_chunk(r: Repo) -> Expect:
    def fn(m: dict[str, Any]) -> None:
        chunks = _bank(m)["chunks"]
        i = next(i for i, c in enumerate(chunks) if c[0] == r.own2)
        j = next(j for j, c in enumerate(chunks) if c[0] == r.other and c[1] == chunks[i][1])
        chunks[i] = list(chunks[j])    # a sound chunk of the same size, in the wrong place
    r.edit(r.b2, fn)
    return Expect("full", (r.b2,), "bank.db")


def _order_swapped(r: Repo) -> Expect:
    def fn(m: dict[str, Any]) -> None:
        c = _bank(m)["chunks"]
        c[0], c[1] = c[1], c[0]
    r.edit(r.b2, fn)
    return Expect("full", (r.b2,), "bank.db")


def _chunk_dropped_consistently(r: Repo) -> Expect:
    """The last chunk of bank.db removed, with every size and count made to agree."""
    def fn(m: dict[str, Any]) -> None:
        f = _bank(m)
        _, size = f["chunks"].pop(1)
        f["size"] -= size
        m["logical_bytes"] -= size
        m["chunks_total"] -= 1
    r.edit(r.b2, fn)
    return Expect("full", (r.b2,), "bank.db")


def _manifest_bytes(data: bytes) -> Callable[[Repo], Expect]:
    def case(r: Repo) -> Expect:
        r.mpath(r.b2).write_bytes(data)
        return Expect("quick", (r.b2,))
    return case


def _manifest_truncated(r: Repo) -> Expect:
    p = r.mpath(r.b2)
    p.write_bytes(p.read_bytes()[:300])
    return Expect("quick", (r.b2,))


def _edit(path: str, value: Any, needs: str = "quick", file: str | None = "bank.db") -> Callable[[Repo], Expect]:
    def case(r: Repo) -> Expect:
        r.edit(r.b2, _set(path, value))
        return Expect(needs, (r.b2,), file)
    return case


def _edit_fn(fn: Callable[[dict[str, Any]], None], needs: str = "quick",
             file: str | None = None) -> Callable[[Repo], Expect]:
    def case(r: Repo) -> Expect:
        r.edit(r.b2, fn)
        return Expect(needs, (r.b2,), file)
    return case


def _id_mismatch(r: Repo) -> Expect:
    r.edit(r.b2, _set("id", r.b1))
    return Expect("quick", (r.b2,))


def _manifest_copied_over(r: Repo) -> Expect:
    shutil.copy(r.mpath(r.b1), r.mpath(r.b2))    # the first backup's manifest under the second's name
    return Expect("quick", (r.b2,))


def _unsafe_object_name(r: Repo) -> Expect:
    shutil.copy(r.mpath(r.b2), r.dir / "manifests" / "not an id!.json")
    return Expect("quick", ("not an id!",))


def _marker(content: bytes | None) -> Callable[[Repo], Expect]:
    def case(r: Repo) -> Expect:
        p = r.dir / "bastion-repo.json"
        if content is None:
            p.unlink()
        else:
            p.write_bytes(content)
        return Expect("open", (r.b1, r.b2))
    return case


def _forged_record(r: Repo) -> Expect:
    """A chunk damaged and the backup's verification record forged to say "full ok"."""
    r.flip(r.own2, lambda n: n // 2)
    (r.dir / "verified" / f"{r.b2}.json").write_text(json.dumps(
        {"full": {"ok": True, "at": "2999-01-01T00:00:00.000Z", "problems": []}}))
    return Expect("quick", (r.b2,), "bank.db", r.own2)


def _record_garbage(r: Repo) -> Expect:
    (r.dir / "verified" / f"{r.b2}.json").write_bytes(b"\x00garbage")
    return Expect("none")


def _extra_chunk(r: Repo) -> Expect:
    from bastion.backup import Repository
    Repository.open(r.url).put_chunk(b"left by an interrupted backup" * 1000)
    return Expect("none")


def _stray_temp(r: Repo) -> Expect:
    (r.dir / "manifests" / f"{r.b2}.json.tmp-123-abcdef01").write_text("{half")
    return Expect("none")


def _chunk_case(fn: Callable[[Repo], None], which: str = "own2") -> Callable[[Repo], Expect]:
    def case(r: Repo) -> Expect:
        fn(r)
        if which == "shared":
            return Expect("quick", (r.b1, r.b2), "bank.db", r.shared)
        if which == "audit":
            return Expect("quick", (r.b2,), "audit.db", r.audit)
        return Expect("quick", (r.b2,), "bank.db", r.own2)
    return case


def _tables_changed(m: dict[str, Any]) -> None:
    t = _bank(m)["tables"]["accounts"]
    t["sha256"] = "0" * 64


def _table_removed(m: dict[str, Any]) -> None:
    del _bank(m)["tables"]["accounts"]


def _dup_file(m: dict[str, Any]) -> None:
    m["files"].append(dict(m["files"][0]))


def _file_removed(m: dict[str, Any]) -> None:
    m["files"].pop(1)


CASES: dict[str, Callable[[Repo], Expect]] = {
    # chunks
    "chunk-flip-first-byte": _chunk_case(lambda r: r.flip(r.own2, lambda n: 0)),
    "chunk-flip-middle-byte": _chunk_case(lambda r: r.flip(r.own2, lambda n: n // 2)),
    "chunk-flip-last-byte": _chunk_case(lambda r: r.flip(r.own2, lambda n: n - 1)),
    "chunk-truncated": _chunk_truncated,
    "chunk-empty": _chunk_case(lambda r: r.chunk(r.own2).write_bytes(b"")),
    "chunk-deleted": _chunk_case(lambda r: r.chunk(r.own2).unlink()),
    "chunk-swapped-with-another": _swap_chunks,
    "chunk-valid-zstd-of-other-data": _other_zstd,
    "chunk-stored-uncompressed": _raw,
    "chunk-moved-to-wrong-directory": _misplaced,
    "shared-chunk-flipped": _chunk_case(lambda r: r.flip(r.shared, lambda n: n // 3), "shared"),
    "audit-chunk-deleted": _chunk_case(lambda r: r.chunk(r.audit).unlink(), "audit"),
    # manifest: the object itself
    "manifest-not-json": _manifest_bytes(b"\x89PNG not a manifest at all"),
    "manifest-empty-object": _manifest_bytes(b""),
    "manifest-json-array": _manifest_bytes(b"[1, 2, 3]"),
    "manifest-truncated": _manifest_truncated,
    "manifest-id-mismatch": _id_mismatch,
    "manifest-copied-over-another": _manifest_copied_over,
    "manifest-object-name-unsafe": _unsafe_object_name,
    "manifest-wrong-format": _edit("format", 2, file=None),
    "manifest-database-missing": _edit("database", _DEL, file=None),
    "manifest-instant-garbled": _edit("instant", "yesterday-ish", file=None),
    "manifest-instant-epoch-other-moment": _edit("instant_epoch", 1_000_000_000.5, file=None),
    "manifest-logical-bytes-wrong": _edit("logical_bytes", 12345, file=None),
    # manifest: the file list
    "files-empty-list": _edit("files", [], file=None),
    "files-entry-removed": _edit_fn(_file_removed),
    "files-entry-duplicated": _edit_fn(_dup_file, file="bank.db"),
    "files-entry-null": _edit("files.1", None, file=None),
    "file-size-changed": _edit("files.0.size", 4096),
    "file-size-not-a-number": _edit("files.0.size", "big"),
    "file-sha256-changed": _edit("files.0.sha256", "f" * 64, needs="full"),
    "file-sha256-malformed": _edit("files.0.sha256", "not-a-hash"),
    "file-page-size-insane": _edit("files.0.page_size", 3000),
    "file-tables-missing": _edit("files.0.tables", _DEL),
    "file-table-digest-malformed": _edit("files.0.tables.accounts.rows", -1),
    "file-table-digest-changed": _edit_fn(_tables_changed, needs="full", file="bank.db"),
    "file-table-removed": _edit_fn(_table_removed, needs="full", file="bank.db"),
    "name-traversal": _edit("files.0.name", "../x", file="../x"),
    "name-absolute": _edit("files.0.name", "/abs", file="/abs"),
    "name-with-slash": _edit("files.0.name", "a/b", file="a/b"),
    "name-with-nul": _edit("files.0.name", "bank\x00.db", file="bank\x00.db"),
    "name-wal-companion": _edit("files.1.name", "bank.db-wal", file="bank.db-wal"),
    # manifest: chunk entries
    "chunk-digest-changed-to-absent": _edit("files.0.chunks.0.0", "ab" * 32),
    "chunk-digest-changed-to-other-chunk": _digest_to_other_chunk,
    "chunk-size-changed": _edit("files.0.chunks.0.1", 1000),
    "chunk-entry-malformed": _edit("files.0.chunks.0", ["zz", -1]),
    "chunk-entry-not-a-pair": _edit("files.0.chunks.0", "abc"),
    "chunk-order-swapped": _order_swapped,
    "chunk-dropped-consistently": _chunk_dropped_consistently,
    # the repository around the backups
    "marker-removed": _marker(None),
    "marker-not-json": _marker(b"{format: one"),
    "marker-json-list": _marker(b"[1]"),
    "verified-record-forged": _forged_record,
    # not damage: must not fail a verify (notes at most)
    "verified-record-garbage": _record_garbage,
    "extra-unreferenced-chunk": _extra_chunk,
    "stray-temporary-object": _stray_temp,
}


def _cli(cwd: Path, *args: str) -> Result:
    p = subprocess.run([PY, "-m", "bastion", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


def _named(res: Result, exp: Expect) -> bool:
    """The verify output names every backup expected, with the file and chunk when they apply."""
    problems = res.json["problems"]
    for bid in exp.backups:
        mine = [p for p in problems if p["backup"] == bid]
        if not mine:
            return False
        if exp.file and not any(p["file"] == exp.file for p in mine):
            return False
        if exp.chunk and not any(p["chunk"] == exp.chunk for p in mine):
            return False
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_corruption_is_found_named_and_never_restored(case: str, pristine: Pristine, tmp_path: Path) -> None:
    r = Repo(pristine, tmp_path / "repo")
    exp = CASES[case](r)
    damaged = exp.needs != "none"
    quick = _cli(tmp_path, "verify", "--all", "--json", "--repo", r.url)
    full = _cli(tmp_path, "verify", "--all", "--full", "--json", "--repo", r.url)
    for res in (quick, full):
        assert "Traceback" not in res.err, res.err
    if damaged:
        FIGURES["quick"][1] += 1
        FIGURES["full"][1] += 1
    if exp.needs == "open":
        # the repository itself: every command refuses it, naming the marker object
        for res in (quick, full):
            assert res.code == 2 and "bastion-repo.json" in res.err and "error:" in res.err, res.err
        FIGURES["quick"][0] += 1
        FIGURES["full"][0] += 1
    elif exp.needs == "none":
        assert quick.code == 0, quick.out + quick.err
        assert full.code == 0, full.out + full.err
    else:
        if exp.needs == "quick":
            assert quick.code == 2 and _named(quick, exp), quick.out
            FIGURES["quick"][0] += 1
        else:
            assert quick.code == 0, f"quick verify cannot see this one, yet: {quick.out}"
        assert full.code == 2 and _named(full, exp), full.out
        FIGURES["full"][0] += 1
    # list and prune neither crash nor hide it; the outcome is recorded where a manifest is readable
    from bastion.backup.backups import list_backups
    from bastion.backup.prune import Policy, prune
    from bastion.backup.repository import Repository, RepositoryError
    from bastion.errors import BastionError
    try:
        lst = list_backups(Repository.open(r.url))
        shown = {b["id"]: b["verified"] for b in lst["backups"]}
        for bid in exp.backups:
            assert (bid in shown and "FAILED" in shown[bid]) or any(bid in p for p in lst["problems"]), lst
    except RepositoryError:
        assert exp.needs == "open"
    try:
        prune(Repository.open(r.url), Policy(last=1), dry_run=True)
    except BastionError:
        assert damaged
    # restore: refused with exit 2 and a clear message; nothing under a final name, no temporaries
    for bid in exp.restore or exp.backups:
        dest = tmp_path / f"restore-{bid}"
        res = _cli(tmp_path, "restore", bid, "--from", r.url, "--to", str(dest))
        # exit 2 (damaged), or 3 when the id itself cannot be typed in (refused before the repository is read)
        want = 3 if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", bid) else 2
        assert res.code == want and "error:" in res.err and "Traceback" not in res.err, (res.code, res.err)
        assert not dest.exists() or not os.listdir(dest), os.listdir(dest)
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()
    if not damaged:
        dest = tmp_path / "restore-ok"
        res = _cli(tmp_path, "restore", r.b2, "--from", r.url, "--to", str(dest))
        assert res.code == 0, res.err
    DONE.append(case)


def test_catalogue_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the cases: every damaging case found by full verify, and the quick figure."""
    damaging = [c for c in CASES if c not in ("verified-record-garbage", "extra-unreferenced-chunk",
                                              "stray-temporary-object")]
    assert len(damaging) >= 30
    if len(DONE) != len(CASES):
        pytest.skip("run the whole catalogue for the figures")
    q, f = FIGURES["quick"], FIGURES["full"]
    with capsys.disabled():
        print(f"\ncorruption catalogue: quick verify detected {q[0]}/{q[1]}, full verify detected {f[0]}/{f[1]} "
              f"({len(CASES) - len(damaging)} harmless changes not reported as damage)")
    assert f[0] == f[1] == len(damaging)


# -- through a daemon: the backup that reuses a damaged chunk, and what is recorded -------------

def _chunk_of(daemon: DaemonProc, bid: str, file: int = 0, index: int = 0) -> tuple[str, Path]:
    repo = daemon.data_dir / "backups"
    m = json.loads((repo / "manifests" / f"{bid}.json").read_text())
    digest = m["files"][file]["chunks"][index][0]
    return digest, repo / "chunks" / digest[:2] / digest


def test_backup_reusing_a_corrupt_chunk_is_not_ok(daemon: DaemonProc, bank: Any, tmp_path: Path) -> None:
    first = daemon.cli("backup", "bank", "--json")
    assert first.code == 0, first.err
    b1 = first.json["backup"]
    digest, path = _chunk_of(daemon, b1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # the database did not change: the second backup reuses every chunk, the damaged one too
    second = daemon.cli("backup", "bank", "--json")
    assert second.code == 2, second.out
    d = second.json
    b2 = d["backup"]
    assert d["verified"] is False and d["chunks_new"] == 0
    broken = {(p["backup"], p["file"], p["chunk"]) for p in d["problems"]}
    assert (b2, "bank.db", digest) in broken and (b1, "bank.db", digest) in broken   # both backups it breaks
    assert digest[:16] in d["message"] and b1 in d["message"] and b2 in d["message"]
    human = daemon.cli("backup", "bank")
    assert human.code == 2 and "FAILED" in human.out and digest[:16] in human.err and "hint:" in human.err
    # recorded: both listed as failed, and status says so for the newest
    listed = {b["id"]: b["verified"] for b in daemon.cli("backups", "list", "--json").json["backups"]}
    assert listed[b1].startswith("quick FAILED") and listed[b2].startswith("quick FAILED")
    st = daemon.cli("status", "--json").json["backups"]
    assert st[0]["database"] == "bank" and "FAILED" in st[0]["verified"]
    assert "FAILED" in daemon.cli("status").out
    r = daemon.cli("restore", b2, "--to", str(tmp_path / "r"))
    assert r.code == 2 and not (tmp_path / "r" / "bank.db").exists()
    # the repair the hint gives: delete the damaged chunk, back up again; the content comes back
    path.unlink()
    third = daemon.cli("backup", "bank", "--json")
    assert third.code == 0 and third.json["verified"] is True and third.json["chunks_new"] == 1, third.out
    r = daemon.cli("verify", "--all", "--json")
    assert r.code == 0, r.out
    listed = {b["id"]: b["verified"] for b in daemon.cli("backups", "list", "--json").json["backups"]}
    assert all(v.startswith("quick ok") for v in listed.values()), listed
    assert daemon.cli("restore", b1, "--to", str(tmp_path / "r1")).code == 0


def test_every_verify_outcome_is_recorded(daemon: DaemonProc, bank: Any) -> None:
    b = daemon.cli("backup", "bank", "--json").json["backup"]

    def shown() -> str:
        return {x["id"]: x["verified"] for x in daemon.cli("backups", "list", "--json").json["backups"]}[b]
    assert shown().startswith("quick ok")
    digest, path = _chunk_of(daemon, b, file=1)
    saved = path.read_bytes()
    path.write_bytes(saved[:-1])
    r = daemon.cli("verify", b, "--json")
    assert r.code == 2 and r.json["recorded"] is True
    assert shown().startswith("quick FAILED")                    # a CLI verify that finds damage says so
    r = daemon.cli("verify", b, "--full", "--json")
    assert r.code == 2 and shown().startswith("full FAILED")
    path.write_bytes(saved)                                       # repaired
    r = daemon.cli("verify", b, "--json")
    assert r.code == 0
    # a quick ok does not hide a full verify's failure; only a full ok clears it
    assert shown().startswith("quick ok") and "(full FAILED at" in shown()
    assert daemon.cli("verify", b, "--full").code == 0
    assert shown().startswith("full ok") and "FAILED" not in shown()
    rec = json.loads((daemon.data_dir / "backups" / "verified" / f"{b}.json").read_text())
    assert rec["quick"]["ok"] and rec["full"]["ok"] and rec["full"]["at"] >= rec["quick"]["at"]
    # the record of a failure keeps its problems, naming file and chunk
    path.unlink()
    daemon.cli("verify", b)
    rec = json.loads((daemon.data_dir / "backups" / "verified" / f"{b}.json").read_text())
    assert rec["quick"]["problems"][0]["chunk"] == digest and rec["quick"]["problems"][0]["file"] == "audit.db"


def test_scheduled_verify_is_recorded(tmp_path: Path, bank: Any) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       extra='[backups]\nverify_schedule = "every 1s"\n')
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        b = d.cli("backup", "bank", "--json").json["backup"]
        import time
        deadline = time.monotonic() + 30
        while True:
            v = {x["id"]: x["verified"] for x in d.cli("backups", "list", "--json").json["backups"]}[b]
            if v.startswith("full ok"):
                break
            assert time.monotonic() < deadline, v
            time.sleep(0.3)
    finally:
        d.stop()


def test_empty_manifest_neither_verifies_nor_restores(daemon: DaemonProc, bank: Any, tmp_path: Path) -> None:
    b = daemon.cli("backup", "bank", "--json").json["backup"]
    mp = daemon.data_dir / "backups" / "manifests" / f"{b}.json"
    m = json.loads(mp.read_text())
    m["files"], m["logical_bytes"], m["chunks_total"] = [], 0, 0      # consistent, and empty
    mp.write_text(json.dumps(m))
    r = daemon.cli("verify", b, "--json")
    assert r.code == 2 and "no files" in r.json["problems"][0]["problem"]
    r = daemon.cli("restore", b, "--to", str(tmp_path / "e"), "--json")
    assert r.code == 2 and "no files" in r.err
    assert not (tmp_path / "e").exists() or not os.listdir(tmp_path / "e")


def test_a_failed_restore_names_its_file_by_type_and_verify_reads_it(pristine: Pristine, tmp_path: Path) -> None:
    """verify --full learns which file a restore stopped on from RestoreFailed.file (details,
    kept across HTTP), not by matching the words of the message."""
    from bastion.backup import Repository, restore, verify
    from bastion.errors import BastionError, RestoreFailed
    r = Repo(pristine, tmp_path / "repo")

    def audit_changed(m: dict[str, Any]) -> None:
        t = m["files"][1]["tables"]
        t[sorted(t)[0]]["sha256"] = "0" * 64

    r.edit(r.b2, audit_changed)
    repo = Repository.open(r.url)
    with pytest.raises(RestoreFailed) as info:
        restore(repo, r.b2, str(tmp_path / "out"))
    assert info.value.file == "audit.db"
    back = BastionError.from_dict(info.value.to_dict())     # as the CLI gets it from the daemon
    assert isinstance(back, RestoreFailed) and back.file == "audit.db"
    res = verify(repo, [r.b2], full=True, record=False)
    assert [(p["backup"], p["file"]) for p in res["problems"]] == [(r.b2, "audit.db")], res["problems"]
