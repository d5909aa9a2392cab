"""Dashboard sessions: who logged in, and the CSRF token their forms must carry.

Kept in this process only (a restart logs everyone out, which is the safe default).
The cookie holds a random id, never the admin token or a password; it is HttpOnly
(no script reads it), SameSite=Strict (no other site's page sends it), scoped to
/dashboard, and Secure when the daemon serves TLS. Every POST carries the session's
CSRF token in a form field, checked in constant time, and a browser's Origin header,
when sent, must be this daemon's own."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

COOKIE = "bastion_session"
LOGIN_COOKIE = "bastion_login"     # double-submit token of the login form (login CSRF)
PATH = "/dashboard"


@dataclass
class Session:
    principal: Any               # bastion.sql.users.Principal
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)


class Sessions:
    IDLE = 8 * 3600.0        # a session unused this long is gone
    MAX_AGE = 24 * 3600.0    # and none lives longer than this
    MAX = 1000               # bounded: the oldest go first

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Any) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        s = Session(principal)
        with self._lock:
            self._expire()
            while len(self._by_id) >= self.MAX:
                self._by_id.pop(min(self._by_id, key=lambda k: self._by_id[k].seen))
            self._by_id[sid] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.time()
        with self._lock:
            s = self._by_id.get(sid)
            if s is None:
                return None
            if now - s.seen > self.IDLE or now - s.created > self.MAX_AGE:
                del self._by_id[sid]
                return None
            s.seen = now
            return s

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def _expire(self) -> None:
        now = time.time()
        for k in [k for k, s in self._by_id.items() if now - s.seen > self.IDLE or now - s.created > self.MAX_AGE]:
            del self._by_id[k]


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def cookie_header(name: str, value: str, secure: bool, max_age: int | None = None) -> str:
    parts = [f"{name}={value}", f"Path={PATH}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
