"""The backup manifest as a type: the JSON on disk is what it was, and a hostile one is a DamagedManifest.

Byte for byte: a manifest as Bastion writes it reads into a Manifest whose to_json writes the
same bytes again (so a repository written before reads back the same, and an older Bastion
reads a new one). Hostile: every value of a sound manifest replaced by values of every other
type, and every key removed; each result is either a DamagedManifest naming the problems or a
Manifest whose fields have the types they declare; never another exception.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from bastion.backup.manifest import Chunk, Manifest, ManifestFile, TableDigest, problems
from bastion.backup.repository import Repository
from bastion.errors import DamagedManifest
from bastion.position import Instant

BID = "20251203T135507Z-5f3a9c"

# A manifest exactly as Bastion (format 1) writes it: json.dumps(manifest, indent=1), in this key order.
WRITTEN = b"""{
 "format": 1,
 "id": "20251203T135507Z-5f3a9c",
 "database": "bank",
 "instant": "2025-12-03T13:55:07.122Z",
 "instant_epoch": 1764770107.123,
 "sqlite_version": "3.46.1",
 "files": [
  {
   "path": "/srv/bank/bank.db",
   "name": "bank.db",
   "size": 12288,
   "page_size": 4096,
   "sha256": "f833d06303c23bef5f545bc0aa72a8dee97f361c5176d89eb6f219bbdb62871c",
   "chunks": [
    [
     "d0f631ca1ddba8db3bcfcb9e057cdc98d0379f1bee00e75a545147a27dadd982",
     8192
    ],
    [
     "9c0abe51c6e6655d81de2d044d4fb194931f058c0426c67c7285d8f5657ed64a",
     4096
    ]
   ],
   "tables": {
    "accounts": {
     "rows": 3,
     "sha256": "bc62a3c14fec277e3dc6b504bf7c6348c2e421f8acc42032deddb0a96070f078"
    },
    "ledger": {
     "rows": 0,
     "sha256": "fe14010b4fe83303852f0467c919ef9a7ca089b91e96e3aad7d426dd87079297"
    }
   }
  },
  {
   "path": "/srv/bank/audit.db",
   "name": "audit.db",
   "size": 4096,
   "page_size": 4096,
   "sha256": "01658de4833c6afe8318aeb0f74614eb8d6050df8d9087dbd45b55b72b21f784",
   "chunks": [
    [
     "7c1c97df17c066924822b0af09a65251554962c61e23329aed04cd19020dc3b8",
     4096
    ]
   ],
   "tables": {
    "audit": {
     "rows": 1,
     "sha256": "b81f37a043a6f767e7c94d105f4bd31282f3ecc20680bb9d09bd93461cf4c863"
    }
   }
  }
 ],
 "logical_bytes": 16384,
 "stored_bytes_added": 9001,
 "chunks_total": 3,
 "chunks_new": 2,
 "read_seconds": 0.012
}"""

KEYS = ["format", "id", "database", "instant", "instant_epoch", "sqlite_version", "files", "logical_bytes",
        "stored_bytes_added", "chunks_total", "chunks_new", "read_seconds",
        "reader_peak_rss_kb"]   # informational, kept in Manifest.extra (bench/bench_backup.py reads it)
FILE_KEYS = ["path", "name", "size", "page_size", "sha256", "chunks", "tables"]


def _written(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()     # what Repository.put_manifest writes


def test_a_written_manifest_reads_into_types_and_writes_back_byte_for_byte(tmp_path):
    m = Manifest.from_bytes(WRITTEN, BID)
    assert m.id == BID and m.database == "bank" and m.format == 1
    assert m.instant == Instant(1764770107.123) and m.instant_text == "2025-12-03T13:55:07.122Z"
    bank = m.files[0]
    assert isinstance(bank, ManifestFile) and bank.name == "bank.db" and bank.size == 12288
    assert bank.chunks[1] == Chunk("9c0abe51c6e6655d81de2d044d4fb194931f058c0426c67c7285d8f5657ed64a", 4096)
    assert bank.tables["accounts"] == TableDigest(3, "bc62a3c14fec277e3dc6b504bf7c6348c2e421f8acc42032deddb0a96070f078")
    assert m.logical_bytes == 16384 and (m.stored_bytes_added, m.chunks_total, m.chunks_new) == (9001, 3, 2)
    assert m.extra == {"sqlite_version": "3.46.1", "read_seconds": 0.012}
    assert len(m.digests()) == 3
    assert _written(m.to_json()) == WRITTEN
    assert list(m.to_json()) == KEYS[:-1] and all(list(f) == FILE_KEYS for f in m.to_json()["files"])
    # through the repository: put_manifest writes those bytes, manifest() reads the same value back
    repo = Repository.open(f"file://{tmp_path / 'repo'}", create=True)
    repo.put_manifest(m)
    assert (tmp_path / "repo" / "manifests" / f"{BID}.json").read_bytes() == WRITTEN
    assert repo.manifest(BID) == m
    assert list(repo.manifests()) == [m]


@pytest.mark.parametrize("change", [
    pytest.param(lambda d: [d.pop(k) for k in ("stored_bytes_added", "chunks_total", "chunks_new")],
                 id="optional-counts-absent"),
    pytest.param(lambda d: [d.pop(k) for k in ("sqlite_version", "read_seconds")], id="informational-absent"),
    pytest.param(lambda d: d.update(instant_epoch=1764770107, instant="2025-12-03T13:55:07.000Z"),
                 id="integral-epoch-stays-an-int"),
    pytest.param(lambda d: d.update(instant="2025-12-03T13:55:07Z"), id="instant-text-without-fraction"),
    pytest.param(lambda d: d.update(written_by="a later Bastion", notes={"a": [1, None]}), id="unknown-keys-kept"),
    pytest.param(lambda d: d.update(sqlite_version=None, read_seconds="n/a"), id="informational-odd-values-kept"),
    pytest.param(lambda d: d["files"][0].update(tables={}), id="file-with-no-tables"),
])
def test_every_shape_bastion_accepts_round_trips_byte_for_byte(change):
    obj = json.loads(WRITTEN)
    change(obj)
    raw = _written(obj)
    assert _written(Manifest.from_bytes(raw, BID).to_json()) == raw


def test_a_real_backups_manifest_is_the_shape_the_old_writer_wrote(daemon):
    r = daemon.cli("backup", "bank", "--json")
    assert r.code == 0, r.err
    bid = r.json["backup"]
    raw = (daemon.data_dir / "backups" / "manifests" / f"{bid}.json").read_bytes()
    obj = json.loads(raw)
    assert _written(obj) == raw                       # json.dumps(dict, indent=1), nothing else
    assert list(obj) == KEYS and all(list(f) == FILE_KEYS for f in obj["files"]), list(obj)
    m = Manifest.from_bytes(raw, bid)
    assert _written(m.to_json()) == raw
    assert r.json["instant"] == m.instant_text == obj["instant"] and r.json["chunks_total"] == obj["chunks_total"]
    listed = daemon.cli("backups", "list", "--json").json["backups"]
    assert [(b["id"], b["instant"], b["files"]) for b in listed] == [(bid, obj["instant"], ["bank.db", "audit.db"])]


# -- hostile manifests ---------------------------------------------------------------------------

ODD = [None, True, False, 0, -1, 1.5, 3.0, math.nan, math.inf, "", "x", "a" * 64, "/abs", [], [1], {}, {"a": 1},
       ["a" * 64, 1]]


def _paths(obj: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at] if at else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += _paths(v, (*at, k))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _delete(obj: Any, path: tuple[Any, ...]) -> None:
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _well_typed(m: Manifest) -> None:
    """Every field has the type it declares, and what the code relies on holds."""
    assert type(m.format) is int and m.id == BID and isinstance(m.database, str) and m.database.strip()
    assert isinstance(m.instant, Instant) and isinstance(m.instant_text, str)
    assert _count(m.logical_bytes) and m.logical_bytes == sum(f.size for f in m.files)
    for v in (m.stored_bytes_added, m.chunks_total, m.chunks_new):
        assert v is None or _count(v)
    assert m.files and len({f.name.casefold() for f in m.files}) == len(m.files)
    for f in m.files:
        assert isinstance(f.path, str) and f.path.startswith("/") and "/" not in f.name
        assert _count(f.size) and _count(f.page_size) and isinstance(f.sha256, str) and len(f.sha256) == 64
        assert all(isinstance(c, Chunk) and isinstance(c.digest, str) and _count(c.size) and c.size > 0
                   for c in f.chunks)
        assert sum(c.size for c in f.chunks) == f.size
        assert all(isinstance(t, str) and isinstance(d, TableDigest) and _count(d.rows) and isinstance(d.sha256, str)
                   for t, d in f.tables.items())


def _judge(obj: Any) -> str:
    """'ok' or 'damaged'; anything but a sound Manifest or a DamagedManifest fails the test."""
    try:
        m = Manifest.from_json(obj, BID)
    except DamagedManifest as exc:
        found = problems(obj, BID)
        assert found and exc.details["problems"] == found
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        assert exc.message == f"the manifest of backup {BID} is damaged: {found[0]['problem']}{more}"
        return "damaged"
    _well_typed(m)
    assert m.to_json() == obj      # whatever it accepts, it gives back
    return "ok"


def test_every_value_of_every_type_anywhere_is_a_sound_manifest_or_a_damaged_one():
    sound = json.loads(WRITTEN)
    verdicts: dict[str, int] = {"ok": 0, "damaged": 0}
    for path in _paths(sound):
        for value in ODD:
            obj = copy.deepcopy(sound)
            _set(obj, path, value)
            verdicts[_judge(obj)] += 1
        obj = copy.deepcopy(sound)
        _delete(obj, path)
        verdicts[_judge(obj)] += 1
    for whole in ODD:
        assert _judge(whole) == "damaged"
    # most changes are damage; the few accepted are the informational keys and optional counts
    assert verdicts["damaged"] > 10 * verdicts["ok"] > 0, verdicts


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: d.update(format=3), "has format 3; this Bastion writes and reads formats 1 and 2"),
    (lambda d: d.update(id="other"), f"names itself 'other', not {BID!r} as its object name says"),
    (lambda d: d.update(instant_epoch=1_000_000_000.5),
     "instant 2025-12-03T13:55:07.122Z and instant_epoch 1000000000.5 name different moments"),
    (lambda d: d.update(files=[]), "has no files (an empty or missing file list restores nothing)"),
    (lambda d: d["files"][0].update(size=4096), "file bank.db: size 4096 differs from the sum of its chunk sizes "
                                                "(12288)"),
    (lambda d: d["files"][1].update(name="bank.db"), "file name 'bank.db' appears twice in a manifest; refused"),
    (lambda d: d["files"][0].update(name="../x"), "file name '../x' in a manifest"),
    (lambda d: d["files"][0]["tables"].update(accounts={"rows": -1, "sha256": "x"}),
     "file bank.db: digest of table 'accounts' is malformed"),
    (lambda d: d.update(chunks_total=4), "chunks_total 4 differs from the number of chunks listed (3)"),
    (lambda d: d.update(chunks_new=-2), "chunks_new -2 is not a count"),
    (lambda d: d.update(chunks_total=3.0), "chunks_total 3.0 is not a count"),
])
def test_a_damaged_manifest_says_what_is_wrong_in_the_same_words(change, problem):
    obj = json.loads(WRITTEN)
    change(obj)
    with pytest.raises(DamagedManifest) as err:
        Manifest.from_json(obj, BID, where="file:///r")
    assert err.value.message.startswith(f"the manifest of backup {BID} in file:///r is damaged: {problem}")


def test_bytes_that_are_not_json_are_damage_too():
    with pytest.raises(DamagedManifest) as err:
        Manifest.from_bytes(WRITTEN[:300], BID, where="file:///r")
    assert err.value.message == (f"the manifest of backup {BID} in file:///r is damaged: is not valid JSON "
                                 "(truncated or overwritten)")
    assert err.value.details == {"backup": BID, "problems": [
        {"file": None, "chunk": None, "problem": "is not valid JSON (truncated or overwritten)"}]}


def test_a_format2_manifest_reads_into_types_and_writes_back_byte_for_byte():
    """Format 2 describes a file by its pages and page map; the same type carries it, the same bytes go back."""
    obj = {"format": 2, "id": "2026-12-03T17-00-01Z-abcdef", "database": "app",
           "instant": "2026-12-03T17:00:01Z", "instant_epoch": 1796317201,
           "sqlite_version": "3.46.1",
           "files": [{"path": "/data/app.db", "name": "app.db", "size": 8192, "page_size": 4096,
                      "pages": 2, "map": "ab" * 32},
                     {"path": "/data/empty.db", "name": "empty.db", "size": 0, "page_size": 0,
                      "pages": 0, "map": None}],
           "logical_bytes": 8192, "stored_bytes_added": 100, "chunks_total": 2, "chunks_new": 1,
           "read_seconds": 0.01, "parent": None, "pages_new": 1, "pages_delta": 0, "packs_new": 1}
    m = Manifest.from_json(obj, obj["id"])
    assert m.format == 2 and [f.pages for f in m.files] == [2, 0] and m.files[0].map == "ab" * 32
    assert m.files[0].sha256 is None and m.files[0].tables is None and m.digests() == set()
    assert _written(m.to_json()) == _written(obj)
    bad = dict(obj, files=[dict(obj["files"][0], pages=3)])     # 3 pages cannot hold 8192 bytes of 4096
    with pytest.raises(DamagedManifest, match="3 pages cannot hold 8192 bytes"):
        Manifest.from_json(bad, obj["id"])
