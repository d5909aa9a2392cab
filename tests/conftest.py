"""Shared fixtures: a real daemon in its own process, a real bank application in another.

Nothing here mocks Bastion: tests drive the `bastion` CLI and the HTTP API of a
daemon started with `bastion serve` on a free loopback port, and check real
SQLite files with Python's stdlib sqlite3 in the test process (never the
daemon's process). The helpers themselves live in tests/support/ (shared with bench/).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import App, DaemonProc, free_port, init_bank, write_config
from support.netns import Net, netns_unavailable
from support.servers import s3_server, sshd_server  # noqa: F401  (session fixtures: one server each)


@pytest.fixture
def bank(tmp_path: Path) -> App:
    return App(init_bank(tmp_path / "app"))


@pytest.fixture
def daemon(tmp_path: Path, bank: App):
    """A daemon whose config protects the bank (bank.db + audit.db) as database 'bank'."""
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]},
                       extra="[contops]\ngate_timeout = \"10s\"\n")
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    yield d
    d.stop()
    if bank.proc and bank.proc.poll() is None:
        bank.proc.kill()


@pytest.fixture
def net():
    """A bridge and namespaces to put daemons in (support.netns), all removed afterwards."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    n = Net()
    try:
        yield n
    finally:
        n.close()
