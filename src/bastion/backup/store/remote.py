"""Common machinery of fsspec-backed stores (sftp, s3): options, connections, retries with back-off."""

from __future__ import annotations

import builtins
import random
import threading
import time
import weakref
from typing import Any, TypeVar
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, urlparse

from ...errors import UsageError
from .base import (
    TMP_MARK,
    ObjectMissing,
    Store,
    StoreError,
    StoreUnreachable,
    check_url,
)

T = TypeVar("T")

# Retry budget: a server restart or a network blip of a few seconds is ridden out.
# Before a store has ever reached its server, a refused connection is far more
# likely a wrong URL or a server that is down, so it gets a short budget.
ATTEMPTS = 6
FIRST_CONTACT_ATTEMPTS = 3
FIRST_DELAY = 0.25
MAX_DELAY = 8.0

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0



def _float_option(opts: dict[str, str], key: str, default: float, url: str) -> float:
    try:
        v = float(opts.get(key, default))
        if v <= 0:
            raise ValueError
        return v
    except ValueError:
        raise UsageError(f"{url}: {key} must be a positive number of seconds, not {opts[key]!r}") from None


class _Missing(Exception):
    """Internal: the object (or prefix) is not there. Never retried."""


class RemoteStore(Store):
    """Common machinery of fsspec-backed stores: options, connections, retries."""

    scheme = ""
    options: tuple[str, ...] = ("connect_timeout", "read_timeout")
    per_thread = False    # one connection per thread (SSH) or one shared client (S3)
    root: str             # the repository's path on the server: set by each subclass

    def __init__(self, url: str) -> None:
        check_url(url)
        parsed = urlparse(url)
        self.url = url.rstrip("/") if not parsed.query else url
        try:
            opts = dict(parse_qsl(parsed.query, keep_blank_values=True, strict_parsing=bool(parsed.query)))
        except ValueError:
            raise UsageError(f"{self.url}: cannot parse the options after '?'",
                             hint="write them as ?name=value&name=value") from None
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise UsageError(f"{self.url}: unknown option(s) {', '.join(unknown)}",
                             hint=f"{self.scheme}:// URLs take: {', '.join(self.options)}")
        self.connect_timeout = _float_option(opts, "connect_timeout", CONNECT_TIMEOUT, self.url)
        self.read_timeout = _float_option(opts, "read_timeout", READ_TIMEOUT, self.url)
        self._parse(parsed, opts)
        self._local = threading.local()
        self._shared: Any = None
        self._lock = threading.Lock()
        self._all: list[Any] = []          # every connection opened, for close()
        self._reached = False               # has any call ever reached the server?
        weakref.finalize(self, _close_all, self._all)
        self._call("connecting to", self._probe)

    # -- to be provided by each kind ------------------------------------------------
    def _parse(self, parsed: Any, opts: dict[str, str]) -> None: ...
    def _connect(self) -> Any: ...
    def _probe(self, fs: Any) -> None: ...
    def _classify(self, exc: BaseException, what: str) -> str:
        """Raise a StoreError for a permanent failure; return a short text for a transient one."""
        raise NotImplementedError

    # -- connections ------------------------------------------------------------------
    def _fs(self) -> Any:
        fs = getattr(self._local, "fs", None) if self.per_thread else self._shared
        if fs is None:
            fs = self._connect()
            with self._lock:
                self._all.append(fs)
            if self.per_thread:
                self._local.fs = fs
            else:
                self._shared = fs
        return fs

    def _drop(self) -> None:
        """Forget this thread's connection after a failure: the next attempt reconnects.

        Only for per-thread connections (SSH): a shared HTTP client (S3) reconnects by itself,
        and other threads may be using it."""
        if not self.per_thread:
            return
        fs = getattr(self._local, "fs", None)
        if fs is None:
            return
        self._local.fs = None
        with self._lock:
            if fs in self._all:
                self._all.remove(fs)
        _close_one(fs)

    def close(self) -> None:
        self._local = threading.local()
        self._shared = None
        _close_all(self._all)

    def _call(self, what: str, op: Callable[[Any], T]) -> T:
        attempts = ATTEMPTS if self._reached else FIRST_CONTACT_ATTEMPTS
        delay = FIRST_DELAY
        t0 = time.monotonic()
        for i in range(attempts):
            try:
                out = op(self._fs())
                self._reached = True
                return out
            except (_Missing, StoreError, UsageError):
                raise
            except Exception as exc:  # classified below: permanent ones raise
                problem = self._classify(exc, what)
            self._drop()
            if i == attempts - 1:
                break
            time.sleep(min(delay, MAX_DELAY) * random.uniform(0.5, 1.5))
            delay *= 2
        raise StoreUnreachable(
            f"{what} {self.url}: {problem} (gave up after {attempts} attempts over "
            f"{time.monotonic() - t0:.1f} s)",
            hint="check that the server is up, reachable from this machine (host, port, firewall, "
                 "endpoint) and has room; nothing half-written is ever listed, so the command is safe to rerun")

    # -- the Store interface ---------------------------------------------------------------
    def _p(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def read(self, name: str) -> bytes:
        try:
            return self._call(f"reading {name} from", lambda fs: self._read(fs, self._p(name)))
        except _Missing:
            raise ObjectMissing(f"{self.url}/{name}: missing") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            return self._call(f"reading {name} from", lambda fs: self._read_range(fs, self._p(name), offset, length))
        except _Missing:
            raise ObjectMissing(f"{self.url}/{name}: missing") from None

    def write(self, name: str, data: bytes) -> None:
        self._call(f"writing {name} to", lambda fs: self._write(fs, self._p(name), data))

    def exists(self, name: str) -> bool:
        try:
            self._call(f"checking {name} in", lambda fs: self._stat(fs, self._p(name)))
            return True
        except _Missing:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        # A listing is complete or it is an error: a silently partial listing of manifests
        # would let prune delete chunks that unlisted backups still need.
        try:
            found = self._call(f"listing {prefix} in", lambda fs: self._find(fs, self._p(prefix)))
        except _Missing:
            return iter(())
        base = self.root.rstrip("/") + "/"
        names = (p[len(base):] if p.startswith(base) else p for p in found)
        return iter([n for n in names if TMP_MARK not in n.rsplit("/", 1)[-1]])

    def delete(self, name: str) -> None:
        try:
            self._call(f"deleting {name} from", lambda fs: self._rm(fs, self._p(name)))
        except _Missing:
            pass

    # primitives: raise _Missing when the object is not there
    def _read(self, fs: Any, path: str) -> bytes:
        raise NotImplementedError

    def _read_range(self, fs: Any, path: str, offset: int, length: int) -> bytes:
        return self._read(fs, path)[offset:offset + length]

    def _write(self, fs: Any, path: str, data: bytes) -> None: ...
    def _stat(self, fs: Any, path: str) -> None: ...

    def _find(self, fs: Any, path: str) -> builtins.list[str]:   # `list` here is the method above
        raise NotImplementedError

    def _rm(self, fs: Any, path: str) -> None: ...


def _close_one(fs: Any) -> None:
    try:
        closer = getattr(fs, "_bastion_close", None)
        if closer:
            closer()
    except Exception:  # closing a broken connection may fail; it is gone either way
        pass


def _close_all(conns: list[Any]) -> None:
    while conns:
        _close_one(conns.pop())
