"""Where backups live: a tiny storage interface that speaks in files.

A store lists, reads, writes and deletes named objects under one root:

- ``file:///dir`` or a plain path: local directory, durable writes (temp name,
  fsync, rename, fsync the directory).
- ``sftp://[user@]host[:port]/abs/path``: fsspec's SFTP file system (paramiko),
  one SSH connection per thread so uploads really run in parallel. Writes go
  to a temp name, are fsynced on the server (OpenSSH's ``fsync@openssh.com``)
  and renamed into place (``posix-rename@openssh.com``): a reader never sees
  half an object. The host key must be in known_hosts.
- ``s3://bucket[/prefix]``: s3fs. A PUT is atomic and durable once answered.
  Credentials come from the usual AWS places (environment, profile, config
  files, instance role), never from the URL.

Nothing else: any other scheme (``ftp://``, ``memory://``, ``gcs://``...) is
refused before anything is written (see ``check_url``).

Options that are not secret ride in the URL's query string (so a repository
URL alone is enough to restore): ``connect_timeout``, ``read_timeout``; for
sftp ``key_filename``, ``known_hosts``; for s3 ``endpoint_url``, ``region``,
``profile``. ``file://`` URLs and plain paths take none.

Objects are private: files 0600 in directories 0700 (local, and sftp through
the server's chmod); on s3 access is the bucket's policy (objects get the
bucket's default ACL, private unless the bucket says otherwise).

Temporaries (names holding ``TMP_MARK``) are left only by a writer that died
or failed mid-write; ``removable_temporaries`` says which of them no live
process can still be writing (see ``_tmp_removable``).

Every remote call is retried with jittered exponential back-off when the
failure looks transient (connection refused/reset/dropped, time-outs, 5xx),
after dropping the connection it happened on. Permanent failures (login
refused, unknown host key, bucket missing, access denied, unresolvable host)
are reported at once, saying what is wrong and what to do.
"""

from __future__ import annotations

import errno
import functools
import getpass
import logging
import os
import posixpath
import random
import socket
import threading
import time
import weakref
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, unquote, urlparse

