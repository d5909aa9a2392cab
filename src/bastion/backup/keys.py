"""Encrypted repositories: where the secret comes from, unlocking, and the key slots (`bastion repo`).

The secret of a repository, first found wins:

1. the CLI's ``--passphrase-file`` / ``--key-file`` (commands that read the repository themselves);
2. the config: ``passphrase_file`` / ``key_file`` of the ``[databases.NAME]`` whose repository it
   is, else of ``[backups]``;
3. the environment: ``BASTION_REPO_PASSPHRASE`` (the passphrase itself),
   ``BASTION_REPO_PASSPHRASE_FILE``, ``BASTION_REPO_KEY_FILE``;
4. the CLI only, on a terminal: a prompt. The daemon never prompts.

Files are read when an encrypted repository needs them, never at config load (a rotated
passphrase file is picked up by the next backup). No secret is ever logged, put in an error,
a status or a JSON answer: messages name where a secret came from, never what it is.

Unlocked keys are cached in the process by (slot bytes, secret): the daemon's status polls do
not run scrypt each time, and a removed slot stops opening at once (its bytes are gone).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlparse
from typing import TYPE_CHECKING, Any

from ..errors import KeyRequired, NoRepository, RepositoryError, UsageError, WrongKey
from ..fsutil import fsync_dir
from . import crypto
from .crypto import RepoKeys, Secret
from .store import ObjectMissing, Store, open_store

if TYPE_CHECKING:
    from ..config import Config

MARKER = "bastion-repo.json"
ENV_PASSPHRASE = "BASTION_REPO_PASSPHRASE"
ENV_PASSPHRASE_FILE = "BASTION_REPO_PASSPHRASE_FILE"
ENV_KEY_FILE = "BASTION_REPO_KEY_FILE"
HOW = ("give --passphrase-file FILE or --key-file FILE, set passphrase_file or key_file in [backups] (or in "
       f"the database's section) of the config, or set {ENV_PASSPHRASE}")


@dataclass
class _Context:
    config: Config | None = None
    passphrase_file: str | None = None      # the CLI's options
    key_file: str | None = None
    prompt: bool = False


_CTX = _Context()
_UNLOCKED: dict[bytes, RepoKeys] = {}
_guard = threading.Lock()


def configure(config: Config | None = None, *, passphrase_file: str | None = None, key_file: str | None = None,
              prompt: bool = False) -> None:
    """Say where secrets come from in this process (the daemon at start, the CLI per command)."""
    if passphrase_file and key_file:
        raise UsageError("give --passphrase-file or --key-file, not both")
    _CTX.config, _CTX.passphrase_file, _CTX.key_file, _CTX.prompt = config, passphrase_file, key_file, prompt


def read_passphrase_file(path: str, origin: str) -> Secret:
    try:
        with open(path, "rb") as fh:
            value = fh.read()
    except OSError as exc:
        raise KeyRequired(f"cannot read the passphrase file {path} ({origin}): {exc.strerror}", path=path,
                          hint="check the path and that this user may read it") from None
    value = value[:-1] if value.endswith(b"\n") else value
    value = value[:-1] if value.endswith(b"\r") else value
    if not value:
        raise KeyRequired(f"the passphrase file {path} ({origin}) is empty", path=path,
                          hint="write the passphrase into it (one line)")
    return Secret("passphrase", value, origin)


def read_key_file(path: str, origin: str) -> Secret:
    try:
        with open(path, "rb") as fh:
            value = fh.read()
    except OSError as exc:
        raise KeyRequired(f"cannot read the key file {path} ({origin}): {exc.strerror}", path=path,
                          hint="check the path and that this user may read it; `bastion repo init --key-file "
                               "FILE` and `bastion repo key add --new-key-file FILE` create one") from None
    if len(value) < crypto.KEY_FILE_MIN:
        raise KeyRequired(f"the key file {path} ({origin}) holds {len(value)} bytes: too short to be a key "
                          f"(at least {crypto.KEY_FILE_MIN})", path=path,
                          hint="use a key file Bastion generated (a missing --new-key-file is created)")
    return Secret("key_file", value, origin)


def generate_key_file(path: str) -> None:
    """32 random bytes in a new file, 0600, durably; an existing file is never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise UsageError(f"cannot create the key file {path}: {exc.strerror}", path=path) from None
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _norm(url: str) -> str:
    """One spelling per local directory (a path, file:///x, file:///x/); remote URLs as written."""
    if "://" not in url:
        return "file://" + os.path.abspath(url)
    parsed = urlparse(url)
    if parsed.scheme.lower() == "file":
        return "file://" + os.path.abspath(unquote(parsed.path))
    return url.rstrip("/")


