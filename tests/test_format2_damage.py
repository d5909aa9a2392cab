"""Format 2's corruption catalogue (issue 8's, for packs): each kind of damage to a repository is a
named error or a named verify problem, never a crash and never a wrong restore. The library
against real SQLite files; the backups are taken by the same code the daemon's child runs."""

import json
import os
import sqlite3
import struct
from pathlib import Path

import pytest
import zstandard

from bastion.backup import format2
from bastion.backup.pack import _HEAD, _REC, INDEX_MAGIC, DamagedIndex, RepoIndex, decode_index, encode_index
from bastion.backup.prune import Policy, prune
from bastion.backup.manifest import Manifest
from bastion.backup.repository import Repository
from bastion.backup.restore import restore
from bastion.backup.snapshot import snapshot
from bastion.backup.store import LocalStore
from bastion.backup.verify import verify
from bastion.errors import BastionError, DamagedManifest, RestoreFailed

from support import dump, integrity


def _db(path: Path, rows: int = 3000) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB, s TEXT)")
    con.executemany("INSERT INTO t VALUES(?, randomblob(900), ?)", [(i, f"row {i} " * 20) for i in range(rows)])
    con.commit()
    con.close()
    return path


def take(repo: Repository, db: Path, n: int) -> dict:
    res = snapshot(repo.url, [{"path": str(db), "name": db.name}], database="app")
    epoch = 1796317200 + n
    m = {"format": 2, "id": f"2026-12-03T17-00-{n:02d}Z-abcdef", "database": "app",
         "instant": f"2026-12-03T17:00:{n:02d}Z", "instant_epoch": epoch, "files": res["files"],
         "logical_bytes": sum(f["size"] for f in res["files"]), "stored_bytes_added": res["stored_bytes_added"],
         **res["extra"]}
    repo.put_manifest(Manifest.from_json(m, m["id"]))
    return m


@pytest.fixture
def setup(tmp_path):
    db = _db(tmp_path / "app.db")
    repo = Repository.open(str(tmp_path / "repo"), create=True, format=2)
    m1 = take(repo, db, 1)
    con = sqlite3.connect(db)
    con.execute("UPDATE t SET v = randomblob(900) WHERE id % 37 = 0")
    con.commit()
    con.close()
    m2 = take(repo, db, 2)
    return tmp_path, db, repo, m1, m2


def _index(repo: Repository) -> RepoIndex:
    return RepoIndex.load(LocalStore(repo.store.root))


def _pack_file(repo: Repository, pid: str) -> Path:
    return Path(repo.store.root) / "packs" / pid[:2] / pid


def _page_entry(repo, m, page=5):
    idx = _index(repo)
    reader = format2.PackReader(repo.store, idx)
    h = format2.load_map(reader, repo.manifest(m["id"]).files[0])[page]
    return h, idx.blobs[h]


def _restore_fails(repo, m, dest, *words):
    with pytest.raises(BastionError) as ei:
        restore(Repository.open(repo.url), m["id"], str(dest))
    assert isinstance(ei.value, RestoreFailed | DamagedManifest), repr(ei.value)
    assert any(w in ei.value.message for w in words), ei.value.message
    assert not list(dest.glob("*.db")) and not list(dest.glob("*tmp*")) if dest.exists() else True
    return ei.value


def test_sound_repository_restores_exactly_and_verifies(setup):
    tmp, db, repo, m1, m2 = setup
    r = restore(repo, m2["id"], str(tmp / "out"))
    assert dump(tmp / "out" / "app.db") == dump(db) and integrity(tmp / "out" / "app.db") == "ok"
    assert r["files"][0]["integrity"] == "ok"
    assert verify(repo, None, full=True)["ok"]
    assert m2["pages_delta"] > 0 and m2["stored_bytes_added"] < m1["stored_bytes_added"] / 4


