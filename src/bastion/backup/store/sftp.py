"""sftp:// repositories: fsspec's SFTP file system (paramiko), known_hosts checking, server-side fsync and rename."""

from __future__ import annotations

import errno
import functools
import getpass
import logging
import os
import posixpath
import socket
import time
from typing import Any
from urllib.parse import unquote

from ...errors import UsageError
from .base import (
    TMP_MARK,
    TMP_SAFE_AGE,
    StoreError,
    StoreRefused,
    _tmp_name,
    _tmp_removable,
)
from .remote import RemoteStore, _Missing

# ----------------------------------------------------------------------------------------------
# SFTP


@functools.cache
def _sftp_classes() -> tuple[Any, Any]:
    """fsspec's SFTP file system, with our own connect: known_hosts checking and time-outs."""
    try:
        import paramiko
        from fsspec.implementations.sftp import SFTPFileSystem
    except ImportError as exc:
        raise UsageError(f"sftp:// repositories need paramiko: {exc}",
                         hint="run `make setup` (or pip install paramiko)") from None
    # paramiko logs a dropped connection at ERROR from its own thread; we retry and report
    # ourselves, so keep Python's last-resort handler from printing it on stderr (an
    # application that configures logging still gets the records)
    logging.getLogger("paramiko").addHandler(logging.NullHandler())

    class HostKeyRefused(Exception):
        def __init__(self, message: str, hint: str) -> None:
            super().__init__(message)
            self.hint = hint

    class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
        """Accept the server only if its key is in known_hosts (OpenSSH's format, hashed or not)."""

        def __init__(self, path: str) -> None:
            self.path = path

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            known = paramiko.HostKeys()
            if os.path.exists(self.path):
                known.load(self.path)
            entry = known.lookup(hostname)
            fp = key.fingerprint if hasattr(key, "fingerprint") else key.get_name()
            if entry and key.get_name() in entry:
                if entry[key.get_name()] == key:
                    return
                raise HostKeyRefused(
                    f"the host key of {hostname} ({fp}) does NOT match the one in {self.path}: "
                    "someone may be impersonating the server, or its key was changed",
                    f"if the server's key really changed, remove the old line (ssh-keygen -R '{hostname}' "
                    f"-f {self.path}) and add the new one after checking its fingerprint")
            raise HostKeyRefused(
                f"the host key of {hostname} ({key.get_name()} {fp}) is not in {self.path}",
                f"check the fingerprint with the server's administrator, then add it: ssh-keyscan "
                f"{_keyscan_args(hostname)} >> {self.path} (or connect once with ssh), or point "
                "?known_hosts= at a file that has it")

    class BastionSFTP(SFTPFileSystem):
        protocol = ("bastion-sftp",)

        def _connect(self) -> None:
            kw = dict(self.ssh_kwargs)
            read_timeout = kw.pop("_read_timeout")
            policy = KnownHostsPolicy(kw.pop("_known_hosts"))
            self.client = paramiko.SSHClient()
            self.client.set_missing_host_key_policy(policy)
            try:
                self.client.connect(self.host, **kw)
                self.ftp = self.client.open_sftp()
                # without this a server that stops answering would hang a backup forever
                channel = self.ftp.get_channel()
                assert channel is not None      # an open SFTP session runs on its channel
                channel.settimeout(read_timeout)
            except BaseException:
                self.client.close()
                raise

        def _bastion_close(self) -> None:
            try:
                self.ftp.close()
            finally:
                self.client.close()

    return BastionSFTP, HostKeyRefused


def _keyscan_args(hostname: str) -> str:
    if hostname.startswith("[") and "]:" in hostname:
        host, port = hostname[1:].split("]:", 1)
        return f"-p {port} {host}"
    return hostname


