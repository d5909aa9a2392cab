"""The typed status shapes (TypedDicts) are the JSON the daemon gives: same keys, no more, no fewer.

mypy checks every dict the code builds against its TypedDict; this checks the other side, that
what a real daemon answers (HTTP and `--json`) has exactly the keys the types declare, so a key
spread in from an untyped dict, or one the type forgot, fails here.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from bastion import capture
from bastion.capture.log import LogStatus
from bastion.backup.backups import BackupLatest
from bastion.daemon.core import DaemonInfo, DaemonStatus, DatabaseStatus, FileStatus, SQLStatus


def _keys(td: Any) -> tuple[set[str], set[str]]:
    return set(td.__required_keys__), set(td.__optional_keys__)


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
