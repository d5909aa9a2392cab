"""The admin API client the CLI uses: it finds the daemon of a config and its token.

A PeerClient (bastion.peer): the same error mapping as every daemon-to-daemon call; only the
words for "no answer" differ, since they speak to the person at the command line."""

from __future__ import annotations

from typing import Any

import httpx

from ..config import Config
from ..errors import BastionError, DaemonUnavailable
from ..peer import DEFAULT, PeerClient, error_from_response
from ..tls import trust, verify_failure
from .auth import read_token


class AdminClient(PeerClient):
    def __init__(self, config: Config, timeout: float | None = 30.0) -> None:
        super().__init__(config.base_url, verify=trust(config.tls_ca or config.tls_cert), timeout=timeout,
                         label=f"the daemon on {config.base_url}", prefix_errors=False)
        self.config = config
        self._token: str | None = None

    def _auth(self) -> dict[str, str]:
        if self._token is None:
            self._token = read_token(self.config.token_file)
        return {"Authorization": f"Bearer {self._token}"}

    def transport_error(self, exc: httpx.HTTPError, path: str) -> BastionError:
        if isinstance(exc, httpx.ConnectError):
            why = verify_failure(exc)
            if why:
                return DaemonUnavailable(
                    f"the daemon at {self.config.base_url} answered, but TLS failed: {why}",
                    hint="set [daemon] tls_ca to the CA certificate that signed tls_cert (or make tls_cert "
                         "the full chain), and check that the certificate names this host")
            return DaemonUnavailable(
                f"no Bastion daemon is listening on {self.config.base_url} (config: {self.config.source})",
                hint="start one with `bastion serve" + (  # the whole command inside the backticks
                    "" if self.config.source == "embedded default" else f" --config {self.config.source}") + "`")
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            return DaemonUnavailable(f"the daemon on {self.config.base_url} closed the connection during "
                                     f"{path} ({exc}): it may have stopped",
                                     hint="check `bastion status`; restart it with `bastion serve`")
        if isinstance(exc, httpx.TimeoutException):
            return DaemonUnavailable(f"the daemon on {self.config.base_url} did not answer {path} in time")
        return super().transport_error(exc, path)

    # the admin API's own signature (a body, the config's timeout) where peer.Client takes **kw
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,  # type: ignore[override]
                timeout: float | str | None = "default") -> Any:
        try:
            headers = self._auth()
        except DaemonUnavailable as exc:
            # No token file: usually no daemon was ever started with this config. Ask the
            # address anyway, so the user hears "no daemon is listening" and how to start one.
            no_token: DaemonUnavailable | None = exc
            headers = {}
        else:
            no_token = None
        _, r = self._send(method, path, json=body, headers=headers,
                          timeout=DEFAULT if isinstance(timeout, str) else timeout)
        if no_token is not None:  # something answers there, but we have no token for it
            raise no_token
        data = self._decode(r, path)
        if r.status_code >= 400:
            raise error_from_response(r.status_code, data)
        return data

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def protect(self, targets: list[str], all_: bool = False) -> dict[str, Any]:
        return self.request("POST", "/v1/protect", {"targets": targets, "all": all_}, timeout=None)

    def startbu(self, targets: list[str], all_: bool = False, max_duration: float | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/contops/start", {"targets": targets, "all": all_,
                                                          "max_duration": max_duration})

    def endbu(self, targets: list[str], all_: bool = False, wait: bool = True) -> dict[str, Any]:
        return self.request("POST", "/v1/contops/end", {"targets": targets, "all": all_, "wait": wait}, timeout=None)

    def recover(self, targets: list[str], all_: bool = False, discard: bool = False) -> dict[str, Any]:
        return self.request("POST", "/v1/recover", {"targets": targets, "all": all_, "discard_changes": discard},
                            timeout=None)

    def backup(self, targets: list[str], all_: bool = False, to: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/backups", {"targets": targets, "all": all_, "to": to}, timeout=None)

    def restore_in_place(self, backup_id: str, repository: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/restore/replace", {"backup": backup_id, "repository": repository},
                            timeout=None)

    def freeze(self, targets: list[str], all_: bool = False, timeout: float | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/freeze", {"targets": targets, "all": all_, "timeout": timeout})

    def thaw(self, targets: list[str], all_: bool = False) -> dict[str, Any]:
        return self.request("POST", "/v1/thaw", {"targets": targets, "all": all_})
