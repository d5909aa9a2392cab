"""What other programs import from Bastion, pinned so that a change to it is deliberate.

bastion.client is the DB-API 2.0 driver applications use: its names, module globals and
exception tree. bastion.cli is the entry point: importing it must stay light (no apsw,
no daemon engine), because every `bastion` command pays for it.
"""

from __future__ import annotations

import subprocess

import bastion.client as bc
from support import PY

EXPORTED = {
    "connect", "Connection", "Cursor", "parse_dsn", "apilevel", "threadsafety", "paramstyle",
    "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError", "IntegrityError",
    "InternalError", "ProgrammingError", "NotSupportedError", "AccessDenied", "TransactionLost",
    "OutcomeUnknown", "NotReplicated", "Binary", "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks",
    "TimestampFromTicks", "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID", "affinity",
}

# PEP 249's tree, plus Bastion's own OperationalErrors
PARENT = {
    "Warning": Exception, "Error": Exception, "InterfaceError": bc.Error, "DatabaseError": bc.Error,
    "DataError": bc.DatabaseError, "OperationalError": bc.DatabaseError, "IntegrityError": bc.DatabaseError,
    "InternalError": bc.DatabaseError, "ProgrammingError": bc.DatabaseError,
    "NotSupportedError": bc.DatabaseError, "AccessDenied": bc.OperationalError,
    "TransactionLost": bc.OperationalError, "NotReplicated": bc.OperationalError,
    "OutcomeUnknown": bc.OperationalError,
}


def test_the_driver_exports_exactly_these_names():
    assert set(bc.__all__) == EXPORTED
    assert len(bc.__all__) == len(EXPORTED)       # no name twice
    for name in bc.__all__:
        assert hasattr(bc, name), name


def test_the_driver_globals_pep_249_asks_for():
    assert (bc.apilevel, bc.threadsafety, bc.paramstyle) == ("2.0", 1, "qmark")


def test_the_exception_tree():
    for name, parent in PARENT.items():
        cls = getattr(bc, name)
        assert cls.__bases__ == (parent,), (name, cls.__bases__)
    # the driver's errors are its own (PEP 249), not the daemon's BastionError
    from bastion.errors import BastionError
    assert not any(issubclass(getattr(bc, n), BastionError) for n in PARENT)


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys\n{stmt}\nprint('\\n'.join(sorted(sys.modules)))"
    return set(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_importing_the_cli_stays_light():
    mods = _modules_after("import bastion.cli")
    heavy = {"apsw", "bastion.daemon.core", "bastion.daemon.app", "bastion.backup", "bastion.capture",
             "bastion.sql", "fastapi", "uvicorn"}
    assert not mods & heavy, sorted(mods & heavy)
    assert "bastion.cli.cluster" in mods        # every command group is registered


def test_the_driver_does_not_load_the_daemon():
    mods = _modules_after("import bastion.client")
    assert "apsw" not in mods and "bastion.daemon.core" not in mods, sorted(m for m in mods if "bastion" in m)


def test_server_errors_map_by_class_so_subclasses_follow_their_parent():
    from bastion import errors as server
    from bastion.client.errors import from_server

    def mapped(cls: type[server.BastionError]) -> type:
        return type(from_server(cls.http_status, {"error": cls("m").to_dict()}))
    expect = {server.SQLFailure: bc.OperationalError,      # by its sqlite_error detail; none given here
              server.UsageError: bc.ProgrammingError, server.AuthError: bc.AccessDenied,
              server.PermissionDenied: bc.AccessDenied, server.NotReplicated: bc.NotReplicated,
              server.TransactionGone: bc.TransactionLost, server.StateConflict: bc.OperationalError,
              server.BusyError: bc.OperationalError, server.FileProblem: bc.OperationalError,
              server.DaemonUnavailable: bc.OperationalError}
    for cls in server.registry().values():
        parent = next((p for p in cls.__mro__ if p in expect), None)
        want = expect[parent] if parent else (bc.InternalError if cls.http_status >= 500 else bc.DatabaseError)
        assert mapped(cls) is want, (cls.__name__, mapped(cls), want)
    assert mapped(server.NoRepository) is bc.ProgrammingError         # a UsageError subclass
    assert mapped(server.ReseedNeeded) is bc.OperationalError         # a StateConflict subclass
    # an unknown type stays an error by its status
    assert type(from_server(503, {"error": {"type": "Nope", "message": "m"}})) is bc.InternalError


def test_sqlalchemy_sees_a_lost_node_by_class():
    from bastion.client.errors import ConnectionClosed, NoActiveNode
    from bastion.client.sqlalchemy import BastionDialect
    d = BastionDialect(dbapi=bc)
    assert d.is_disconnect(NoActiveNode("gone"), None, None)
    assert d.is_disconnect(ConnectionClosed("closed"), None, None)
    assert not d.is_disconnect(bc.OperationalError("no active Bastion node, said a trigger"), None, None)
    assert issubclass(NoActiveNode, bc.OperationalError) and issubclass(ConnectionClosed, bc.ProgrammingError)
