"""A repository in a local directory: durable writes (temp name, fsync, rename, fsync the directory)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator

from ...fsutil import fsync_dir
from .base import (
    TMP_MARK,
    TMP_SAFE_AGE,
    ObjectMissing,
    Store,
    StoreError,
    StoreFull,
    StoreRefused,
    _tmp_name,
    _tmp_removable,
)


def _os_error(exc: OSError, what: str, url: str, size: int | None = None, where: str | None = None) -> StoreError:
    """A local file system's refusal, in words: which side, what, what to do."""
    where = where or url
    code = exc.errno
    detail = exc.strerror or str(exc)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        need = f", {size} bytes needed for this object" if size is not None else ""
        return StoreFull(f"{what} the repository at {url}: no space left on the device{need} ({detail})",
                         hint=f"free space on the file system that holds {where} (df -h), prune old backups "
                              "(bastion prune), or back up to another repository; nothing half-written is listed "
                              "and the next backup or prune removes the temporaries")
    if code in (errno.EACCES, errno.EPERM):
        return StoreRefused(f"{what} the repository at {url}: permission denied ({exc.filename or where}: {detail})",
                            hint=f"give the daemon's user (uid {os.geteuid()}) write access to {where}, "
                                 "or choose another repository")
    if code == errno.EROFS:
        return StoreRefused(f"{what} the repository at {url}: the file system is read-only ({detail})",
                            hint=f"remount {where} read-write, or choose another repository")
    if code == errno.ENOTDIR:
        return StoreRefused(f"{what} the repository at {url}: a path component is a file, not a "
                            f"directory ({exc.filename or where})", hint="check the repository path")
    if code == errno.EIO:
        return StoreError(f"{what} the repository at {url}: input/output error ({detail})",
                          hint=f"the disk under {where} reported an I/O error: check it (dmesg), "
                               "then `bastion verify --all` the repository")
    return StoreError(f"{what} the repository at {url}: {detail} ({type(exc).__name__}, errno {code})",
                      hint=f"check {where}")


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
        except OSError as exc:
            raise _os_error(exc, f"reading {name} from", self.url, where=self.root) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._p(name), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}/{name}: missing") from None
        except OSError as exc:
            raise _os_error(exc, f"reading {name} from", self.url, where=self.root) from None
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _os_error(exc, f"reading {name} from", self.url, where=self.root) from None
        finally:
            os.close(fd)

    def _makedirs(self, d: str) -> None:
        """Create ``d`` and its missing parents 0700 (os.makedirs gives the parents the umask's mode)."""
        if os.path.isdir(d):
            return
        parent = os.path.dirname(d)
        if parent != d:
            self._makedirs(parent)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            return
        os.chmod(d, 0o700)      # the umask may have taken bits away; never added any

    def write(self, name: str, data: bytes) -> None:
        path = self._p(name)
        d = os.path.dirname(path)
        tmp = _tmp_name(path)
        try:
            self._makedirs(d)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(d)
        except OSError as exc:
            try:
                os.remove(tmp)      # a failed write leaves nothing behind (disk full: frees the room)
            except OSError:
                pass
            raise _os_error(exc, f"writing {name} to", self.url, size=len(data), where=self.root) from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._p(name))

    def _walk(self, base: str) -> Iterator[tuple[str, list[str]]]:
        # A listing is complete or it is an error: a directory that cannot be read would hide
        # manifests, and prune would then delete the chunks they need.
        def fail(exc: OSError) -> None:
            raise _os_error(exc, "listing", self.url, where=self.root)
        for dirpath, _, files in os.walk(base, onerror=fail):
            yield dirpath, files

    def temporaries(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        out = []
        for dirpath, files in self._walk(self.root):
            out += [os.path.relpath(os.path.join(dirpath, f), self.root) for f in files if TMP_MARK in f]
        return sorted(out)

    def removable_temporaries(self, safe_age: float = TMP_SAFE_AGE) -> list[str]:
        now = time.time()
        out = []
        for name in self.temporaries():
            try:
                mtime = os.lstat(self._p(name)).st_mtime
            except FileNotFoundError:
                continue        # finished (renamed) or removed meanwhile
            if _tmp_removable(name, mtime, now, safe_age):
                out.append(name)
        return out

    def list(self, prefix: str) -> Iterator[str]:
        base = self._p(prefix)
        if not os.path.isdir(base):
            return iter(())
        return iter([os.path.relpath(os.path.join(dirpath, f), self.root)
                     for dirpath, files in self._walk(base) for f in files if TMP_MARK not in f])

    def delete(self, name: str) -> None:
        try:
            os.remove(self._p(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, f"deleting {name} from", self.url, where=self.root) from None