class SftpStore(RemoteStore):
    scheme = "sftp"
    options = RemoteStore.options + ("key_filename", "known_hosts")
    per_thread = True     # paramiko's SFTP client is not safe to share between threads

    def _parse(self, parsed: Any, opts: dict[str, str]) -> None:
        self._fs_class, self._HostKeyRefused = _sftp_classes()
        if parsed.password is not None:
            raise UsageError(f"sftp URL {self.url.split('@')[-1]}: a password in the URL would be shown in "
                             "listings and logs; refused",
                             hint="use a key (ssh-agent, ~/.ssh/id_*, or ?key_filename=), or put the password "
                                  "in the environment variable BASTION_SFTP_PASSWORD")
        if not parsed.hostname:
            raise UsageError(f"{self.url}: no host", hint="sftp://user@host:port/absolute/path")
        if not parsed.path or parsed.path == "/":
            raise UsageError(f"{self.url}: no directory", hint="sftp://user@host:port/absolute/path")
        try:
            port = parsed.port or 22
        except ValueError:
            raise UsageError(f"{self.url}: bad port") from None
        self.host, self.port = parsed.hostname, port
        self.user = unquote(parsed.username) if parsed.username else getpass.getuser()
        self.root = posixpath.normpath(unquote(parsed.path))
        self.known_hosts = os.path.expanduser(opts.get("known_hosts") or "~/.ssh/known_hosts")
        self.ssh_kwargs: dict[str, Any] = {
            "port": port, "username": self.user, "timeout": self.connect_timeout,
            "banner_timeout": self.connect_timeout, "auth_timeout": self.connect_timeout,
            "_read_timeout": self.read_timeout, "_known_hosts": self.known_hosts,
        }
        import inspect

        import paramiko
        if "channel_timeout" in inspect.signature(paramiko.SSHClient.connect).parameters:
            self.ssh_kwargs["channel_timeout"] = self.connect_timeout   # opening the SFTP channel
        if opts.get("key_filename"):
            self.ssh_kwargs["key_filename"] = os.path.expanduser(opts["key_filename"])
        if os.environ.get("BASTION_SFTP_PASSWORD"):
            self.ssh_kwargs["password"] = os.environ["BASTION_SFTP_PASSWORD"]
        self._dirs: set[str] = set()       # directories known to exist: saves round trips
        self._fsync = True                  # until the server says it has no fsync@openssh.com

    def _connect(self) -> Any:
        return self._fs_class(self.host, skip_instance_cache=True, **self.ssh_kwargs)

    def _probe(self, fs: Any) -> None:
        pass   # connecting (and logging in) is the check

    def _classify(self, exc: BaseException, what: str) -> str:
        import paramiko
        where = f"{self.user}@{self.host}:{self.port}"
        if isinstance(exc, self._HostKeyRefused):
            raise StoreRefused(f"{what} {self.url}: refused to connect: {exc}", hint=exc.hint) from None
        if isinstance(exc, paramiko.BadHostKeyException):
            raise StoreRefused(f"{what} {self.url}: the host key of {self.host} changed: {exc}",
                               hint=f"check with the server's administrator, then fix {self.known_hosts}") from None
        if isinstance(exc, paramiko.AuthenticationException) and "transport shut down" in str(exc):
            # paramiko's words when the connection died during the login, not a refusal
            return f"{self.host}:{self.port}: connection lost during the login ({exc})"
        if isinstance(exc, paramiko.AuthenticationException):
            raise StoreRefused(
                f"{what} {self.url}: the server refused the login of {where} ({exc})",
                hint="check the user name in the URL and that one of your keys (ssh-agent, ~/.ssh/id_*, "
                     "?key_filename=) is in that user's authorized_keys on the server; for a password, set "
                     "BASTION_SFTP_PASSWORD. Try `ssh -p PORT user@host` from the same account") from None
        if isinstance(exc, socket.gaierror):
            raise StoreRefused(f"{what} {self.url}: the host name {self.host!r} does not resolve ({exc})",
                               hint="check the host in the URL and this machine's DNS") from None
        if isinstance(exc, PermissionError):
            raise StoreRefused(f"{what} {self.url}: permission denied on the server ({exc})",
                               hint=f"give {self.user} write access to {self.root} on {self.host}") from None
        if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, ConnectionRefusedError)):
            return f"cannot connect to {self.host}:{self.port} (connection refused)"
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return f"no answer from {self.host}:{self.port} (timed out)"
        if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
            # a dropped connection, or a server-side failure SFTP does not name (disk full is "Failure")
            return f"{self.host}:{self.port}: {type(exc).__name__}: {exc}"
        raise StoreError(f"{what} {self.url}: {type(exc).__name__}: {exc}") from exc

    # primitives
    def _read(self, fs: Any, path: str) -> bytes:
        try:
            with fs.ftp.open(path, "rb") as fh:
                fh.prefetch()
                return fh.read()
        except FileNotFoundError:
            raise _Missing() from None

    def _read_range(self, fs: Any, path: str, offset: int, length: int) -> bytes:
        try:
            with fs.ftp.open(path, "rb") as fh:
                fh.seek(offset)
                return bytes(fh.read(length))
        except FileNotFoundError:
            raise _Missing() from None

    def _mkdirs(self, fs: Any, d: str) -> None:
        if d in self._dirs or d in ("", "/"):
            return
        try:
            fs.ftp.stat(d)
        except FileNotFoundError:
            self._mkdirs(fs, posixpath.dirname(d))
            try:
                fs.ftp.mkdir(d, 0o700)
                fs.ftp.chmod(d, 0o700)      # the server's umask may have changed the mode
            except OSError as exc:
                try:
                    fs.ftp.stat(d)     # made meanwhile by another writer is fine
                except FileNotFoundError:
                    raise exc from None   # the mkdir's own reason (permission denied...)
        self._dirs.add(d)

    def _write(self, fs: Any, path: str, data: bytes) -> None:
        self._mkdirs(fs, posixpath.dirname(path))
        tmp = _tmp_name(path)
        try:
            with fs.ftp.open(tmp, "wb") as fh:
                fh.chmod(0o600)         # before any byte is in it: never readable by others
                self._write_all(fs, fh, data)
                self._fsync_remote(fs, fh)
            # posix-rename replaces an existing object atomically (plain SFTP rename refuses to)
            fs.ftp.posix_rename(tmp, path)
        except Exception as exc:
            transport = fs.client.get_transport()
            if not isinstance(exc, TimeoutError) and transport is not None and transport.is_active():
                try:        # the server refused something (disk full...): do not leave the temporary
                    fs.ftp.remove(tmp)
                except Exception:  # prune removes temporaries anyway
                    pass
            raise

    @staticmethod
    def _write_all(fs: Any, fh: Any, data: bytes) -> None:
        """Pipelined writes (one round trip per object, not one per 32 KiB), every status checked.

        paramiko never reads the status of pipelined writes it did not wait for, so a
        failed write (disk full) would go unnoticed: we wait for each one ourselves,
        the way paramiko does for unpipelined writes."""
        pending = getattr(fh, "_reqs", None)
        if pending is None or not hasattr(fs.ftp, "_read_response"):
            fh.write(data)          # a paramiko without those internals: plain, checked, slower
            fh.flush()
            return
        fh.set_pipelined(True)
        fh.write(data)
        fh.flush()
        while pending:
            fs.ftp._read_response(pending.popleft())    # raises on an error status

    def _fsync_remote(self, fs: Any, fh: Any) -> None:
        """fsync@openssh.com on the open handle; paramiko has no public call for this extension."""
        if not self._fsync:
            return
        from paramiko.sftp import CMD_EXTENDED
        try:
            fs.ftp._request(CMD_EXTENDED, "fsync@openssh.com", fh.handle)
        except OSError as exc:
            if "unsupported" in str(exc).lower() or getattr(exc, "errno", None) == errno.EOPNOTSUPP:
                self._fsync = False     # a server without it: durability is the server's own
                return
            raise

    def _stat(self, fs: Any, path: str) -> None:
        try:
            fs.ftp.stat(path)
        except FileNotFoundError:
            raise _Missing() from None

    def _find(self, fs: Any, path: str) -> list[str]:
        return [p for p, _ in self._find_attrs(fs, path)]

    def _find_attrs(self, fs: Any, path: str) -> list[tuple[str, float | None]]:
        from stat import S_ISDIR
        out: list[tuple[str, float | None]] = []
        try:
            entries = fs.ftp.listdir_attr(path)
        except FileNotFoundError:
            raise _Missing() from None
        todo = [(path, entries)]
        while todo:
            d, entries = todo.pop()
            for e in entries:
                p = f"{d}/{e.filename}"
                if e.st_mode is not None and S_ISDIR(e.st_mode):
                    try:
                        todo.append((p, fs.ftp.listdir_attr(p)))
                    except FileNotFoundError:
                        continue
                else:
                    out.append((p, e.st_mtime))
        return sorted(out)

    def _rm(self, fs: Any, path: str) -> None:
        try:
            fs.ftp.remove(path)
        except FileNotFoundError:
            raise _Missing() from None

    def _temporaries(self) -> list[tuple[str, float | None]]:
        try:
            found = self._call("listing", lambda fs: self._find_attrs(fs, self.root))
        except _Missing:
            return []
        base = self.root.rstrip("/") + "/"
        return [(p[len(base):], m) for p, m in found if TMP_MARK in p.rsplit("/", 1)[-1]]

    def temporaries(self) -> list[str]:
        return [p for p, _ in self._temporaries()]

    def removable_temporaries(self, safe_age: float = TMP_SAFE_AGE) -> list[str]:
        now = time.time()
        return [p for p, m in self._temporaries() if _tmp_removable(p, m, now, safe_age)]
