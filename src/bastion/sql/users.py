"""Users of the SQL server and their roles per database.

Passwords are stored in the config only as scrypt hashes (``bastion passwd`` makes
one). The admin token (the daemon's own, in data_dir) is a principal with every
right; configured users get ``read-write`` or ``read-only`` per database, ``"*"``
meaning every database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

READ_WRITE = "read-write"
READ_ONLY = "read-only"
ROLES = (READ_WRITE, READ_ONLY)

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def valid_hash(stored: str) -> bool:
    parts = stored.split("$")
    return len(parts) == 6 and parts[0] == "scrypt"


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    access: dict[str, str] = field(default_factory=dict)     # database name or "*" -> role


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the admin (token) or a configured user."""
    name: str
    admin: bool = False
    access: dict[str, str] = field(default_factory=dict)

    def role(self, database: str) -> str | None:
        if self.admin:
            return READ_WRITE
        return self.access.get(database) or self.access.get("*")
