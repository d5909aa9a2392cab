"""The cryptography of an encrypted repository: the repository key, key slots, sealed objects.

- The repository key is 64 random bytes drawn once, when the repository is created: a
  data key (AES-256-GCM, every object but the marker and the key slots) and a separate
  name key (HMAC-SHA256, the names of chunks). It never changes and is never stored in clear.
- A key slot (``keys/<id>.json``) holds the repository key wrapped (AES-256-GCM) with a key
  derived from one secret: a passphrase (scrypt, its parameters and salt in the slot) or a
  key file (HKDF-SHA256 over the file's bytes). The slot's id, kind and KDF parameters are
  its associated data, so editing any of them makes the slot fail to open, like a wrong secret.
- A sealed object is ``MAGIC | nonce (12 random bytes) | ciphertext | tag``; its associated
  data is the repository id and the object's name, so an object moved to another name (or
  into another repository), truncated or edited by one byte fails authentication.

See docs/design.md, "Repository encryption", for the threat model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

CIPHER = "aes-256-gcm"
NAME_HASH = "hmac-sha256"
MAGIC = b"BSE\x01"          # a sealed object, version 1
NONCE = 12
TAG = 16
SLOTS = "keys"              # key slots live under keys/ (never sealed: they are what unseals)
# scrypt defaults: 32 MiB and about 0.1-0.2 s per try here; stored in each slot, so they can grow
SCRYPT = {"n": 2 ** 15, "r": 8, "p": 1}
# A slot is untrusted input: parameters beyond these would let an edited slot exhaust memory or time.
SCRYPT_MAX_MEMORY = 1 << 30
KEY_FILE_MIN = 16           # bytes of a key file: less is not a key


class Tampered(Exception):
    """A sealed object (or a slot) failed authentication: the repository maps it to its named error."""


@dataclass(frozen=True)
class Secret:
    """A passphrase or a key file's bytes, and where it came from (``origin`` goes into messages;
    the value never does: it is kept out of repr)."""
    kind: str                                  # "passphrase" | "key_file"
    value: bytes = field(repr=False)
    origin: str = ""

    def fingerprint(self) -> bytes:
        """For the in-process cache of unlocked keys only (never stored, never shown)."""
        return hashlib.sha256(self.kind.encode() + b"\0" + self.value).digest()


@dataclass(frozen=True)
class RepoKeys:
    data: bytes = field(repr=False)
    name: bytes = field(repr=False)
    repository_id: str = ""

    @classmethod
    def new(cls, repository_id: str) -> RepoKeys:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32), repository_id)

    def chunk_id(self, data: bytes) -> str:
        """A chunk's name in an encrypted repository: keyed, so it says nothing about the content
        to whoever lacks the key, yet equal content still gets the same name (dedup)."""
        return hmac.new(self.name, data, hashlib.sha256).hexdigest()

    def to_wire(self) -> dict[str, str]:
        """For the backup reader child only (over its private stdin pipe)."""
        return {"data": self.data.hex(), "name": self.name.hex(), "repository_id": self.repository_id}

    @classmethod
    def from_wire(cls, d: dict[str, str]) -> RepoKeys:
        return cls(bytes.fromhex(d["data"]), bytes.fromhex(d["name"]), d["repository_id"])

    def _aad(self, name: str) -> bytes:
        return b"bastion-object\0" + self.repository_id.encode() + b"\0" + name.encode("utf-8", "surrogatepass")

    def seal(self, name: str, plain: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return MAGIC + nonce + AESGCM(self.data).encrypt(nonce, plain, self._aad(name))

    def unseal(self, name: str, blob: bytes) -> bytes:
        if len(blob) < len(MAGIC) + NONCE + TAG:
            raise Tampered(f"is {len(blob)} bytes, shorter than any sealed object (truncated)")
        if blob[:len(MAGIC)] != MAGIC:
            raise Tampered("is not a sealed object (no header: written in clear or overwritten)")
        nonce = blob[len(MAGIC):len(MAGIC) + NONCE]
        try:
            return AESGCM(self.data).decrypt(nonce, blob[len(MAGIC) + NONCE:], self._aad(name))
        except InvalidTag:
            raise Tampered("fails authentication (edited, truncated, or moved from another name)") from None


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    if not isinstance(s, str):
        raise ValueError("not base64 text")
    return base64.b64decode(s, validate=True)


def _wrap_key(secret: Secret, kdf: dict[str, Any]) -> bytes:
    salt = _unb64(kdf["salt"])
    if kdf.get("name") == "scrypt" and secret.kind == "passphrase":
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, r, p)) \
                or n & (n - 1) or 128 * n * r * p > SCRYPT_MAX_MEMORY or p > 16:
            raise ValueError(f"scrypt parameters n={n!r} r={r!r} p={p!r} are out of bounds")
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret.value)
    if kdf.get("name") == "hkdf-sha256" and secret.kind == "key_file":
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"bastion key file slot").derive(secret.value)
    raise ValueError(f"KDF {kdf.get('name')!r} does not take a {secret.kind}")


def _slot_aad(repository_id: str, slot_id: str, kind: str, kdf: dict[str, Any]) -> bytes:
    return ("bastion-key-slot\0" + repository_id + "\0" + slot_id + "\0" + kind + "\0"
            + json.dumps(kdf, sort_keys=True)).encode()


def make_slot(keys: RepoKeys, secret: Secret, scrypt: dict[str, int] | None = None) -> tuple[str, bytes]:
    """A new key slot wrapping ``keys`` with ``secret``: (object name, bytes)."""
    slot_id = secrets.token_hex(4)
    if secret.kind == "passphrase":
        kdf: dict[str, Any] = {"name": "scrypt", **(scrypt or SCRYPT), "salt": _b64(secrets.token_bytes(16))}
    else:
        kdf = {"name": "hkdf-sha256", "salt": _b64(secrets.token_bytes(16))}
    nonce = os.urandom(NONCE)
    wrapped = AESGCM(_wrap_key(secret, kdf)).encrypt(nonce, keys.data + keys.name,
                                                     _slot_aad(keys.repository_id, slot_id, secret.kind, kdf))
    # the repository id rides in the slot too (authenticated: it is in the associated data), so a
    # lost or edited marker cannot cut the repository off from its key
    body = {"id": slot_id, "repository_id": keys.repository_id, "kind": secret.kind, "kdf": kdf, "cipher": CIPHER,
            "nonce": _b64(nonce),
            "wrapped": _b64(wrapped), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return slot_name(slot_id), json.dumps(body, indent=1).encode()


def slot_name(slot_id: str) -> str:
    return f"{SLOTS}/{slot_id}.json"


def parse_slot(raw: bytes) -> dict[str, Any]:
    """A slot's public part (id, kind, KDF, created); ValueError when it is not a slot."""
    d = json.loads(raw)
    if not isinstance(d, dict) or not isinstance(d.get("id"), str) or d.get("kind") not in ("passphrase", "key_file") \
            or not isinstance(d.get("kdf"), dict) or d.get("cipher") != CIPHER:
        raise ValueError("not a key slot")
    return d


def open_slot(raw: bytes, secret: Secret, repository_id: str) -> RepoKeys | None:
    """The repository key if ``secret`` opens this slot; None if it does not (wrong secret, a slot
    of the other kind, or a damaged slot: they cannot be told apart, by design of AEAD). The slot's
    own repository id is used when it has one: it opens only if that id is the true one."""
    try:
        d = parse_slot(raw)
        if d["kind"] != secret.kind:
            return None
        own = d.get("repository_id")
        repository_id = own if isinstance(own, str) else repository_id
        key = _wrap_key(secret, d["kdf"])
        plain = AESGCM(key).decrypt(_unb64(d["nonce"]), _unb64(d["wrapped"]),
                                    _slot_aad(repository_id, d["id"], d["kind"], d["kdf"]))
    except (ValueError, KeyError, TypeError, InvalidTag):
        return None
    if len(plain) != 64:
        return None
    return RepoKeys(plain[:32], plain[32:], repository_id)


def public_meta(repository_id: str) -> dict[str, Any]:
    """What the marker says about encryption: nothing secret."""
    return {"cipher": CIPHER, "names": NAME_HASH, "repository_id": repository_id, "key_slots": f"{SLOTS}/",
            "kdf": {"name": "scrypt", **SCRYPT}}
