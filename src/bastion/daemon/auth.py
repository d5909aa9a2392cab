"""The admin token: generated into data_dir with mode 0600, read by the CLI."""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import threading
import time

from ..errors import AuthError, DaemonUnavailable


def ensure_token(path: str) -> str:
    """Return the token at ``path``, creating it (mode 0600, written durably) if missing."""
    try:
        with open(path, encoding="ascii") as fh:
            token = fh.read().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)      # never replaces: two daemons starting at once agree on one token
    except FileExistsError:
        with open(path, encoding="ascii") as fh:
            existing = fh.read().strip()
        if existing:
            token = existing
        else:
            os.replace(tmp, path)
            return token
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return token


def read_token(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            token = fh.read().strip()
    except FileNotFoundError:
        raise DaemonUnavailable(f"no admin token at {path}: no daemon has run with this config",
                                hint="start one with `bastion serve` (same --config)") from None
    except PermissionError:
        raise AuthError(f"cannot read the admin token {path}: permission denied",
                        hint="run the command as the user that runs the daemon") from None
    if not token:
        raise AuthError(f"the admin token {path} is empty", hint="restart the daemon to generate a new one")
    return token


def token_matches(expected: str, header: str | None) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), expected.encode())


class Authenticator:
    """Who sent a request: the admin token (Bearer) or a configured user (HTTP Basic).

    scrypt costs tens of milliseconds by design, so a verified password is remembered
    (as an HMAC under a key that lives only in this process) for a few minutes.

    Against guessing: an unknown user name costs the same scrypt as a known one (a dummy
    hash), so answers do not tell which names exist; and failures are counted per client
    address and user name, and per client address: past the limit, that client is refused
    (HTTP 429) without any hashing until the window has passed."""

    CACHE_SECONDS = 300.0
    WINDOW = 60.0              # seconds over which failures are counted
    MAX_PER_USER = 5           # failures of one client for one user name
    MAX_PER_CLIENT = 20        # failures of one client, all names together

    def __init__(self, token: str, users: dict) -> None:
        from ..sql.users import Principal, hash_password
        self.token = token
        self.users = users
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, float] = {}
        self._admin = Principal("admin", admin=True)
        self._dummy = hash_password(secrets.token_urlsafe(16))   # verified for unknown names
        self._failures: dict[tuple[str, str | None], list[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str, name: str) -> float:
        """Seconds this client must wait before trying ``name`` again (0: it may try now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key, limit in (((client, name), self.MAX_PER_USER), ((client, None), self.MAX_PER_CLIENT)):
                times = [t for t in self._failures.get(key, []) if now - t < self.WINDOW]
                if times:
                    self._failures[key] = times
                else:
                    self._failures.pop(key, None)
                if len(times) >= limit:
                    wait = max(wait, self.WINDOW - (now - times[0]))
        return wait

    def _failed(self, client: str, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:       # bounded memory under a flood of names
                self._failures.clear()
            for key in ((client, name), (client, None)):
                self._failures.setdefault(key, []).append(now)

    def login(self, header: str, client: str):  # -> tuple[Principal | None, float]
        """Verify HTTP Basic credentials (scrypt): (principal or None, seconds to wait if refused)."""
        name = _basic_name(header)
        if name is None:
            return None, 0.0
        wait = self.retry_after(client, name)
        if wait > 0:
            return None, wait
        principal = self.principal(header)
        if principal is None:
            self._failed(client, name)
        return principal, 0.0

    def cached(self, header: str | None):  # -> Principal | None
        """The admin, or a user whose password was verified recently: no scrypt needed."""
        if not header:
            return None
        if header.startswith("Bearer "):
            return self._admin if token_matches(self.token, header) else None
        return self.principal(header, verify=False)

    def principal(self, header: str | None, verify: bool = True):  # -> Principal | None
        from ..sql.users import Principal, check_password
        if not header:
            return None
        if header.startswith("Bearer "):
            return self._admin if token_matches(self.token, header) else None
        if not header.startswith("Basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        user = self.users.get(name)
        if user is None:
            if verify:      # the same cost as a known name: answers do not reveal which exist
                check_password(password, self._dummy)
            return None
        mac = hmac.new(self._key, f"{name}\0{password}\0{user.password_hash}".encode(), "sha256").digest()
        now = time.monotonic()
        if self._ok.get(mac, 0) < now:
            if not verify or not check_password(password, user.password_hash):
                return None
            if len(self._ok) > 10000:
                self._ok.clear()
            self._ok[mac] = now + self.CACHE_SECONDS
        return Principal(name, access=dict(user.access))


def _basic_name(header: str) -> str | None:
    try:
        return base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        return None


def plaintext_warning(host: str, tls: bool) -> str | None:
    """The warning for a listen address that other machines can reach without TLS:
    passwords and the admin token would cross the network in clear."""
    import ipaddress
    if tls:
        return None
    name = host.strip("[]")
    try:
        if ipaddress.ip_address(name).is_loopback:
            return None
    except ValueError:
        if name == "localhost":
            return None
    return (f"WARNING: listening on {host} WITHOUT TLS: passwords, the admin token and all data cross the "
            "network in clear text. Set [daemon] tls_cert and tls_key, or listen on 127.0.0.1.")