def _configured(url: str) -> tuple[str, str, str] | None:
    """(kind, path, origin) of the config's secret for ``url``."""
    conf = _CTX.config
    if conf is None:
        return None
    for db in conf.databases.values():
        pf, kf = getattr(db, "passphrase_file", None), getattr(db, "key_file", None)
        # the database's repository, as backups.default_repository says (not imported: a cycle)
        own = db.repository or conf.backups.repository or "file://" + os.path.join(conf.data_dir, "backups")
        if (pf or kf) and _norm(own) == _norm(url):
            return ("passphrase", pf, f"[databases.{db.name}] passphrase_file") if pf else \
                ("key_file", str(kf), f"[databases.{db.name}] key_file")
    pf, kf = getattr(conf.backups, "passphrase_file", None), getattr(conf.backups, "key_file", None)
    if pf:
        return "passphrase", pf, "[backups] passphrase_file"
    if kf:
        return "key_file", kf, "[backups] key_file"
    return None


def explicit_source(url: str) -> str | None:
    """Where a secret meant for ``url`` was given on purpose (CLI option or config), if it was."""
    if _CTX.passphrase_file:
        return "--passphrase-file"
    if _CTX.key_file:
        return "--key-file"
    found = _configured(url)
    return found[2] if found else None


def resolve(url: str, prompt: bool = True) -> Secret | None:
    """The secret for ``url`` (see the module docstring for the order), or None."""
    if _CTX.passphrase_file:
        return read_passphrase_file(_CTX.passphrase_file, "--passphrase-file")
    if _CTX.key_file:
        return read_key_file(_CTX.key_file, "--key-file")
    found = _configured(url)
    if found:
        kind, path, origin = found
        return read_passphrase_file(path, origin) if kind == "passphrase" else read_key_file(path, origin)
    if os.environ.get(ENV_PASSPHRASE):
        return Secret("passphrase", os.environ[ENV_PASSPHRASE].encode(), ENV_PASSPHRASE)
    if os.environ.get(ENV_PASSPHRASE_FILE):
        return read_passphrase_file(os.environ[ENV_PASSPHRASE_FILE], ENV_PASSPHRASE_FILE)
    if os.environ.get(ENV_KEY_FILE):
        return read_key_file(os.environ[ENV_KEY_FILE], ENV_KEY_FILE)
    if prompt and _CTX.prompt and sys.stdin.isatty():
        value = getpass.getpass(f"passphrase of {url}: ").encode()
        return Secret("passphrase", value, "the prompt") if value else None
    return None


def prompt_new_passphrase(url: str) -> Secret:
    """A new passphrase typed twice (CLI on a terminal only)."""
    if not (_CTX.prompt and sys.stdin.isatty()):
        raise UsageError("no new secret given", hint="give --new-passphrase-file FILE or --new-key-file FILE")
    first = getpass.getpass(f"new passphrase for {url}: ")
    if not first:
        raise UsageError("the new passphrase is empty; nothing was changed")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passphrases differ; nothing was changed")
    return Secret("passphrase", first.encode(), "the prompt")


# -- unlocking ------------------------------------------------------------------------------

def _slots(store: Store) -> list[str]:
    return sorted(n for n in store.list(crypto.SLOTS) if n.endswith(".json"))


def _find(store: Store, repository_id: str, secret: Secret) -> tuple[str, RepoKeys] | None:
    """(slot object, keys) of the first slot ``secret`` opens."""
    for name in _slots(store):
        try:
            raw = store.read(name)
        except ObjectMissing:        # removed since the listing
            continue
        cached = hashlib.sha256(raw + secret.fingerprint()).digest()
        with _guard:
            keys = _UNLOCKED.get(cached)
        if keys is None:
            keys = crypto.open_slot(raw, secret, repository_id)
            if keys is None:
                continue
            with _guard:
                _UNLOCKED[cached] = keys
        return name, keys
    return None


