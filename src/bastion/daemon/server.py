"""`bastion serve`: one daemon per data_dir, on the configured address."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, cast

import uvicorn

from ..config import Config
from ..errors import ConfigError, NotActive, StateConflict
from .app import create_app
from .core import Daemon, protection, summary

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..cluster.node import ClusterNode


def _lock_data_dir(config: Config) -> int:
    """One daemon per data_dir: an flock on a plain file (not a database file)."""
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.join(config.data_dir, "daemon.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").split()
            os.close(fd)
            raise StateConflict(f"another bastion daemon (pid {pid[0] if pid else '?'}) is already running "
                                f"with data_dir {config.data_dir}",
                                hint="stop it first, or use another data_dir") from None
        # A daemon that stops removes the file: the flock may be on a name that is gone.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlock_data_dir(config: Config, fd: int) -> None:
    """Remove daemon.lock while still holding it (a start waiting on it re-checks the name)."""
    try:
        os.unlink(os.path.join(config.data_dir, "daemon.lock"))
    except FileNotFoundError:
        pass
    os.close(fd)


class _Created:
    """What a start creates in its data_dir, so that a refused start removes it again.
    Taken once daemon.lock is held: nothing else may have made these files meanwhile."""

    def __init__(self, config: Config, dir_existed: bool) -> None:
        d = config.data_dir
        state = os.path.join(d, "state.db")
        self.files = [config.token_file, state, state + "-wal", state + "-shm", state + "-journal"]
        self.existed = {p for p in self.files if os.path.lexists(p)}
        self.dirs = [] if dir_existed else [d]

    def remove(self) -> None:
        for p in self.files:
            if p not in self.existed:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        for d in self.dirs:
            try:
                os.rmdir(d)           # only when empty: never anything this start did not make
            except OSError:
                pass


def _bind(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the proto
    # says TCP; without it Nagle + delayed ACK added ~40 ms to every API call.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.listen_host, config.listen_port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on {config.listen}: the address is already in use",
                              hint="another daemon or program uses this port; "
                                   "set [daemon] listen in the config") from None
        raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _warn_plaintext(config: Config) -> None:
    from .auth import plaintext_warning
    warning = plaintext_warning(config.listen_host, bool(config.tls_cert))
    if warning:
        logging.getLogger("bastion").warning(warning)
        print(f"bastion: {warning}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    # uvicorn handles SIGTERM while it serves, then raises it again once it has stopped;
    # with the default action that would kill the process before daemon.close() runs.
    raise SystemExit(0)


class _RequestsAtDebug(logging.Filter):
    """httpx logs every request it makes at INFO: a replicating primary, a syncing site or a
    standby would write a line per peer request (hundreds a second). They are DEBUG here:
    INFO stays for what an operator needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in ("httpx", "httpcore") and record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(log_level: str) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestsAtDebug())


def serve(config: Config, log_level: str = "info") -> None:
    setup_logging(log_level)
    signal.signal(signal.SIGTERM, _terminate)
    if config.cluster:
        return _serve_cluster_node(config)
    dir_existed = os.path.isdir(config.data_dir)
    lock_fd = _lock_data_dir(config)
    created = _Created(config, dir_existed)
    sock = None
    try:
        sock = _bind(config)
        daemon = Daemon(config)
        daemon.open()
    except BaseException:
        # refused (port in use, a bad config found while opening): leave the data_dir as found
        if sock is not None:
            sock.close()
        _unlock_data_dir(config, lock_fd)
        created.remove()
        raise
    app = create_app(daemon)
    files = list(daemon.catalog.files.values())
    _warn_plaintext(config)
    print(f"bastion: serving on {config.base_url} (config: {config.source}; data: {config.data_dir}; "
          f"{summary(files)})", file=sys.stderr, flush=True)
    if any(protection(f)[0] != "protected" for f in files):
        print("bastion: see `bastion status` for what to do about the files not protected",
              file=sys.stderr, flush=True)
    try:
        _uvicorn(config, app).run(sockets=[sock])
    finally:
        daemon.close()
        _unlock_data_dir(config, lock_fd)
        print("bastion: stopped", file=sys.stderr, flush=True)


def _uvicorn(config: Config, app: FastAPI) -> uvicorn.Server:
    # access_log off: request lines would carry transaction ids; credentials never travel in URLs
    # uvloop and httptools (uvicorn[standard]) roughly halve the cost of each request
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                         loop="auto", http="auto",
                                         ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key))


class ActiveDaemon:
    """What the routes call on a cluster node: the open Daemon while the node is active."""

    def __init__(self, node: ClusterNode, token: str) -> None:
        self._node, self.token, self.config = node, token, node.config

    def __getattr__(self, name: str) -> Any:
        if name == "replication":      # peer requests: the active's shippers or a standby's receiver
            return self._node.replication()
        d = self._node.daemon
        if d is None or self._node.role != "active":
            raise NotActive(f"node {self._node.name} is {self._node.role}", hint=self._node.active_hint())
        return getattr(d, name)


def _serve_cluster_node(config: Config) -> None:
    assert config.cluster is not None     # serve() calls it for a config with a [cluster] section
    from ..cluster.node import ClusterNode
    from .auth import ensure_token

    def open_daemon(cfg: Config) -> Daemon:     # replicated mode: the config of the node's role
        d = Daemon(cfg, guard=node.guard, renewed_after=node.renewed_after)
        d.open()
        return d

    # The data_dir and its token are shared with the other nodes: a refused start leaves them.
    # It takes no daemon.lock here (only the active node holds it).
    os.makedirs(config.data_dir, exist_ok=True)
    token = ensure_token(config.token_file)
    sock = _bind(config)
    try:
        node = ClusterNode(config, open_daemon)
    except BaseException:
        sock.close()
        raise
    # the routes see the open Daemon through ActiveDaemon's __getattr__, hence the cast
    app = create_app(cast(Daemon, ActiveDaemon(node, token)), node=node)
    _warn_plaintext(config)
    print(f"bastion: node {node.name} listening on {config.base_url} (config: {config.source}; data: "
          f"{config.data_dir}; lease: {config.cluster.lease}, ttl {node.ttl:g} s); passive until it "
          "holds the lease", file=sys.stderr, flush=True)
    node.start()
    try:
        _uvicorn(config, app).run(sockets=[sock])
    finally:
        node.stop()
        print("bastion: stopped", file=sys.stderr, flush=True)
