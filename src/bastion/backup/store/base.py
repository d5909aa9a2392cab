"""The storage interface, its errors, URL checking and the temporaries rule (see the package docstring)."""

from __future__ import annotations

import builtins
import os
import random
import socket
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlparse

from ...errors import ObjectMissing, StoreError, StoreFull, StoreRefused, StoreUnreachable, UsageError  # noqa: F401 - the store errors live in errors.py; imported from here too

TMP_MARK = ".tmp-"
# A temporary older than this is removed whoever wrote it: no single object write takes a day
# (a 256 KiB chunk, a manifest). Younger ones only if their writer, on this host, is dead.
TMP_SAFE_AGE = 86400.0

# What a repository URL may be: scheme -> the options its query string may carry.
SCHEMES: dict[str, tuple[str, ...]] = {
    "file": (),
    "sftp": ("connect_timeout", "read_timeout", "key_filename", "known_hosts"),
    "s3": ("connect_timeout", "read_timeout", "endpoint_url", "region", "profile"),
}
ALIASES = {"ssh": "sftp", "s3a": "s3"}
SUPPORTED = "file:///absolute/path (or a plain path), sftp://[user@]host[:port]/path, s3://bucket[/prefix]"


def check_url(url: object) -> str:
    """``url`` if it names a supported repository with known options, else UsageError.

    Only looks at the text (no connection): the CLI, the config loader and open_store
    all use it, so a mistyped URL is refused before anything is written anywhere."""
    if not isinstance(url, str) or not url.strip():
        raise UsageError("the repository URL is empty", hint=f"supported: {SUPPORTED}")
    if "://" not in url:
        if "?" in url:
            raise UsageError(f"repository {url!r}: a plain path takes no options",
                             hint="remove the '?...' part (file:// URLs and paths have no options)")
        return url      # a plain path: a local directory
    parsed = urlparse(url)
    scheme = ALIASES.get(parsed.scheme.lower(), parsed.scheme.lower())
    if scheme not in SCHEMES:
        raise UsageError(f"repository {_redact(url)}: unsupported scheme {parsed.scheme + '://'!r}",
                         hint=f"supported: {SUPPORTED}; nothing was written")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            # file://backups/x would otherwise silently mean the directory /x (or the current one)
            raise UsageError(f"repository {url}: a file:// URL needs an absolute path (file:///dir), "
                             f"got host {parsed.netloc!r}",
                             hint=f"write file:///{parsed.netloc}{parsed.path} or a plain path")
        if not parsed.path.startswith("/"):
            raise UsageError(f"repository {url}: no directory", hint="file:///absolute/path")
    if parsed.query or url.endswith("?"):
        try:
            opts = dict(parse_qsl(parsed.query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise UsageError(f"repository {_redact(url)}: cannot parse the options after '?'",
                             hint="write them as ?name=value&name=value") from None
        unknown = sorted(set(opts) - set(SCHEMES[scheme]))
        if unknown:
            takes = ", ".join(SCHEMES[scheme]) or "no options"
            raise UsageError(f"repository {_redact(url)}: unknown option(s) {', '.join(unknown)}",
                             hint=f"{scheme}:// URLs take: {takes}")
    return url


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)


class Store:
    """The interface every store implements (file, sftp, s3). `list` is one of its methods, so
    the annotations below name the builtin as builtins.list."""
    url: str

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of an object (fewer at its end); stores that cannot read
        part of an object read it whole (format-2 readers then keep a few whole packs)."""
        return self.read(name)[offset:offset + length]

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[str]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def temporaries(self) -> builtins.list[str]:
        """Half-written objects left by a crash (only stores that write through temp names have any)."""
        return []

    def removable_temporaries(self, safe_age: float = TMP_SAFE_AGE) -> builtins.list[str]:
        """The temporaries no live process can still be writing (see _tmp_removable)."""
        return []

    def close(self) -> None:
        """Drop connections now (they are also dropped when the store is garbage-collected)."""


_HOST = socket.gethostname()


def _tmp_name(path: str) -> str:
    # the writer's pid and host ride in the name: a later backup or prune can tell a dead writer's
    # leftovers from an upload still in flight
    return f"{path}{TMP_MARK}{os.getpid()}-{random.getrandbits(32):08x}@{_HOST}"


def _tmp_removable(name: str, mtime: float | None, now: float, safe_age: float = TMP_SAFE_AGE) -> bool:
    """No live process can still be writing this temporary: it is older than ``safe_age``, or its
    name says it was written on this host by a process that no longer exists."""
    if mtime is not None and now - mtime > safe_age:
        return True
    tail = name.rsplit("/", 1)[-1].split(TMP_MARK, 1)[-1]
    owner, _, host = tail.partition("@")
    if host != _HOST:
        return False        # another host's writer (or an older name without one): only age tells
    try:
        pid = int(owner.split("-", 1)[0])
    except ValueError:
        return False
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
