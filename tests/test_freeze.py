"""Freeze and thaw end to end: writers of a real application wait (and do not fail), readers go on,
the snapshot taken under the freeze is consistent, and the daemon thaws on its own at the timeout."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from support import DaemonProc, check_bank


def frozen_of(daemon: DaemonProc) -> dict[str, Any]:
    st = daemon.cli("status", "--json")
    assert st.code == 0, st.err
    return {f["path"]: f["frozen"] for db in st.json["databases"] for f in db["files"]}


def assert_not_frozen(daemon: DaemonProc) -> None:
    fr = {p: f for p, f in frozen_of(daemon).items() if f is not None}
    assert fr == {}, fr


def quick_read(db: Path) -> tuple[int, float]:
    """A reader in this process (stdlib sqlite3): the transfer count, and how long the read took."""
    t0 = time.monotonic()
    con = sqlite3.connect(db, timeout=0.5)
    try:
        n = con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
    finally:
        con.close()
    return n, time.monotonic() - t0


def copy_files(app_dir: Path, dest: Path, with_wal: bool) -> Path:
    dest.mkdir(parents=True)
    for name in ("bank.db", "audit.db"):
        shutil.copyfile(app_dir / name, dest / name)
        wal = app_dir / f"{name}-wal"
        if with_wal and wal.exists():
            shutil.copyfile(wal, dest / f"{name}-wal")
    return dest


def wait_until_advances(db: Path, n: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        m, _ = quick_read(db)
        if m > n:
            return m
        assert time.monotonic() < deadline, f"writers did not resume (transfers stay at {n})"
        time.sleep(0.05)


def test_freeze_copy_thaw_while_the_application_writes(daemon, bank, tmp_path):
    bank.start()
    time.sleep(0.3)
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0, r.err
    fz = r.json
    assert sorted(f["path"] for f in fz["files"]) == sorted([str(bank.audit), str(bank.bank)])
    fr = frozen_of(daemon)
    assert fr[str(bank.bank)]["status"] == "active" and fr[str(bank.bank)]["freeze"] == fz["freeze"]

    # readers go on, quickly, and see no commit while frozen
    n0, took = quick_read(bank.bank)
    assert took < 0.4, f"a reader took {took:.3f} s during the freeze"
    complete = all(f["main_file_complete"] for f in fz["files"])
    copies = [copy_files(bank.dir, tmp_path / "main+wal", with_wal=True)]
    if complete:  # the main files alone are the database
        copies.append(copy_files(bank.dir, tmp_path / "main", with_wal=False))
    time.sleep(0.6)
    n1, took = quick_read(bank.bank)
    assert took < 0.4
    assert n1 == n0, "an application commit went through during the freeze"

    r = daemon.cli("thaw", "bank", "--json")
    assert r.code == 0, r.err
    th = r.json
    assert th["consistent"] is True and th["exit_code"] == 0
    assert 0.6 <= th["hold_seconds"] < 30
    assert {f["freeze"] for f in th["files"]} == {fz["freeze"]}
    assert_not_frozen(daemon)
    wait_until_advances(bank.bank, n1)
    stats = bank.stop()
    assert stats["errors"] == {}  # writers waited, none failed
    assert stats["max_latency_ms"] >= 500  # ...and a commit did wait for the thaw
    for c in copies:
        res = check_bank(c)
        assert res["ok"], (c, res)
        assert res["transfers"] == n0, (c, res)  # exactly what readers saw under the freeze
    assert check_bank(bank.dir)["ok"]


def test_freeze_times_out_and_thaws_on_its_own(daemon, bank):
    bank.start()
    r = daemon.cli("freeze", "bank", "--timeout", "1", "--json")
    assert r.code == 0, r.err
    assert r.json["timeout_seconds"] == 1.0
    n0, _ = quick_read(bank.bank)
    time.sleep(0.5)
    assert quick_read(bank.bank)[0] == n0  # held
    wait_until_advances(bank.bank, n0, timeout=5)  # writers resume without a thaw
    fr = frozen_of(daemon)[str(bank.bank)]
    assert fr["status"] == "timed_out" and "timeout of 1 s" in fr["reason"]
    r = daemon.cli("thaw", "bank")
    assert r.code == 2, (r.out, r.err)
    assert str(bank.bank) in r.err and "timeout" in r.err and "thawed automatically" in r.err
    assert "may be inconsistent" in r.err
    assert_not_frozen(daemon)  # acknowledged
    r = daemon.cli("thaw", "bank")
    assert r.code == 2 and "not frozen" in r.err and "acknowledged" in r.err
    # the next freeze works
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0 and r.json["warnings"] == [], r.err
    assert daemon.cli("thaw", "bank").code == 0
    assert bank.stop()["errors"] == {}


def test_freeze_around_a_command(daemon, bank, tmp_path):
    bank.start()
    dest = tmp_path / "snap"
    dest.mkdir()
    r = daemon.cli("freeze", "bank", "--json", "--", "sh", "-c",
                   f"sleep 0.3 && cp {bank.bank} {bank.bank}-wal {bank.audit} {bank.audit}-wal {dest}")
    assert r.code == 0, r.err
    d = r.json
    assert d["exit_code"] == 0 and d["command"]["exit_code"] == 0
    assert 0.3 <= d["hold_seconds"] < 30
    assert d["thaw"]["consistent"] is True
    res = check_bank(dest)
    assert res["ok"], res
    assert_not_frozen(daemon)

    n0, _ = quick_read(bank.bank)
    r = daemon.cli("freeze", "bank", "--", "sh", "-c", "echo snapshotting; exit 4")
    assert r.code == 2, (r.out, r.err)
    assert "snapshotting" in r.out and "exited with status 4" in r.err
    assert "thawed after" in r.out
    assert_not_frozen(daemon)
    wait_until_advances(bank.bank, n0)
    r = daemon.cli("freeze", "bank", "--json", "--", str(tmp_path / "no-such-snapshot-tool"))
    assert r.code == 2
    assert "cannot run" in r.json["command"]["error"]
    assert_not_frozen(daemon)
    assert bank.stop()["errors"] == {}


def test_freeze_twice_and_thaw_when_not_frozen(daemon, bank):
    r = daemon.cli("thaw", "bank")
    assert r.code == 2 and str(bank.bank) in r.err and "not frozen" in r.err
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0, r.err
    sid = r.json["freeze"]
    r2 = daemon.cli("freeze", "bank")
    assert r2.code == 2
    assert "already frozen" in r2.err and sid in r2.err and "nothing was frozen" in r2.err
    r2 = daemon.cli("freeze", str(bank.audit))  # one file of the group, by path
    assert r2.code == 2 and "already frozen" in r2.err
    fr = frozen_of(daemon)
    assert fr[str(bank.bank)]["freeze"] == sid and fr[str(bank.bank)]["status"] == "active"  # intact
    # writers still held by the first freeze
    con = sqlite3.connect(bank.bank, timeout=0.2)
    try:
        con.execute("UPDATE meta SET value = value WHERE key='transfers'")
        raise AssertionError("a write went through during the freeze")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
    finally:
        con.close()
    r = daemon.cli("thaw", "bank", "--json")
    assert r.code == 0 and {f["freeze"] for f in r.json["files"]} == {sid}
    r = daemon.cli("thaw", "bank")
    assert r.code == 2 and "not frozen" in r.err and "thawed" in r.err
    # bad values are usage errors, and nothing is frozen
    for bad in ("0", "-1", "nan", "5000"):
        r = daemon.cli("freeze", "bank", "--timeout", bad)
        assert r.code == 3, (bad, r.err)
        assert "timeout" in r.err
    r = daemon.cli("freeze", "nosuchdb")
    assert r.code == 3 and "unknown database 'nosuchdb'" in r.err
    assert_not_frozen(daemon)


def test_http_freeze_thaw_and_auth(daemon, bank):
    base = f"http://127.0.0.1:{daemon.port}"
    r = httpx.post(f"{base}/v1/freeze", json={"targets": ["bank"], "timeout": 5}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthError"
    assert_not_frozen(daemon)  # nothing happened
    r = httpx.get(f"{base}/v1/status", timeout=30)
    assert r.status_code == 401
    r = httpx.get(f"{base}/openapi.json", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401

    r = daemon.api("POST", "/v1/freeze", {"targets": ["bank"], "timeout": 5})
    assert r.status_code == 200, r.text
    fz = r.json()
    # the API says how it went with a verdict; exit codes are the CLI's (tests/test_verdict.py)
    assert {"freeze", "frozen_at", "thaw_by", "timeout_seconds", "files", "verdict"} <= set(fz)
    assert fz["verdict"] == "ok" and "exit_code" not in fz
    assert frozen_of(daemon)[str(bank.bank)]["freeze"] == fz["freeze"]
    r = httpx.post(f"{base}/v1/thaw", json={"targets": ["bank"]}, timeout=30)
    assert r.status_code == 401
    assert frozen_of(daemon)[str(bank.bank)]["status"] == "active"  # the unauthenticated thaw did nothing
    r = daemon.api("POST", "/v1/freeze", {"targets": ["bank"]})
    assert r.status_code == 409 and r.json()["error"]["type"] == "StateConflict"
    r = daemon.api("POST", "/v1/thaw", {"targets": ["bank"]})
    assert r.status_code == 200, r.text
    assert r.json()["consistent"] is True and r.json()["hold_seconds"] > 0
    r = daemon.api("POST", "/v1/thaw", {"targets": ["bank"]})
    assert r.status_code == 409 and r.json()["error"]["exit_code"] == 2
    # malformed requests answer in Bastion's error format, as usage errors
    r = daemon.api("POST", "/v1/freeze", {"targets": "bank"})
    assert r.status_code == 422 and r.json()["error"]["exit_code"] == 3 and "targets" in r.json()["error"]["message"]
    r = daemon.api("POST", "/v1/freeze", {"targets": ["nosuchdb"]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "UnknownTarget"
    assert_not_frozen(daemon)

    spec = daemon.api("GET", "/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for p, method in [("/v1/status", "get"), ("/v1/freeze", "post"), ("/v1/thaw", "post"),
                      ("/v1/contops/start", "post"), ("/v1/contops/end", "post"), ("/v1/protect", "post"),
                      ("/v1/recover", "post")]:
        assert method in paths.get(p, {}), p


def test_freeze_and_continuous_operations_together(daemon, bank, tmp_path):
    bank.start()
    # startbu on a frozen database: refused clearly (it needs the write lock the freeze holds)
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0, r.err
    sid = r.json["freeze"]
    r = daemon.cli("startbu", "bank")
    assert r.code == 2, r.err
    assert "frozen" in r.err and "thaw" in r.err and "internal error" not in r.err
    st = daemon.cli("status", "--json").json
    files = {f["path"]: f for db in st["databases"] for f in db["files"]}
    assert all(f["contops"] is None for f in files.values())
    assert files[str(bank.bank)]["frozen"]["freeze"] == sid  # the freeze is intact...
    n0, _ = quick_read(bank.bank)
    time.sleep(0.3)
    assert quick_read(bank.bank)[0] == n0  # ...and still holds the writers
    r = daemon.cli("thaw", "bank", "--json")
    assert r.code == 0 and r.json["consistent"], r.err

    # a freeze during continuous operations: the main files are pinned, so main + WAL is the snapshot
    r = daemon.cli("startbu", "bank")
    assert r.code == 0, r.err
    time.sleep(0.2)
    r = daemon.cli("freeze", "bank", "--json")
    assert r.code == 0, r.err
    assert {f["main_file_complete"] for f in r.json["files"]} == {False}
    snap = copy_files(bank.dir, tmp_path / "snap", with_wal=True)
    r = daemon.cli("thaw", "bank")
    assert r.code == 0, r.err
    r = daemon.cli("endbu", "bank", "--json")
    assert r.code == 0 and r.json["consistent"], r.err
    assert bank.stop()["errors"] == {}
    res = check_bank(snap)
    assert res["ok"], res
