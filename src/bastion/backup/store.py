"""Where backups live: a tiny storage interface that speaks in files.

A store lists, reads, writes and deletes named objects under one root. Local
directories (``file://`` or a plain path) get durable writes (temp name, fsync,
rename, fsync the directory); every other URL scheme fsspec knows (``sftp://``,
``s3://``, ``memory://``) goes through fsspec, whose object writes are atomic
on completion.
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

from ..errors import BastionError, UsageError

T = TypeVar("T")


class StoreError(BastionError):
    """A storage operation failed (after retries, when it looked transient)."""


class ObjectMissing(StoreError):
    pass


class Store:
    url: str

    def read(self, name: str) -> bytes: ...
    def write(self, name: str, data: bytes) -> None: ...
    def exists(self, name: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...

    def temporaries(self) -> list[str]:
        """Half-written objects left by a crash (only stores that write through temp names have any)."""
        return []


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root

    def _p(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> bytes:
        try:
            with open(self._p(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}/{name}: missing") from None

    def write(self, name: str, data: bytes) -> None:
        path = self._p(name)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._p(name))

    def temporaries(self) -> list[str]:
        out = []
        for dirpath, _, files in os.walk(self.root):
            out += [os.path.relpath(os.path.join(dirpath, f), self.root) for f in files if ".tmp-" in f]
        return out

    def list(self, prefix: str) -> Iterator[str]:
        base = self._p(prefix)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if ".tmp-" in f:
                    continue
                yield os.path.relpath(os.path.join(dirpath, f), self.root)

    def delete(self, name: str) -> None:
        try:
            os.remove(self._p(name))
        except FileNotFoundError:
            pass


def retry(op: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Retry what looks transient (connection trouble, time-outs) with jittered back-off."""
    delay = 0.1
    for i in range(attempts):
        try:
            return op()
        except (ObjectMissing, UsageError):
            raise
        except (ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)) or i == attempts - 1:
                raise StoreError(f"{what}: {exc}") from None
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2
    raise AssertionError("unreachable")


class FsspecStore(Store):
    def __init__(self, url: str) -> None:
        import fsspec
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"cannot use backup target {url}: {exc}",
                             hint="supported: file://, sftp:// (paramiko), s3:// (s3fs)") from None

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes:
        def op() -> bytes:
            try:
                return self.fs.cat_file(self._p(name))
            except FileNotFoundError:
                raise ObjectMissing(f"{self.url}/{name}: missing") from None
        return retry(op, f"reading {self.url}/{name}")

    def write(self, name: str, data: bytes) -> None:
        retry(lambda: self.fs.pipe_file(self._p(name), data), f"writing {self.url}/{name}")

    def exists(self, name: str) -> bool:
        return retry(lambda: self.fs.exists(self._p(name)), f"checking {self.url}/{name}")

    def list(self, prefix: str) -> Iterator[str]:
        try:
            found = retry(lambda: self.fs.find(self._p(prefix)), f"listing {self.url}/{prefix}")
        except StoreError:
            return iter(())
        root = self.root.rstrip("/") + "/"
        return iter(p[len(root):] if p.startswith(root) else p for p in found)

    def delete(self, name: str) -> None:
        try:
            retry(lambda: self.fs.rm_file(self._p(name)), f"deleting {self.url}/{name}")
        except StoreError:
            pass


def open_store(url: str) -> Store:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme else url)
    return FsspecStore(url)
