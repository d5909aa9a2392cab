"""`bastion serve`: one daemon per data_dir, on the configured address."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import uvicorn

from ..config import Config
from ..errors import BastionError, ConfigError, NotActive, StateConflict
from .app import create_app
from .core import Daemon

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode


def _lock_data_dir(config: Config) -> int:
    """One daemon per data_dir: an flock on a plain file (not a database file)."""
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.join(config.data_dir, "daemon.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateConflict(f"another bastion daemon (pid {pid}) is already running with data_dir "
                            f"{config.data_dir}", hint="stop it first, or use another data_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
                              hint="another daemon or program uses this port; set [daemon] listen in the config") from None
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


def serve(config: Config, log_level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    if config.cluster:
        return _serve_cluster_node(config)
    lock_fd = _lock_data_dir(config)
    sock = _bind(config)
    daemon = Daemon(config)
    try:
        daemon.open()
    except BastionError:
        sock.close()
        raise
    app = create_app(daemon)
    _warn_plaintext(config)
    print(f"bastion: serving on {config.base_url} (config: {config.source}; data: {config.data_dir}; "
          f"{len(daemon.catalog.files)} file(s) protected)", file=sys.stderr, flush=True)
    try:
        _uvicorn(config, app).run(sockets=[sock])
    finally:
        daemon.close()
        os.close(lock_fd)
        print("bastion: stopped", file=sys.stderr, flush=True)


def _uvicorn(config: Config, app: object) -> uvicorn.Server:
    # access_log off: request lines would carry transaction ids; credentials never travel in URLs
    # uvloop and httptools (uvicorn[standard]) roughly halve the cost of each request
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                         loop="auto", http="auto",
                                         ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key))


class ActiveDaemon:
    """What the routes call on a cluster node: the open Daemon while the node is active."""

    def __init__(self, node: "ClusterNode", token: str) -> None:
        self._node, self.token, self.config = node, token, node.config

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name == "replication":      # peer requests: the active's shippers or a standby's receiver
            return self._node.replication()
        d = self._node.daemon
        if d is None or self._node.role != "active":
            raise NotActive(f"node {self._node.name} is {self._node.role}", hint="ask the active node")
        return getattr(d, name)


def _serve_cluster_node(config: Config) -> None:
    from ..cluster.node import ClusterNode
    from .auth import ensure_token
    os.makedirs(config.data_dir, exist_ok=True)
    token = ensure_token(config.token_file)
    sock = _bind(config)

    def open_daemon(cfg: Config) -> Daemon:     # replicated mode: the config of the node's role
        d = Daemon(cfg, guard=node.guard, renewed_after=node.renewed_after)
        d.open()
        return d

    node = ClusterNode(config, open_daemon)
    app = create_app(ActiveDaemon(node, token), node=node)
    _warn_plaintext(config)
    print(f"bastion: node {node.name} listening on {config.base_url} (config: {config.source}; data: "
          f"{config.data_dir}; lease: {config.cluster['lease']}, ttl {node.ttl:g} s); passive until it "
          "holds the lease", file=sys.stderr, flush=True)
    node.start()
    try:
        _uvicorn(config, app).run(sockets=[sock])
    finally:
        node.stop()
        print("bastion: stopped", file=sys.stderr, flush=True)
