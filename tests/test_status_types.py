"""The typed status shapes (TypedDicts) are the JSON the daemon gives: same keys, no more, no fewer.

mypy checks every dict the code builds against its TypedDict; this checks the other side, that
what a real daemon answers (HTTP and `--json`) has exactly the keys the types declare, so a key
spread in from an untyped dict, or one the type forgot, fails here.
"""

from __future__ import annotations

import sqlite3
import typing
from typing import Any, NotRequired

from bastion import capture
from bastion.capture.log import LogStatus
from bastion.backup.backups import BackupLatest
from bastion.daemon.core import DaemonInfo, DaemonStatus, DatabaseStatus, FileStatus, SQLStatus


def _keys(td: Any) -> tuple[set[str], set[str]]:
    # A module with `from __future__ import annotations` hands TypedDict its annotations as text
    # (ForwardRefs), and Python 3.11 then counts a NotRequired key in __required_keys__: read the text.
    def not_required(t: Any) -> bool:
        text = t.__forward_arg__ if isinstance(t, typing.ForwardRef) else ""
        return typing.get_origin(t) is NotRequired or text.startswith("NotRequired[")
    optional = set(td.__optional_keys__) | {k for k, t in td.__annotations__.items() if not_required(t)}
    return set(td.__required_keys__) - optional, optional


def _matches(d: dict[str, Any], td: Any) -> None:
    required, optional = _keys(td)
    assert required <= set(d) <= required | optional, (td.__name__, sorted(set(d) ^ required))


def test_bastion_status_json_has_exactly_the_keys_of_its_types(daemon):
    assert daemon.cli("backup", "bank", "--json").code == 0
    r = daemon.cli("status", "--json")
    assert r.code == 0, r.err
    st = r.json
    _matches(st, DaemonStatus)
    _matches(st["daemon"], DaemonInfo)
    _matches(st["sql"], SQLStatus)
    assert [db["name"] for db in st["databases"]] == ["bank"]
    for db in st["databases"]:
        _matches(db, DatabaseStatus)
        assert len(db["files"]) == 2
        for f in db["files"]:
            _matches(f, FileStatus)
    assert len(st["backups"]) == 1 and st["backups"][0]["backup"]
    for b in st["backups"]:
        _matches(b, BackupLatest)
    http = daemon.api("GET", "/v1/status").json()        # the same shape over HTTP
    _matches(http, DaemonStatus)
    assert {k: set(v) if isinstance(v, dict) else None for k, v in http.items()} == \
        {k: set(v) if isinstance(v, dict) else None for k, v in st.items()}


def test_capture_log_status_has_the_keys_of_its_type(tmp_path):
    path = str(tmp_path / "t.db")
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    con.close()
    assert capture.status(path) == {"installed": False}
    capture.install(path, "site-a")
    st = capture.status(path)
    required, optional = _keys(LogStatus)
    assert set(st) == required | optional, sorted(set(st) ^ (required | optional))
    assert st["installed"] is True and st["tables"] == ["t"] and st["schema_current"] is True


def _cli_matches(d: dict[str, Any], td: Any) -> None:
    """A command's --json: the result, plus the "exit_code" the CLI alone puts beside a verdict."""
    assert ("exit_code" in d) == ("verdict" in d), sorted(d)
    _matches({k: v for k, v in d.items() if k != "exit_code"}, td)


def test_command_results_have_exactly_the_keys_of_their_types(daemon, tmp_path):
    from bastion.backup.backups import BackupResult
    from bastion.backup.prune import KeptBackup, PruneResult, RemovedBackup
    from bastion.backup.restore import RestoredFile, RestoreResult
    from bastion.backup.verify import VerifiedBackup, VerifyResult

    def run(*args: str) -> dict[str, Any]:
        r = daemon.cli(*args, "--json")
        assert r.code == 0, r.err
        return r.json

    first, second = run("backup", "bank"), run("backup", "bank")
    for b in (first, second):
        _cli_matches(b, BackupResult)
        assert b["verified"] is True and "problems" not in b
    for args in (("verify", "--all"), ("verify", "--all", "--full")):
        v = run(*args)
        _cli_matches(v, VerifyResult)
        assert [e["backup"] for e in v["backups"]] == [first["backup"], second["backup"]]
        for e in v["backups"]:
            _matches(e, VerifiedBackup)
            assert ("full" in e) == ("--full" in args)
    out = tmp_path / "restored"
    r = run("restore", second["backup"], "--to", str(out))
    _cli_matches(r, RestoreResult)
    assert sorted(f["name"] for f in r["files"]) == ["audit.db", "bank.db"]
    for f in r["files"]:
        _matches(f, RestoredFile)
    p = run("prune", "--keep-last", "1", "--dry-run")
    _cli_matches(p, PruneResult)
    assert [k["id"] for k in p["kept"]] == [second["backup"]]
    assert [k["id"] for k in p["removed"]] == [first["backup"]]
    for k in p["kept"]:
        _matches(k, KeptBackup)
    for k in p["removed"]:
        _matches(k, RemovedBackup)


def test_contops_and_freeze_results_have_exactly_the_keys_of_their_types(daemon):
    from bastion.contops import EndedFile, EndResult, StartedFile, StartResult
    from bastion.freeze import FreezeResult, FrozenFile, ThawedFile, ThawResult

    def run(*args: str) -> dict[str, Any]:
        r = daemon.cli(*args, "--json")
        assert r.code == 0, r.err
        return r.json

    for command, td, item in (("startbu", StartResult, StartedFile), ("endbu", EndResult, EndedFile),
                              ("freeze", FreezeResult, FrozenFile), ("thaw", ThawResult, ThawedFile)):
        res = run(command, "bank")
        _cli_matches(res, td)
        assert len(res["files"]) == 2
        for f in res["files"]:
            _matches(f, item)