from ..errors import UsageError
from ..errors import ObjectMissing, StoreError, StoreFull, StoreRefused, StoreUnreachable  # noqa: F401 - in errors.py

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
    url: str

    def read(self, name: str) -> bytes: ...
    def write(self, name: str, data: bytes) -> None: ...
    def exists(self, name: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...

    def temporaries(self) -> list[str]:
        """Half-written objects left by a crash (only stores that write through temp names have any)."""
        return []

    def removable_temporaries(self, safe_age: float = TMP_SAFE_AGE) -> list[str]:
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
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
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
            except Exception as exc:  # noqa: BLE001 - classified below: permanent ones raise
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
    def _read(self, fs: Any, path: str) -> bytes: ...
    def _write(self, fs: Any, path: str, data: bytes) -> None: ...
    def _stat(self, fs: Any, path: str) -> None: ...
    def _find(self, fs: Any, path: str) -> list[str]: ...
    def _rm(self, fs: Any, path: str) -> None: ...


def _close_one(fs: Any) -> None:
    try:
        closer = getattr(fs, "_bastion_close", None)
        if closer:
            closer()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone either way
        pass


def _close_all(conns: list[Any]) -> None:
    while conns:
        _close_one(conns.pop())


# ----------------------------------------------------------------------------------------------
# SFTP


@functools.lru_cache(maxsize=None)
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
                self.ftp.get_channel().settimeout(read_timeout)
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
                except Exception:  # noqa: BLE001 - prune removes temporaries anyway
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


# ----------------------------------------------------------------------------------------------
# S3


class S3Store(RemoteStore):
    scheme = "s3"
    options = RemoteStore.options + ("endpoint_url", "region", "profile")

    def _parse(self, parsed: Any, opts: dict[str, str]) -> None:
        try:
            import s3fs  # noqa: F401
        except ImportError as exc:
            raise UsageError(f"s3:// repositories need s3fs: {exc}",
                             hint="run `make setup` (or pip install s3fs)") from None
        if parsed.username or parsed.password:
            raise UsageError("s3 URL: credentials in the URL would be shown in listings and logs; refused",
                             hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ?profile=)")
        if not parsed.hostname:
            raise UsageError(f"{self.url}: no bucket", hint="s3://bucket/prefix")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{prefix}" if prefix else self.bucket
        self.endpoint = opts.get("endpoint_url") or None
        self.profile = opts.get("profile") or None
        self.region = opts.get("region") or None

    def _connect(self) -> Any:
        import s3fs
        client_kwargs = {"region_name": self.region} if self.region else {}
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint, profile=self.profile, client_kwargs=client_kwargs,
            skip_instance_cache=True, use_listings_cache=False,
            # retries are ours (one policy for every store), not botocore's nor s3fs's
            config_kwargs={"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                           "retries": {"total_max_attempts": 1, "mode": "standard"}})
        fs.retries = 1
        fs._bastion_close = lambda: None   # s3fs closes its session when the instance is collected
        return fs

    def _deadline(self, size: int = 0) -> float:
        """A hard limit per call, on top of the socket time-outs: an upload to a server that
        accepted the connection and then stopped answering is not covered by read_timeout
        (seen with moto frozen: the PUT waited as long as the server did). fsspec cancels
        the request when it passes. Bodies get 1 s per MB on top."""
        return self.connect_timeout + self.read_timeout + size / 1e6

    def _probe(self, fs: Any) -> None:
        fs.call_s3("head_bucket", Bucket=self.bucket, timeout=self._deadline())

    def _endpoint_name(self) -> str:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
            or "AWS S3"

    def _classify(self, exc: BaseException, what: str) -> str:
        import botocore.exceptions as bx
        code = _s3_code(exc)
        ep = self._endpoint_name()
        if code == "NoSuchBucket" or (what.startswith("connecting") and isinstance(exc, FileNotFoundError)):
            raise StoreRefused(f"{what} {self.url}: bucket {self.bucket!r} does not exist at {ep}",
                               hint=f"create it (aws s3 mb s3://{self.bucket}), or fix the bucket name or the "
                                    "endpoint (?endpoint_url= or AWS_ENDPOINT_URL_S3)") from None
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            raise StoreRefused(f"{what} {self.url}: no AWS credentials found ({exc})",
                               hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
                                    "temporary ones) in the environment of the process that runs this (for "
                                    "backups: the daemon), or AWS_PROFILE / ?profile= for ~/.aws/credentials"
                               ) from None
        if isinstance(exc, PermissionError):
            raise StoreRefused(
                f"{what} {self.url}: {ep} refused access to bucket {self.bucket!r} ({exc})",
                hint="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ?profile=) "
                     "and that they may list, read, write and delete objects in the bucket") from None
        if isinstance(exc, ValueError):
            raise UsageError(f"{what} {self.url}: {exc}", hint="check the URL and its options") from None
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            return f"cannot talk to {ep} ({exc})"
        try:
            import aiohttp
            if isinstance(exc, aiohttp.ClientError):
                return f"cannot talk to {ep} ({exc})"
        except ImportError:
            pass
        if isinstance(exc, TimeoutError):
            return f"no answer from {ep} (timed out)"
        if isinstance(exc, ConnectionError):
            return f"cannot talk to {ep} ({type(exc).__name__}: {exc})"
        if isinstance(exc, FileNotFoundError):
            raise StoreError(f"{what} {self.url}: not found ({exc})") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO),
                                                       errno.EBUSY, None):
            return f"{ep} answered with an error ({exc})"   # 5xx, SlowDown: worth another try
        raise StoreError(f"{what} {self.url}: {type(exc).__name__}: {exc}",
                         hint="this looks permanent; check the URL, the bucket and the credentials") from None

    # primitives
    def _missing(self, exc: FileNotFoundError) -> Exception:
        if _s3_code(exc) == "NoSuchBucket":
            return exc    # not a missing object: classified as a missing bucket
        return _Missing()

    def _read(self, fs: Any, path: str) -> bytes:
        try:
            return fs.cat_file(path, timeout=self._deadline(64_000_000))
        except FileNotFoundError as exc:
            raise self._missing(exc) from None

    def _write(self, fs: Any, path: str, data: bytes) -> None:
        fs.pipe_file(path, data, timeout=self._deadline(len(data)))

    def _stat(self, fs: Any, path: str) -> None:
        key = path[len(self.bucket) + 1:]
        try:
            fs.call_s3("head_object", Bucket=self.bucket, Key=key, timeout=self._deadline())
        except FileNotFoundError as exc:
            raise self._missing(exc) from None

    def _find(self, fs: Any, path: str) -> list[str]:
        prefix = path[len(self.bucket) + 1:].rstrip("/") + "/" if path != self.bucket else ""
        out: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = fs.call_s3("list_objects_v2", timeout=self._deadline(), **kw)
            out += [f"{self.bucket}/{o['Key']}" for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return out

    def _rm(self, fs: Any, path: str) -> None:
        fs.call_s3("delete_object", Bucket=self.bucket, Key=path[len(self.bucket) + 1:], timeout=self._deadline())


def _s3_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            return resp.get("Error", {}).get("Code")
    return None


def open_store(url: str) -> Store:
    """The store for a repository URL; anything but file://, a path, sftp:// and s3:// is refused.

    (There used to be a fallback to any fsspec URL: ``memory://`` then "stored" backups in the
    daemon's memory and ``gcs://`` failed half-way with a traceback.)"""
    check_url(url)
    parsed = urlparse(url)
    scheme = ALIASES.get(parsed.scheme.lower(), parsed.scheme.lower())
    if "://" not in url:
        return LocalStore(url)
    if scheme == "file":
        return LocalStore(unquote(parsed.path))
    if scheme == "sftp":
        return SftpStore(url)
    return S3Store(url)