def encryption_of(meta: dict[str, Any], url: str) -> dict[str, Any] | None:
    """The marker's encryption section, checked; None for a repository in clear."""
    enc = meta.get("encryption")
    if enc is None:
        return None
    if (not isinstance(enc, dict) or enc.get("cipher") != crypto.CIPHER or enc.get("names") != crypto.NAME_HASH
            or not isinstance(enc.get("repository_id"), str)):
        raise RepositoryError(f"{url}/{MARKER}: its encryption section is damaged or names a cipher this Bastion "
                              f"does not use ({json.dumps(enc)[:200]})", path=f"{url}/{MARKER}",
                              hint=f"this Bastion encrypts with {crypto.CIPHER} and names chunks with "
                                   f"{crypto.NAME_HASH}; use the Bastion version that wrote the repository")
    return enc


def unlock(store: Store, enc: dict[str, Any], secret: Secret | None = None) -> RepoKeys:
    """The repository key, or KeyRequired / WrongKey (nothing is written either way)."""
    return _unlock_slot(store, enc, secret or resolve(store.url))[1]


def _unlock_slot(store: Store, enc: dict[str, Any], secret: Secret | None) -> tuple[str, RepoKeys]:
    url = store.url
    if secret is None:
        raise KeyRequired(f"{url} is an encrypted repository and no passphrase or key file was given", hint=HOW)
    if not _slots(store):
        raise RepositoryError(f"{url} is encrypted but has no key slot under {crypto.SLOTS}/: its key is lost",
                              hint="restore the keys/ directory from a copy of the repository")
    found = _find(store, enc["repository_id"], secret)
    if found is None:
        what = "passphrase" if secret.kind == "passphrase" else "key file"
        raise WrongKey(f"the {what} from {secret.origin} opens none of the key slots of {url}",
                       hint=f"check the {what} (`bastion repo key list` shows the slots and their kinds); {HOW}")
    return found


def create(store: Store, secret: Secret, format: int = 1) -> RepoKeys:
    """Make ``store`` an encrypted repository: key slot first, marker last (the repository exists
    once its marker does, and a marker never names a key that no slot holds)."""
    keys = RepoKeys.new(uuid.uuid4().hex)
    name, body = crypto.make_slot(keys, secret)
    store.write(name, body)
    store.write(MARKER, json.dumps({"format": format, "created": time.time(),
                                    "encryption": crypto.public_meta(keys.repository_id)}).encode())
    return keys


# -- what `bastion repo` does ---------------------------------------------------------------

def _meta(store: Store) -> dict[str, Any]:
    try:
        meta = json.loads(store.read(MARKER))
    except ObjectMissing:
        raise NoRepository(f"{store.url} is not a Bastion backup repository (no {MARKER})",
                           hint="create one with `bastion repo init URL`") from None
    except ValueError:
        raise RepositoryError(f"{store.url}/{MARKER} is damaged (not JSON)", path=f"{store.url}/{MARKER}") from None
    if not isinstance(meta, dict):
        raise RepositoryError(f"{store.url}/{MARKER} is damaged (not a JSON object)")
    return meta


def _encrypted(store: Store) -> dict[str, Any]:
    enc = encryption_of(_meta(store), store.url)
    if enc is None:
        raise UsageError(f"{store.url} is not encrypted: it has no key slots",
                         hint="encryption is chosen when a repository is created (`bastion repo init URL "
                              "--encrypt`); back up to a new encrypted repository")
    return enc


def _public(store: Store) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in _slots(store):
        try:
            d = crypto.parse_slot(store.read(name))
        except (ObjectMissing, ValueError):
            out.append({"id": name.rsplit("/", 1)[-1][:-5], "kind": None, "kdf": None, "created": None,
                        "damaged": True})
            continue
        kdf = {k: v for k, v in d["kdf"].items() if k != "salt"}
        out.append({"id": d["id"], "kind": d["kind"], "kdf": kdf, "created": d.get("created"), "damaged": False})
    return out


