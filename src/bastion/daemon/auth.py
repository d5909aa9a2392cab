"""The admin token: generated into data_dir with mode 0600, read by the CLI."""

from __future__ import annotations

import base64
import hmac
import os
import secrets
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
    (as an HMAC under a key that lives only in this process) for a few minutes."""

    CACHE_SECONDS = 300.0

    def __init__(self, token: str, users: dict) -> None:
        self.token = token
        self.users = users
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, float] = {}
        from ..sql.users import Principal
        self._admin = Principal("admin", admin=True)

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
