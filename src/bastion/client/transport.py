"""HTTP to the nodes of a Bastion cluster, finding the active one and following it.

Only a request that provably never reached a server (the TCP connection could not be
made, or the node answered that it is not active) is sent again, to the next host,
with backoff, until ``failover_timeout``. A request that was sent and whose answer
was lost is never replayed: its outcome is unknown and the caller says so.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from ..tls import verify_failure
from .errors import InterfaceError, NoActiveNode, OperationalError, OutcomeUnknown, from_server


class Transport:
    def __init__(self, hosts: list[str], *, scheme: str = "http", auth: httpx.Auth | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0, failover_timeout: float = 30.0,
                 verify: Any = True) -> None:
        if not hosts:
            raise InterfaceError("no host to connect to", hint="bastion://user@host:port/DATABASE")
        self.hosts = hosts
        self.scheme = scheme
        self.failover_timeout = failover_timeout
        # A short connect timeout: a node cut off the network drops packets, and every attempt
        # to reach it would otherwise cost the whole request timeout before moving on.
        self.http = httpx.Client(auth=auth, headers=headers, verify=verify,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)))
        self.current = 0
        self.switches = 0

    def close(self) -> None:
        self.http.close()

    @property
    def host(self) -> str:
        return self.hosts[self.current]

    def _url(self, host: str, path: str) -> str:
        return f"{self.scheme}://{host}{path}"

    def _is_active(self, host: str) -> bool:
        try:
            r = self.http.get(self._url(host, "/v1/health"), timeout=2.0)
            return r.status_code == 200 and r.json().get("role") == "active"
        except httpx.ConnectError as exc:
            self._tls_check(host, exc)
            return False
        except (httpx.HTTPError, ValueError):
            return False

    def _tls_check(self, host: str, exc: Exception) -> None:
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
                r = self.http.post(self._url(self.host, path), json=body or {})
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._tls_check(self.host, exc)
                self.find_active(deadline)      # never reached a server: safe on another one
                continue
            except httpx.TransportError as exc:
                raise OutcomeUnknown(f"the connection to {self.host} broke after the request was sent "
                                     f"({type(exc).__name__}): its outcome is unknown",
                                     hint="check whether it took effect before retrying") from None
            try:
                data = r.json()
            except ValueError:
                raise InterfaceError(f"{self.host} answered HTTP {r.status_code} without JSON: {r.text[:200]}",
                                     hint="is this a Bastion daemon? (scheme http/https, port)") from None
            if r.status_code == 503 and isinstance(data, dict) and \
                    (data.get("error") or {}).get("type") == "NotActive":
                self.find_active(deadline)      # a passive node refuses before doing anything
                continue
            if r.status_code >= 400:
                raise from_server(r.status_code, data)
            return data
