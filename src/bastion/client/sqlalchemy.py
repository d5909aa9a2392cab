"""SQLAlchemy dialect for Bastion's DB-API driver: ``bastion://`` and ``bastion+dbapi://``.

    engine = create_engine("bastion://alice:PASSWORD@db1:8750/bank?host=db2:8750")

The backend is SQLite, so this is SQLAlchemy's SQLite dialect (its SQL, types and
reflection, and its name ``sqlite``: ``sqlite_*`` table/index options, ``with_variant(...,
"sqlite")`` and ``sqlalchemy.dialects.sqlite.insert`` apply) over the network driver.
What differs from pysqlite, and why:

* Transactions are real. pysqlite relies on sqlite3 beginning a transaction only
  before DML, so reads and SAVEPOINTs of a SQLAlchemy transaction run outside it. Here
  every SQLAlchemy transaction is a transaction of the server, begun with its first
  statement (``Connection.begin(lazy=True)``: no extra round trip), committed or rolled
  back through the driver's ``commit()``/``rollback()`` (the server refuses BEGIN/COMMIT
  statements). So reads are consistent, DDL is transactional, and ``begin_nested()``
  (SAVEPOINT) works. A server transaction idle longer than the daemon's
  ``[sql] idle_timeout`` is rolled back; the next statement then fails with
  ``TransactionLost`` and the pool drops that connection.
* Isolation levels: ``SERIALIZABLE`` (SQLite's, the default) and ``AUTOCOMMIT`` (the
  driver's ``autocommit``: each statement is its own transaction). No PRAGMA is sent:
  ``read_uncommitted`` only matters with a shared cache, which the server does not use,
  and a pragma set by one client would stay on a pooled connection of the server.
* No Python functions on the connection (pysqlite adds ``regexp`` and ``floor``): SQL
  runs in the daemon, so ``regexp_match`` is not available.

URL: ``bastion://USER[:PASSWORD]@HOST[:PORT][,HOST...]/DATABASE[?OPTIONS]``. More hosts
(the driver follows the active node): ``?host=h2:8750&host=h3:8750`` or
``?hosts=h2:8750,h3:8750``; hosts listed with commas in the URL share its port.
Options: ``token_file``, ``tls=1``, ``ca=PATH``, ``timeout``, ``failover_timeout``
(seconds). A token or password can also come through ``connect_args`` (``token=``,
``password=``) or $BASTION_PASSWORD, which keeps it out of the URL.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import exc, util
from sqlalchemy.dialects.sqlite.base import SQLiteDialect

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import IsolationLevel

_OPTIONS = {"host", "hosts", "token_file", "tls", "ca", "timeout", "failover_timeout"}
_DEFAULT_PORT = 8750


def _hostport(host: str, port: int | None) -> str:
    host = host.strip()
    if ":" in host and not host.startswith("["):      # IPv6 literal (SQLAlchemy strips the brackets)
        host = f"[{host}]"
    return f"{host}:{port or _DEFAULT_PORT}"


def _extra_host(h: str) -> str:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` from the query string."""
    h = h.strip()
    if h.startswith("["):
        return h if "]:" in h else f"{h}:{_DEFAULT_PORT}"
    return h if h.count(":") == 1 else _hostport(h, None)


