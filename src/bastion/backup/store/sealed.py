"""A store that seals every object it writes and opens every object it reads (encrypted repositories).

It wraps the repository's own store (file, sftp, s3) and keeps its names, listings,
temporaries and durability: only the bytes change. The marker (``bastion-repo.json``) and the
key slots (``keys/``) pass through in clear: they are what a reader needs before it has a key.
An object that fails authentication raises :class:`TamperedObject`, a RepositoryError the
repository turns into its own named error (CorruptChunk, DamagedManifest...).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...errors import TamperedObject
from .base import TMP_SAFE_AGE, Store

if TYPE_CHECKING:
    from ..crypto import RepoKeys

CLEAR = ("bastion-repo.json",)
CLEAR_PREFIXES = ("keys/",)


def in_clear(name: str) -> bool:
    return name in CLEAR or name.startswith(CLEAR_PREFIXES)


class SealedStore(Store):
    def __init__(self, inner: Store, keys: RepoKeys) -> None:
        self.inner = inner
        self.keys = keys
        self.url = inner.url

    def read(self, name: str) -> bytes:
        raw = self.inner.read(name)
        if in_clear(name):
            return raw
        from ..crypto import Tampered
        try:
            return self.keys.unseal(name, raw)
        except Tampered as exc:
            raise TamperedObject(f"{self.url}/{name} {exc}", path=f"{self.url}/{name}",
                                 hint="the object was changed by something other than Bastion; "
                                      "run `bastion verify --all` to see what it affects") from None

    def write(self, name: str, data: bytes) -> None:
        self.inner.write(name, data if in_clear(name) else self.keys.seal(name, data))

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def temporaries(self) -> builtins.list[str]:
        return self.inner.temporaries()

    def removable_temporaries(self, safe_age: float = TMP_SAFE_AGE) -> builtins.list[str]:
        return self.inner.removable_temporaries(safe_age)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        # anything store-specific (a local store's root, an sftp store's connection settings)
        return getattr(self.inner, attr)
