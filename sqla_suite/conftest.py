"""Runs SQLAlchemy's dialect compliance suite (``sqlalchemy.testing.suite``) with its own
pytest plugin. Without ``--dburi``/``--db``, a Bastion daemon is started in a temporary
directory, serving database ``suite`` (``suite.db``, with ``test_schema.db`` and
``test_schema_2.db`` attached as the schemas the suite uses) with the admin token, and
the suite runs through ``bastion://``. ``--dburi sqlite:///sqla_suite_sqlite.db`` runs the
same selection on SQLAlchemy's own SQLite file dialect, for comparison.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.dialects import registry

registry.register("bastion", "bastion.client.sqlalchemy", "BastionDialect")
pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin import pytestplugin as _sqla  # noqa: E402
from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402 - SQLAlchemy's plugin, after the setup above

_DAEMON: dict = {}


def _sqlite_schemas(dbapi_connection, record, proxy):  # SQLAlchemy's event signature
    """The comparison run on ``sqlite:///``: SQLAlchemy's SQLite provisioning ATTACHes
    test_schema when a connection is made, but not test_schema_2, and its connections
    after a dispose do not always have it; attach what is missing at every checkout
    (the daemon has both as configured files)."""
    import sqlite3 as _sqlite3
    if not isinstance(dbapi_connection, _sqlite3.Connection):
        return
    have = {r[1] for r in dbapi_connection.execute("PRAGMA database_list")}
    for schema in ("test_schema", "test_schema_2"):
        if schema not in have:
            dbapi_connection.execute(f'ATTACH DATABASE "sqla_sqlite_{schema}.db" AS {schema}')


from sqlalchemy import event  # noqa: E402
from sqlalchemy.pool import Pool  # noqa: E402

event.listen(Pool, "checkout", _sqlite_schemas)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_daemon() -> str:
    root = Path(tempfile.mkdtemp(prefix="bastion-sqla-"))
    files = [root / "suite.db", root / "test_schema.db", root / "test_schema_2.db"]
    for f in files:
        con = sqlite3.connect(f)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    port = _free_port()
    cfg = root / "bastion.toml"
    cfg.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{root / "var"}"\n\n'
                   f'[databases.suite]\nfiles = [{", ".join(repr(str(f)) for f in files)}]\n\n'
                   '[sql]\nidle_timeout = "60s"\nbusy_timeout = "20s"\nmax_transactions = 256\n')
    log = open(root / "daemon.log", "w")  # noqa: SIM115 - the daemon's output until the session ends
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _DAEMON.update(proc=proc, root=root, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited: {(root / 'daemon.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return f"bastion://127.0.0.1:{port}/suite?token_file={root / 'var' / 'token'}"
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the daemon did not start")


def pytest_configure(config):
    if not config.option.dburi and not config.option.db and not hasattr(config, "workerinput"):
        config.option.dburi = [_start_daemon()]
    _sqla.pytest_configure(config)         # this module's hook replaces the plugin's: call it


def pytest_unconfigure(config):
    if hasattr(_sqla, "pytest_unconfigure"):
        _sqla.pytest_unconfigure(config)
    proc = _DAEMON.get("proc")
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if _DAEMON:
        _DAEMON["log"].close()
        if not os.environ.get("BASTION_KEEP_SUITE_DIR"):
            shutil.rmtree(_DAEMON["root"], ignore_errors=True)
