"""The admin token: generated into data_dir with mode 0600, read by the CLI."""

from __future__ import annotations

import hmac
import os
import secrets

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
    os.replace(tmp, path)
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
