"""HTTP to the nodes of a Bastion cluster, finding the active one and following it.

Only a request that provably never reached a server (the TCP connection could not be
made, or the node answered that it is not active) is sent again, to the next host,
with backoff, until ``failover_timeout``. A request that was sent and whose answer
was lost is never replayed: its outcome is unknown and the caller says so.

The HTTP itself is a minimal HTTP/1.1 client on one keep-alive socket: a point query is
a round trip of a few hundred bytes, and a general HTTP library (headers objects, auth
flows, cookies, pools) cost more per request than the server spent answering. It speaks
only what the daemon answers: Content-Length or chunked bodies, JSON.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from ..tls import verify_failure
from .errors import InterfaceError, NoActiveNode, OperationalError, OutcomeUnknown, from_server


class _Unreached(Exception):
    """The request never reached the server (no connection could be made): safe to send elsewhere."""


class _Lost(Exception):
    """The connection broke after (part of) the request was sent: its outcome is unknown."""


class _Conn:
    """One keep-alive HTTP/1.1 connection to host:port."""

    def __init__(self, host: str, tls: ssl.SSLContext | None, connect_timeout: float) -> None:
        u = urlsplit(f"//{host}")
        self.addr = (u.hostname or host, u.port or (443 if tls else 80))
        self.host, self.tls, self.connect_timeout = host, tls, connect_timeout
        self.sock: socket.socket | None = None
        self.rfile: Any = None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def _usable(self) -> bool:
        # an idle keep-alive connection that is readable has been closed by the server (or holds
        # garbage): a request sent on it might never be read, so open a new one instead
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self.addr, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.addr[0])
                sock.settimeout(self.connect_timeout)
        except OSError as exc:      # ssl.SSLError is an OSError too
            raise _Unreached(f"{type(exc).__name__}: {exc}") from exc
        self.sock, self.rfile = sock, sock.makefile("rb")

    def request(self, method: str, path: str, body: bytes | None, headers: bytes, timeout: float) -> tuple[int, bytes]:
        if not self._usable():
            self.close()
            self._connect()
        assert self.sock is not None
        self.sock.settimeout(timeout)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (method.encode(), path.encode(), self.host.encode(), headers)
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        try:
            self.sock.sendall(head + b"\r\n" + (body or b""))
            return self._response()
        except (OSError, ValueError, _Lost) as exc:
            self.close()
            raise _Lost(f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Lost) else str(exc)) from exc

    def _response(self) -> tuple[int, bytes]:
        rf = self.rfile
        line = rf.readline(65537)
        if not line:
            raise _Lost("the server closed the connection without answering")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _Lost(f"not an HTTP answer: {line[:80]!r}")
        status = int(parts[1])
        length, chunked, close = None, False, False
        while True:
            h = rf.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding":
                chunked = b"chunked" in v.lower()
            elif k == b"connection":
                close = b"close" in v.lower()
        if chunked:
            out = []
            while True:
                size = int(rf.readline(1024).split(b";")[0], 16)
                if size == 0:
                    while rf.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out.append(rf.read(size))
                rf.readline(3)
            data = b"".join(out)
        elif length is not None:
            data = rf.read(length)
            if len(data) < length:
                raise _Lost("the answer was cut short")
        else:                   # no length: the body runs to the end of the connection
            data, close = rf.read(), True
        if close:
            self.close()
        return status, data


class Transport:
    def __init__(self, hosts: list[str], *, scheme: str = "http", headers: dict[str, str] | None = None,
                 timeout: float = 30.0, failover_timeout: float = 30.0, verify: Any = True) -> None:
        if not hosts:
            raise InterfaceError("no host to connect to", hint="bastion://user@host:port/DATABASE")
        self.hosts = hosts
        self.scheme = scheme
        self.timeout = timeout
        self.failover_timeout = failover_timeout
        self._tls: ssl.SSLContext | None = None
        if scheme == "https":
            self._tls = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
        self._headers = b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                                 for k, v in (headers or {}).items())
        self._conns: dict[str, _Conn] = {}
        self.current = 0
        self.switches = 0

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    @property
    def host(self) -> str:
        return self.hosts[self.current]

    def _request(self, host: str, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        conn = self._conns.get(host)
        if conn is None:
            # a short connect timeout: a node cut off the network drops packets, and every attempt to
            # reach it would otherwise cost the whole request timeout before moving on
            conn = self._conns[host] = _Conn(host, self._tls, min(self.timeout, 3.0))
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        return conn.request(method, path, data, self._headers, timeout)

    def _is_active(self, host: str) -> bool:
        try:
            status, data = self._request(host, "GET", "/v1/health", None, 2.0)
            return status == 200 and json.loads(data).get("role") == "active"
        except _Unreached as exc:
            self._tls_check(host, exc)
            return False
        except (_Lost, ValueError, AttributeError):
            return False

    def _tls_check(self, host: str, exc: BaseException) -> None:
        # A certificate nobody trusts will not get better by waiting for another node.
        why = verify_failure(exc)
        if why:
            raise OperationalError(f"TLS with {host} failed: {why}",
                                   hint="pass ca=PATH (the CA certificate that signed the daemon's tls_cert), "
                                        "and connect by a name the certificate holds") from None

    def find_active(self, deadline: float | None = None) -> str:
        """Try every host in turn (starting with the current one), with backoff."""
        deadline = deadline or time.monotonic() + self.failover_timeout
        delay = 0.05
        while True:
            for i in range(len(self.hosts)):
                idx = (self.current + i) % len(self.hosts)
                if self._is_active(self.hosts[idx]):
                    if idx != self.current:
                        self.switches += 1
                    self.current = idx
                    return self.hosts[idx]
            if time.monotonic() + delay > deadline:
                raise NoActiveNode(f"no active Bastion node among {', '.join(self.hosts)} "
                                   f"after {self.failover_timeout:g} s",
                                   hint="are the daemons running and reachable? (bastion status on each)")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + self.failover_timeout
        while True:
            try:
                status, raw = self._request(self.host, "POST", path, body or {}, self.timeout)
            except _Unreached as exc:
                self._tls_check(self.host, exc)
                self.find_active(deadline)      # never reached a server: safe on another one
                continue
            except _Lost as exc:
                raise OutcomeUnknown(f"the connection to {self.host} broke after the request was sent "
                                     f"({exc}): its outcome is unknown",
                                     hint="check whether it took effect before retrying") from None
            try:
                data = json.loads(raw)
            except ValueError:
                raise InterfaceError(f"{self.host} answered HTTP {status} without JSON: "
                                     f"{raw[:200].decode('utf-8', 'replace')}",
                                     hint="is this a Bastion daemon? (scheme http/https, port)") from None
            if status == 503 and isinstance(data, dict) and \
                    (data.get("error") or {}).get("type") == "NotActive":
                self.find_active(deadline)      # a passive node refuses before doing anything
                continue
            if status >= 400:
                raise from_server(status, data)
            return data
