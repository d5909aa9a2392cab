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

from urllib.parse import unquote, urlparse

from .base import (
    ALIASES,
    SCHEMES,
    SUPPORTED,
    TMP_MARK,
    TMP_SAFE_AGE,
    ObjectMissing,
    Store,
    StoreError,
    StoreFull,
    StoreRefused,
    StoreUnreachable,
    _pid_alive,
    _tmp_name,
    _tmp_removable,
    check_url,
)
from .local import LocalStore
from .s3 import S3Store
from .sftp import SftpStore

__all__ = ["ALIASES", "SCHEMES", "SUPPORTED", "TMP_MARK", "TMP_SAFE_AGE", "LocalStore", "ObjectMissing", "S3Store",
           "SftpStore", "Store", "StoreError", "StoreFull", "StoreRefused", "StoreUnreachable", "check_url",
           "open_store", "_pid_alive", "_tmp_name", "_tmp_removable"]


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