def init(url: str, encrypt: bool, format: int = 1) -> dict[str, Any]:
    """A new repository at ``url``; encrypted when asked to or when a secret is supplied."""
    store = open_store(url)
    if store.exists(MARKER) or any(True for p in ("manifests", "chunks", "packs", "index", "keys")
                                         for _ in store.list(p)):
        raise UsageError(f"{store.url} already holds a repository (or backups); nothing was changed",
                         hint="choose an empty directory or prefix")
    if _CTX.key_file and not os.path.exists(_CTX.key_file):
        generate_key_file(_CTX.key_file)        # `repo init --key-file NEW`: the key is made here
    secret = resolve(url, prompt=False)
    if encrypt and secret is None and _CTX.prompt and sys.stdin.isatty():
        secret = prompt_new_passphrase(url)     # typed twice: a typo here would lock every backup out
    if encrypt and secret is None:
        raise KeyRequired(f"--encrypt: no passphrase or key file was given for {store.url}; nothing was written",
                          hint=HOW)
    if secret is None:
        store.write(MARKER, json.dumps({"format": format, "created": time.time()}).encode())
        return {"repository": store.url, "format": format, "encrypted": False, "slots": []}
    create(store, secret, format)
    return {"repository": store.url, "format": format, "encrypted": True, "cipher": crypto.CIPHER,
            "names": crypto.NAME_HASH, "slots": _public(store)}


def list_slots(url: str) -> dict[str, Any]:
    """The slots of ``url`` (no secret needed: nothing secret is shown)."""
    store = open_store(url)
    enc = encryption_of(_meta(store), store.url)
    if enc is None:
        return {"repository": store.url, "encrypted": False, "slots": []}
    return {"repository": store.url, "encrypted": True, "cipher": enc["cipher"], "names": enc["names"],
            "slots": _public(store)}


def _opened(store: Store) -> tuple[str, RepoKeys]:
    """The slot the supplied secret opens, and the keys: every slot change proves a key first."""
    return _unlock_slot(store, _encrypted(store), resolve(store.url))


def add_slot(url: str, new: Secret) -> dict[str, Any]:
    store = open_store(url)
    _, keys = _opened(store)
    name, body = crypto.make_slot(keys, new)
    store.write(name, body)                 # durable before we answer
    return {"repository": store.url, "added": name.rsplit("/", 1)[-1][:-5], "slots": _public(store)}


def remove_slot(url: str, slot_id: str) -> dict[str, Any]:
    store = open_store(url)
    _opened(store)
    ids = [s["id"] for s in _public(store)]
    if slot_id not in ids:
        raise UsageError(f"{store.url} has no key slot {slot_id!r}", hint="`bastion repo key list` shows them")
    working = [s for s in _public(store) if not s["damaged"] and s["id"] != slot_id]
    if not working:
        raise UsageError(f"slot {slot_id} is the last key slot of {store.url}: removing it would lose every backup "
                         "in it; nothing was removed", hint="add another slot first (`bastion repo key add`)")
    store.delete(crypto.slot_name(slot_id))
    return {"repository": store.url, "removed": slot_id, "slots": _public(store)}


def change(url: str, new: Secret, slot_id: str | None = None) -> dict[str, Any]:
    """Replace the slot the current secret opens by one for ``new``: the new slot is written
    durably (and opened again from the store) before the old one is removed, so a crash at any
    point leaves at least one slot that opens."""
    store = open_store(url)
    old, keys = _opened(store)
    old_id = old.rsplit("/", 1)[-1][:-5]
    if slot_id is not None and slot_id != old_id:
        raise WrongKey(f"the secret given opens slot {old_id}, not slot {slot_id}; nothing was changed",
                       hint="give the current secret of the slot to change")
    name, body = crypto.make_slot(keys, new)
    store.write(name, body)
    if crypto.open_slot(store.read(name), new, keys.repository_id) != keys:
        raise RepositoryError(f"{store.url}: the new key slot does not read back; the old one was kept",
                              hint="check the repository's storage, then retry")
    store.delete(old)
    return {"repository": store.url, "removed": old_id, "added": name.rsplit("/", 1)[-1][:-5],
            "slots": _public(store)}
