"""The HTTP client one daemon (or the CLI) uses to talk to another daemon, with one error policy.

Every call site used to carry its own client (replication shipper -> backup daemon, sync ->
neighbours, a standby rejoining its active, the CLI -> its daemon, the cluster commands),
each with its own idea of what a failure looks like. Here, for all of them:

- timeouts: a default per client, and per call (``timeout=`` seconds, or ``(read, connect)``);
- a transport error (refused, reset, time-out) drops the pooled connections: one kept alive
  across a cut link retransmits with a growing back-off and may stay silent for seconds
  after the link is back, so the next call starts on a fresh connection;
- a TLS failure is told apart from "nobody is listening" (tls.verify_failure), with a hint;
- an HTTP error carrying Bastion's error format comes back as the same BastionError class
  (the errors.py registry), with its hint, details, exit code and HTTP status: callers test
  ``except ReseedNeeded``, never the message;
- bodies: JSON or msgpack out (``json=`` / ``msgpack=`` / raw ``content=``), JSON or msgpack
  back (by Content-Type); ``download`` streams a body into a file.
"""

from __future__ import annotations

import threading
from typing import IO, Any

import httpx

from .errors import AuthError, BastionError, DaemonUnavailable
from .tls import verify_failure

Timeout = float | None | tuple[float, float] | httpx.Timeout
DEFAULT: Any = object()


def _timeout(t: Timeout) -> httpx.Timeout:
    if isinstance(t, httpx.Timeout):
        return t
    if isinstance(t, tuple):
        return httpx.Timeout(t[0], connect=t[1])
    return httpx.Timeout(t)


def error_from_response(status: int, body: Any, where: str = "") -> BastionError:
    """The BastionError an HTTP error answer stands for: its registered class when the body is
    Bastion's error format ({"error": {"type", "message", "hint", ...}}), else a plain one."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        e = BastionError.from_dict(err)
        if e.http_status != status:
            e.http_status = status      # e.g. from_os_error's 507: the answer's status is the truth
        if where:
            e.message = f"{where}: {e.message}"
        return e
    if status == 401:
        return AuthError(f"{where or 'the daemon'} refused the token")
    return BastionError(f"{where or 'the daemon'} answered {status}: {str(body)[:300]}")


class PeerClient:
    """A pooled client to one daemon at ``base_url``.

    ``label`` names the other side in messages ("backup daemon https://b:8750", "site paris");
    ``hint`` is what to do when it cannot be reached; ``tls_hint`` when its certificate is not
    trusted. Safe to share between threads."""

    def __init__(self, base_url: str, *, token: str | None = None, verify: Any = True, timeout: Timeout = 60.0,
                 label: str | None = None, hint: str | None = None, tls_hint: str | None = None,
                 prefix_errors: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label or base_url
        self.hint, self.tls_hint = hint, tls_hint
        self.prefix_errors = prefix_errors
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._verify = verify
        self._timeout = _timeout(timeout)
        self._lock = threading.Lock()
        self._http = self._new()

    def _new(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self._verify, timeout=self._timeout,
                            headers=self._headers)

    def close(self) -> None:
        with self._lock:
            self._http.close()

    def _drop(self, used: httpx.Client) -> None:
        with self._lock:
            if self._http is used:      # another thread may have replaced it already
                self._http = self._new()
        used.close()

    # -- the one policy ---------------------------------------------------------------------
    def transport_error(self, exc: httpx.HTTPError, path: str) -> BastionError:
        """The request got no answer (refused, reset, time-out, TLS): in words, with a hint."""
        why = verify_failure(exc)
        if why:
            return DaemonUnavailable(f"{self.label}: TLS failed: {why}", hint=self.tls_hint,
                                     details={"transport": "tls"})
        return DaemonUnavailable(f"{self.label} unreachable ({path}): {type(exc).__name__}: {exc}",
                                 hint=self.hint, details={"transport": type(exc).__name__})

    def _send(self, method: str, path: str, *, json: Any = None, msgpack: Any = None, content: Any = None,
              params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
              timeout: Timeout = DEFAULT, stream: bool = False) -> tuple[httpx.Client, httpx.Response]:
        hdrs = dict(headers or {})
        if msgpack is not None:
            import msgpack as mp
            content = mp.packb(msgpack, use_bin_type=True)
            hdrs["Content-Type"] = "application/msgpack"
        http = self._http
        kw: dict[str, Any] = {"json": json, "content": content, "params": params, "headers": hdrs}
        if timeout is not DEFAULT:
            kw["timeout"] = _timeout(timeout)
        try:
            if stream:
                req = http.build_request(method, path, **kw)
                return http, http.send(req, stream=True)
            return http, http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self._drop(http)
            raise self.transport_error(exc, path) from None

    def _decode(self, r: httpx.Response, path: str) -> Any:
        ctype = r.headers.get("content-type", "")
        try:
            if ctype.startswith("application/msgpack"):
                import msgpack as mp
                return mp.unpackb(r.content, raw=False)
            return r.json()
        except ValueError:
            if r.status_code >= 400:
                return r.text
            raise BastionError(f"{self.label} answered {r.status_code} to {path} with something that is not "
                               "JSON") from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One call; the decoded answer, or the BastionError it stands for."""
        _, r = self._send(method, path, **kw)
        data = self._decode(r, path)
        if r.status_code >= 400:
            raise error_from_response(r.status_code, data, self.label if self.prefix_errors else "")
        return data

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def download(self, method: str, path: str, fh: IO[bytes], **kw: Any) -> int:
        """Stream the answer's body into ``fh``; the number of bytes."""
        http, r = self._send(method, path, stream=True, **kw)
        try:
            if r.status_code >= 400:
                r.read()
                raise error_from_response(r.status_code, self._decode(r, path),
                                          self.label if self.prefix_errors else "")
            n = 0
            try:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
                    n += len(chunk)
            except httpx.HTTPError as exc:
                self._drop(http)
                raise self.transport_error(exc, path) from None
            return n
        finally:
            r.close()
