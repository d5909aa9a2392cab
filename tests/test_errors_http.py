"""Every Bastion error keeps its class, message, hint, HTTP status and exit code across HTTP.

The daemon answers every error in one format (daemon/app.py error_response); every client
(the CLI's admin client and the daemon-to-daemon PeerClient, bastion/peer.py) reads it back
into the same class through the errors.py registry. Callers then test the class
(`except ReseedNeeded`), never the message. The classes are found two ways: the registry,
and a scan of src/ for classes deriving from BastionError, so a new error defined outside
errors.py (where a client process may never import it) fails here.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion import errors
from bastion.daemon.app import error_response
from bastion.errors import BastionError
from bastion.peer import PeerClient, error_from_response
from support import PY, DaemonProc, free_port, write_config

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"


def _scan() -> dict[str, str]:
    """Every class in src/ deriving (transitively, by name) from BastionError -> the file defining it."""
    bases: dict[str, tuple[set[str], str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))}
                bases.setdefault(node.name, (set(), str(path.relative_to(SRC))))[0].update(names)
    found = {"BastionError": "errors.py"}
    grew = True
    while grew:
        grew = False
        for name, (bs, where) in bases.items():
            if name not in found and bs & found.keys():
                found[name] = where
                grew = True
    return found


def test_every_error_class_is_defined_in_errors_py_and_registered():
    scanned = _scan()
    outside = {n: w for n, w in scanned.items() if w != "errors.py"}
    assert not outside, f"BastionError subclasses defined outside errors.py: {outside}"
    assert set(scanned) == set(errors.registry()), set(scanned) ^ set(errors.registry())
    assert len(scanned) > 25          # the scan itself works (the tree has ~31 classes)


def _classes() -> list[type[BastionError]]:
    return sorted(errors.registry().values(), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_the_http_format_round_trips_every_class(cls: type[BastionError]):
    exc = cls(f"a {cls.__name__} happened", hint="do this", path="/srv/x.db", details={"k": 1})
    resp = error_response(exc)
    body = json.loads(resp.body)
    back = error_from_response(resp.status_code, body)
    assert type(back) is cls
    assert (back.message, back.hint, back.path, back.details) == (exc.message, "do this", "/srv/x.db", {"k": 1})
    assert back.http_status == cls.http_status == resp.status_code
    assert back.exit_code == cls.exit_code
    # a prefix names the other side, the class stays
    assert type(error_from_response(resp.status_code, body, "site paris")) is cls


def test_an_instance_status_and_exit_code_survive():
    # from_os_error sets the status per instance (507: disk full), not per class
    exc = errors.from_os_error(OSError(errno.ENOSPC, "No space left on device", "/srv/x.db"), "writing")
    resp = error_response(exc)
    back = error_from_response(resp.status_code, json.loads(resp.body))
    assert back.http_status == 507 and back.exit_code == exc.exit_code and back.path == "/srv/x.db"


def test_a_client_process_knows_every_class_without_importing_the_engine():
    # The CLI never imports backup/, sql/ or capture: the classes must still be known there.
    code = ("import sys, bastion.daemon.client as c\n"
            "from bastion.errors import registry\n"
            "from bastion.peer import error_from_response\n"
            "e = error_from_response(500, {'error': {'type': 'CorruptChunk', 'message': 'm', 'exit_code': 2}})\n"
            "print(type(e).__name__, 'apsw' in sys.modules, len(registry()))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["CorruptChunk", "False"], out
    assert int(out[2]) == len(errors.registry())


def test_real_routes_answer_typed_errors(tmp_path: Path):
    """Errors raised deep in the daemon (backup names, repository, catalog, request checks)
    come back to the admin client and to a PeerClient as their own class."""
    from bastion import config as cfg
    from bastion.daemon.client import AdminClient
    port = free_port()
    d = DaemonProc(write_config(tmp_path, port), port, tmp_path / "var").start()
    try:
        admin = AdminClient(cfg.load(str(d.config)))
        empty = tmp_path / "no-repo"
        empty.mkdir()
        cases = [
            (lambda: admin.restore_in_place("../../etc", None), errors.UnsafeName, 422),
            (lambda: admin.restore_in_place("20260101T000000Z-bank", f"file://{empty}"), errors.NoRepository, 400),
            (lambda: admin.backup(["nosuch"]), errors.UnknownTarget, 404),
            # FastAPI's validation: a UsageError answered as 422; the answer's status is kept
            (lambda: admin.request("POST", "/v1/backups", {"targets": "not a list"}), errors.UsageError, 422),
        ]
        for call, cls, status in cases:
            with pytest.raises(BastionError) as info:
                call()
            assert type(info.value) is cls, (cls, type(info.value), info.value.message)
            assert info.value.http_status == status and info.value.exit_code == cls.exit_code
        # the peer side: a wrong peer token is an AuthError (401), with its hint
        peer = PeerClient(f"http://127.0.0.1:{port}", token="wrong", label="backup daemon")
        with pytest.raises(errors.AuthError) as info:
            peer.post("/v1/peer/positions", json={"database": "x", "origin": "o", "files": 1})
        assert info.value.message.startswith("backup daemon: ") and info.value.hint
        assert info.value.http_status == 401
        admin.close()
        peer.close()
    finally:
        d.stop()


def test_a_backup_daemon_asks_for_a_reseed_by_class(tmp_path: Path):
    """The replication shipper re-seeds on ReseedNeeded (it matched 409 bodies before): a replica
    never seeded from this origin answers a batch with exactly that class, through PeerClient."""
    token = tmp_path / "peer.token"
    token.write_text("t" * 64 + "\n")
    port = free_port()
    copy = tmp_path / "copy"
    cfg = write_config(tmp_path, port, {"bank": [str(copy / "bank.db")]},
                       extra=f'[replication]\npeer_token_file = "{token}"\n')
    cfg.write_text(cfg.read_text().replace("[databases.bank]\n", '[databases.bank]\nreplica_of = "bank"\n'))
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    peer = PeerClient(f"http://127.0.0.1:{port}", token="t" * 64, label="backup daemon")
    try:
        with pytest.raises(errors.ReseedNeeded) as info:
            peer.post("/v1/peer/apply", msgpack={"database": "bank", "origin": "someone-else", "files": 1,
                                                 "cut": "c1", "chunk": 0, "final": True, "file": 0, "batch": {}})
        assert info.value.http_status == 409 and isinstance(info.value, errors.StateConflict)
        # and a malformed batch is a usage error (exit 3), not a reason to re-seed
        with pytest.raises(errors.UsageError) as bad:
            peer.post("/v1/peer/apply", msgpack={"database": "bank"})
        assert not isinstance(bad.value, (errors.ReseedNeeded, errors.ChangesMissing))
    finally:
        peer.close()
        d.stop()


def test_a_transport_error_is_daemon_unavailable_and_drops_the_pool():
    port = free_port()       # nothing listens there
    peer = PeerClient(f"http://127.0.0.1:{port}", label="site x", hint="it queues", timeout=(2.0, 1.0))
    first = peer._http
    with pytest.raises(errors.DaemonUnavailable) as info:
        peer.get("/v1/health")
    assert "site x unreachable (/v1/health)" in info.value.message and info.value.hint == "it queues"
    assert info.value.details["transport"] == "ConnectError"
    assert peer._http is not first and first.is_closed    # the next call starts on fresh connections


def test_the_cli_shows_a_typed_error_with_its_exit_code(tmp_path: Path):
    """A UsageError subclass raised in the daemon (NoRepository) exits 3 in the CLI, with its hint."""
    port = free_port()
    d = DaemonProc(write_config(tmp_path, port), port, tmp_path / "var").start()
    try:
        empty = tmp_path / "no-repo"
        empty.mkdir()
        r = d.cli("restore", "20260101T000000Z-bank", "--replace", "--from", f"file://{empty}")
        assert r.code == errors.NoRepository.exit_code == 3, (r.code, r.err)
        assert r.err.startswith("error: ") and "hint: " in r.err
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