class BastionDialect(SQLiteDialect):
    driver = "bastion"
    supports_statement_cache = True
    returns_native_bytes = True          # the driver returns BLOBs as bytes
    default_paramstyle = "qmark"
    _isolation_lookup = util.immutabledict({"SERIALIZABLE": False, "AUTOCOMMIT": True})

    def __init__(self, **kw: Any) -> None:
        # SQLiteDialect.__init__ reads the SQLite version of the DB-API module, which
        # is sqlite3's; ours is the server's, known once connected (initialize below).
        dbapi = kw.pop("dbapi", None)
        super().__init__(**kw)
        self.dbapi = dbapi

    @classmethod
    def import_dbapi(cls) -> Any:
        import bastion.client
        return bastion.client

    def retrieve_dbapi_version(self, dbapi: Any) -> Any:
        try:
            return util.VersionInfo(tuple(int(p) for p in metadata.version("bastion").split(".")[:3]))
        except (metadata.PackageNotFoundError, ValueError):
            return None

    # -- connecting -------------------------------------------------------------------
    def create_connect_args(self, url: Any) -> Any:
        opts = dict(url.query)
        unknown = sorted(set(opts) - _OPTIONS)
        if unknown:
            raise exc.ArgumentError(f"unknown option {unknown[0]!r} in the Bastion URL; options: "
                                    f"{', '.join(sorted(_OPTIONS))}")

        def last(key: str) -> str | None:
            v = opts.get(key)
            return v[-1] if isinstance(v, tuple) else v

        hosts = [_hostport(h, url.port) for h in (url.host or "").split(",") if h.strip()]
        for key in ("host", "hosts"):
            v = opts.get(key, ())
            for item in [v] if isinstance(v, str) else v:
                hosts += [_extra_host(h) for h in item.split(",") if h.strip()]
        if not hosts:
            raise exc.ArgumentError("the Bastion URL names no host: bastion://USER@HOST:8750/DATABASE")
        if not url.database:
            raise exc.ArgumentError("the Bastion URL names no database: bastion://USER@HOST:8750/DATABASE")
        dsn = f"bastion://{quote(url.username, safe='') + '@' if url.username else ''}" \
              f"{','.join(hosts)}/{quote(url.database, safe='')}"
        kw: dict[str, Any] = {}
        if (last("tls") or "").lower() in ("1", "true", "yes", "on"):
            dsn += "?tls=1"
        if url.password is not None:
            kw["password"] = url.password
        for key in ("token_file", "ca"):
            if last(key):
                kw[key] = last(key)
        for key in ("timeout", "failover_timeout"):
            if last(key) is not None:
                try:
                    kw[key] = float(last(key))       # type: ignore[arg-type]
                except ValueError:
                    raise exc.ArgumentError(f"option {key} of the Bastion URL must be a number of seconds, "
                                            f"not {last(key)!r}") from None
        return [dsn], kw

    def on_connect(self) -> Any:
        return None         # pysqlite's Python functions cannot run in the daemon

    def initialize(self, connection: Any) -> None:
        super().initialize(connection)
        if self.server_version_info and self.server_version_info < (3, 35):
            self.insert_returning = self.update_returning = self.delete_returning = False

    def _get_server_version_info(self, connection: Any) -> tuple[int, ...]:
        v = connection.exec_driver_sql("SELECT sqlite_version()").scalar()
        return tuple(int(p) for p in str(v).split(".") if p.isdigit())

    # -- transactions -----------------------------------------------------------------
    def do_begin(self, dbapi_connection: Any) -> None:
        if not dbapi_connection.autocommit and not dbapi_connection.in_transaction:
            dbapi_connection.begin(lazy=True)

    def get_isolation_level_values(self, dbapi_connection: Any) -> list[IsolationLevel]:
        return ["SERIALIZABLE", "AUTOCOMMIT"]      # the keys of _isolation_lookup

    def get_isolation_level(self, dbapi_connection: Any) -> IsolationLevel:
        return "AUTOCOMMIT" if dbapi_connection.autocommit else "SERIALIZABLE"

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        dbapi_connection.autocommit = self._isolation_lookup[level]

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit)

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        """The pool drops a connection whose server transaction is gone or whose link broke."""
        dbapi = self.loaded_dbapi
        if isinstance(e, (dbapi.TransactionLost, dbapi.OutcomeUnknown)):
            return True
        from .errors import ConnectionClosed, NoActiveNode
        return isinstance(e, (NoActiveNode, ConnectionClosed))


dialect = BastionDialect
