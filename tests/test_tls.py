"""TLS with a private certificate authority: the admin CLI, the SQL driver and replication.

A CA made for the test (trustme) signs each daemon's certificate for 127.0.0.1. Every
client must trust that CA explicitly ([daemon] tls_ca, ``ca=``, [replication]
peer_ca_file); without it, each says that TLS failed (not "nobody is listening").
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from pathlib import Path

from typing import Any

import pytest
import trustme

import bastion.client
from bastion.sql.users import hash_password
from support import DaemonProc, free_port, write_config

pytestmark = pytest.mark.timeout(180)
PW = "correct horse battery"


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    authority.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    return paths


def tls_daemon(dir: Path, ca: dict[str, Path], files: dict[str, Any], extra: str = "",
               trust: bool = True) -> DaemonProc:
    """A daemon serving HTTPS with a certificate of ca; trust: it also trusts ca for its own clients (tls_ca)."""
    dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls = {"tls_cert": ca["cert"], "tls_key": ca["key"], **({"tls_ca": ca["ca"]} if trust else {})}
    cfg = write_config(dir, port, files, extra=extra, daemon=tls)
    return DaemonProc(cfg, port, dir / "var", ca=ca["ca"])


def make_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    con.close()
    return path


def test_cli_and_driver_trust_only_the_configured_ca(tmp_path, ca):
    db = make_db(tmp_path / "app" / "app.db")
    users = f'[users.alice]\npassword_hash = "{hash_password(PW)}"\naccess = {{ app = "read-write" }}\n'
    d = tls_daemon(tmp_path / "d", ca, {"app": [str(db)]}, extra=users).start()
    try:
        r = d.cli("status", "--json")
        assert r.code == 0, r.err                           # the CLI speaks https, trusting tls_ca
        # the same daemon seen by a CLI whose config does not name the CA: a TLS error, said so
        lost = tmp_path / "no-ca.toml"
        lost.write_text(d.config.read_text().replace(f'tls_ca = "{ca["ca"]}"\n', ""))
        r = DaemonProc(lost, d.port, d.data_dir).cli("status")
        assert r.code != 0 and "TLS failed" in r.err and "tls_ca" in r.err, (r.code, r.err)
        dsn = f"bastions://alice@127.0.0.1:{d.port}/app"
        con = bastion.client.connect(dsn, password=PW, ca=str(ca["ca"]), failover_timeout=10)
        cur = con.cursor()
        cur.execute("INSERT INTO t(v) VALUES (?)", ("over tls",))
        con.commit()
        cur.execute("SELECT v FROM t")
        assert cur.fetchall() == [("over tls",)]
        con.close()
        t0 = time.monotonic()
        with pytest.raises(bastion.client.OperationalError, match=r"TLS with .* failed") as exc:
            bastion.client.connect(dsn, password=PW, failover_timeout=10).cursor().execute("SELECT 1")
        assert "ca=PATH" in str(exc.value) or "ca=PATH" in (getattr(exc.value, "hint", "") or "")
        assert time.monotonic() - t0 < 8            # said at once, not after the failover timeout
    finally:
        d.stop()


def test_replication_over_tls_with_a_private_ca(tmp_path, ca):
    src = make_db(tmp_path / "p" / "app.db")
    token = tmp_path / "peer.token"
    token.write_text(secrets.token_hex(32))
    repl = f'[replication]\npeer_token_file = "{token}"\n'
    backup = tls_daemon(tmp_path / "b", ca, {"app": {"files": [tmp_path / "copy" / "app.db"], "replica_of": "app"}},
                        extra=repl)
    backup.start()
    pdir = tmp_path / "primary"
    pdir.mkdir()
    pport = free_port()
    cfg = write_config(pdir, pport, {"app": {"files": [src], "replicate_to": f"https://127.0.0.1:{backup.port}"}},
                       extra=repl.replace("\n", f'\npeer_ca_file = "{ca["ca"]}"\n', 1))
    primary = DaemonProc(cfg, pport, pdir / "var").start()
    try:
        con = sqlite3.connect(src)
        con.executemany("INSERT INTO t(v) VALUES (?)", [(f"row {i}",) for i in range(100)])
        con.commit()
        con.close()
        res = primary.cli("replicate", "run", "app", "--json")
        assert res.code == 0, (res.out, res.err)
        copy = sqlite3.connect(tmp_path / "copy" / "app.db")
        assert copy.execute("SELECT count(*) FROM t").fetchone()[0] == 100
        copy.close()
        primary.stop()
        # the same primary without peer_ca_file: the backup's certificate is not trusted
        cfg.write_text(cfg.read_text().replace(f'peer_ca_file = "{ca["ca"]}"\n', ""))
        primary.start()
        res = primary.cli("replicate", "run", "app", "--json", timeout=60)
        assert res.code != 0
        st = primary.cli("replicate", "status", "--json").json["databases"][0]
        assert "TLS failed" in st["last_error"], st
    finally:
        primary.stop()
        backup.stop()
