"""The daemon itself: one per data_dir, clear errors at start, token, protection."""

import os
import sqlite3
import stat
import subprocess
import time

import httpx

from support import DaemonProc, free_port, serve_refused, write_config


def test_token_is_private_and_required(daemon):
    mode = stat.S_IMODE(os.stat(daemon.data_dir / "token").st_mode)
    assert mode == 0o600
    assert daemon.api("GET", "/v1/status").status_code == 200
    r = daemon.api("GET", "/v1/status", token="wrong")
    assert r.status_code == 401
    assert "token" in r.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{daemon.port}/openapi.json").status_code == 401
    spec = daemon.api("GET", "/openapi.json").json()
    assert "/v1/contops/start" in spec["paths"] and "/v1/freeze" in spec["paths"]


def test_second_daemon_on_same_data_dir_is_refused(daemon):
    p = serve_refused(daemon.config)
    assert p.returncode == 2
    assert "already running" in p.stderr and str(daemon.data_dir) in p.stderr


def test_port_in_use_is_a_clear_error(tmp_path, daemon):
    other = tmp_path / "other"
    other.mkdir()
    cfg = write_config(other, daemon.port)
    p = serve_refused(cfg)
    assert p.returncode == 3
    assert "already in use" in p.stderr


def test_config_database_is_protected_at_start(daemon, bank):
    st = daemon.cli("status", "--json").json
    files = {f["path"]: f for db in st["databases"] for f in db["files"]}
    assert files[str(bank.bank)]["protected"] and files[str(bank.bank)]["journal_mode"] == "wal"
    con = sqlite3.connect(bank.bank)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_rollback_mode_writer_blocks_wal_switch_with_clear_error(tmp_path):
    db = tmp_path / "busy.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    port = free_port()
    cfg = write_config(tmp_path, port, extra='[contops]\ngate_timeout = "1s"\n')
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    # another process holds a write transaction in rollback-journal mode
    holder = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE, text=True)
    holder.stdin.write("BEGIN EXCLUSIVE; INSERT INTO t VALUES(1);\n")
    holder.stdin.flush()
    time.sleep(0.5)
    try:
        r = d.cli("protect", str(db))
        assert r.code == 2, r.err
        assert str(db) in r.err and "WAL" in r.err and "hint:" in r.err
        r = d.cli("startbu", str(db))
        assert r.code == 2 and "WAL" in r.err
    finally:
        holder.stdin.write("COMMIT;\n.quit\n")
        holder.stdin.close()
        holder.wait(10)
    r = d.cli("protect", str(db), "--json")
    assert r.code == 0, r.err
    assert r.json["files"][0]["journal_mode"] == "wal"
    # remembered: protected again after a restart
    d.stop()
    d.start()
    st = d.cli("status", "--json").json
    assert any(f["path"] == str(db) and f["protected"] for db_ in st["databases"] for f in db_["files"])
    d.stop()