def test_flipped_byte_in_a_pack_is_found_by_full_verify_and_refused_by_restore(setup):
    tmp, _db, repo, m1, m2 = setup
    _h, e = _page_entry(repo, m1)
    p = _pack_file(repo, e.pack)
    data = bytearray(p.read_bytes())
    data[e.offset + e.length // 2] ^= 0x40
    p.write_bytes(bytes(data))
    v = verify(repo, None, full=True)
    assert not v["ok"] and {x["backup"] for x in v["problems"]} == {m1["id"], m2["id"]}
    assert any(e.pack in x["problem"] for x in v["problems"])
    _restore_fails(repo, m2, tmp / "x", "does not match its hash", "cannot be decompressed")


def test_missing_pack_is_named_by_quick_verify_and_restore(setup):
    tmp, _db, repo, m1, m2 = setup
    _h, e = _page_entry(repo, m1)
    _pack_file(repo, e.pack).unlink()
    v = verify(repo, [m2["id"]])
    assert not v["ok"] and any(x["chunk"] == e.pack and "missing" in x["problem"] for x in v["problems"])
    _restore_fails(repo, m2, tmp / "x", "missing")


def test_truncated_pack_is_named(setup):
    tmp, _db, repo, m1, _m2 = setup
    _h, e = _page_entry(repo, m1)
    p = _pack_file(repo, e.pack)
    p.write_bytes(p.read_bytes()[:e.offset + 10])
    v = verify(repo, [m1["id"]], full=True)
    assert not v["ok"] and any("truncated" in x["problem"] for x in v["problems"]), v["problems"]
    _restore_fails(repo, m1, tmp / "x", "truncated")


def test_damaged_page_map_is_named(setup):
    tmp, _db, repo, m1, m2 = setup
    idx = _index(repo)
    e = idx.blobs[bytes.fromhex(m2["files"][0]["map"])]
    p = _pack_file(repo, e.pack)
    data = bytearray(p.read_bytes())
    data[e.offset + e.length - 3] ^= 0xFF
    p.write_bytes(bytes(data))
    v = verify(repo, [m2["id"]])
    assert not v["ok"] and any("page map" in x["problem"] for x in v["problems"]), v["problems"]
    _restore_fails(repo, m2, tmp / "x", "does not match", "decompress")
    assert verify(repo, [m1["id"]], full=True)["ok"] or m1["files"][0]["map"] == m2["files"][0]["map"]


def test_garbage_index_is_named_and_prune_refuses(setup):
    tmp, _db, repo, m1, m2 = setup
    _h, e = _page_entry(repo, m1)
    (Path(repo.store.root) / "index" / e.pack).write_bytes(b"BIX2 not zstd at all")
    v = verify(repo, [m1["id"]])
    assert not v["ok"] and any("damaged index" in x["problem"] for x in v["problems"]), v["problems"]
    _restore_fails(repo, m1, tmp / "x", "damaged index", "no pack index")
    with pytest.raises(DamagedIndex):
        prune(repo, Policy(last=1))
    assert _pack_file(repo, e.pack).exists() and repo.backup_ids() == [m1["id"], m2["id"]]   # nothing removed


def _rewrite_index(repo, pid, change):
    path = Path(repo.store.root) / "index" / pid
    _size, _digest, _entries = decode_index(pid, path.read_bytes())
    body = zstandard.ZstdDecompressor().decompress(path.read_bytes()[4:], max_output_size=1 << 26)
    recs = [list(r) for r in _REC.iter_unpack(body[_HEAD.size:])]
    head = list(_HEAD.unpack_from(body))
    change(head, recs)
    body = _HEAD.pack(*head) + b"".join(_REC.pack(*r) for r in recs)
    path.write_bytes(INDEX_MAGIC + zstandard.ZstdCompressor().compress(body))


HOSTILE = {
    "offset past the pack": lambda head, recs: recs[0].__setitem__(1, head[1] + 100),
    "huge length": lambda head, recs: recs[0].__setitem__(2, 1 << 30),
    "unknown kind": lambda head, recs: recs[0].__setitem__(3, 9),
    "huge decoded length": lambda head, recs: recs[0].__setitem__(4, 1 << 31),
    "delta without base": lambda head, recs: recs[0].__setitem__(3, 2),
    "names another pack": lambda head, recs: head.__setitem__(0, bytes(16)),
    "partial record": None,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_index_values_are_refused_by_name(setup, case):
    tmp, _db, repo, m1, _m2 = setup
    _h, e = _page_entry(repo, m1)
    path = Path(repo.store.root) / "index" / e.pack
    if HOSTILE[case] is None:
        body = zstandard.ZstdDecompressor().decompress(path.read_bytes()[4:], max_output_size=1 << 26)
        path.write_bytes(INDEX_MAGIC + zstandard.ZstdCompressor().compress(body[:-7]))
    else:
        _rewrite_index(repo, e.pack, HOSTILE[case])
    with pytest.raises(DamagedIndex) as ei:
        decode_index(e.pack, path.read_bytes())
    assert e.pack in ei.value.message
    v = verify(repo, None)
    assert not v["ok"]
    _restore_fails(repo, m1, tmp / "x", "damaged index", "no pack index")


def test_index_pointing_at_other_sound_bytes_is_caught_by_hash(setup):
    """Two records' locations swapped: each decodes fine, neither matches its hash."""
    tmp, _db, repo, m1, _m2 = setup
    _h, e = _page_entry(repo, m1)

    def swap(head, recs):
        a, b = recs[3], recs[4]
        a[1:5], b[1:5] = b[1:5], a[1:5]
    _rewrite_index(repo, e.pack, swap)
    v = verify(repo, None, full=True)
    assert not v["ok"]
    _restore_fails(repo, m1, tmp / "x", "does not match its hash")


@pytest.mark.parametrize("field,value", [("pages", 3), ("map", "zz" * 32), ("page_size", 1000), ("size", -1),
                                         ("map", None), ("name", "../evil.db")])
def test_hostile_manifest_fields_are_a_damaged_manifest(setup, field, value):
    tmp, _db, repo, _m1, m2 = setup
    path = Path(repo.store.root) / "manifests" / f"{m2['id']}.json"
    m = json.loads(path.read_text())
    m["files"][0][field] = value
    path.write_text(json.dumps(m))
    with pytest.raises(DamagedManifest):
        repo.manifest(m2["id"])
    v = verify(repo, None)
    assert not v["ok"] and all(x["backup"] == m2["id"] for x in v["problems"])
    _restore_fails(repo, m2, tmp / "x", "damaged")


def test_manifest_size_off_within_the_last_page_is_refused_by_restore(setup):
    """Structurally sound (the page count still fits), but the pages say otherwise."""
    tmp, _db, repo, _m1, m2 = setup
    path = Path(repo.store.root) / "manifests" / f"{m2['id']}.json"
    m = json.loads(path.read_text())
    m["files"][0]["size"] -= 100
    m["logical_bytes"] -= 100
    path.write_text(json.dumps(m))
    _restore_fails(repo, m2, tmp / "x", "make")


def test_page_map_larger_than_any_page_round_trips(tmp_path):
    """A 4 KiB-page file over 128 MiB has a page map over 1 MiB: an index must accept it."""
    import blake3

    from bastion.backup.pack import MAP, PackReader, PackWriter
    store = LocalStore(str(tmp_path / "r"))
    raw = os.urandom(32 * 70000)
    h = blake3.blake3(raw).digest()
    w = PackWriter(store, RepoIndex())
    w.add(h, MAP, zstandard.ZstdCompressor().compress(raw), len(raw))
    w.finish()
    assert PackReader(store, RepoIndex.load(store)).get(h) == raw


def test_encode_decode_index_round_trip():
    from bastion.backup.pack import ZSTD, Entry
    ents = [(bytes([i]) * 32, Entry("ab" * 16, 4 + 10 * i, 10, ZSTD, 4096, None)) for i in range(5)]
    size, digest, out = decode_index("ab" * 16, encode_index("ab" * 16, 60, b"d" * 32, ents))
    assert size == 60 and digest == b"d" * 32 and out == ents
    assert struct.calcsize(">32sIIBI32s") == _REC.size and os.path.basename("index/x") == "x"
