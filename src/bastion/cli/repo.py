"""Repositories: repo init, repo info, repo key list/add/remove/passwd (encryption: backup.keys;
what a repository holds: backup.info)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
from rich.table import Table

from .. import config as cfg
from ..errors import UsageError
from .base import cli, common, emit, out, secret_options


@cli.group()
def repo() -> None:
    """Backup repositories: create one (format, encryption), show what it holds, manage its key slots."""


_REPO = click.option("--repo", "url", default=None, help="Repository URL (default file://<data_dir>/backups).")


def _url(conf: cfg.Config, url: str | None) -> str:
    from ..backup.backups import default_repository
    from ..backup.store import check_url
    return check_url(url) if url else default_repository(conf)


def _new_secret(url: str, new_passphrase_file: str | None, new_key_file: str | None) -> Any:
    from ..backup import keys
    if new_passphrase_file and new_key_file:
        raise UsageError("give --new-passphrase-file or --new-key-file, not both")
    if new_passphrase_file:
        return keys.read_passphrase_file(new_passphrase_file, "--new-passphrase-file")
    if new_key_file:
        keys.generate_key_file(new_key_file)     # a missing key file is created (32 random bytes, 0600)
        return keys.read_key_file(new_key_file, "--new-key-file")
    return keys.prompt_new_passphrase(url)


def _new_options(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("--new-key-file", type=click.Path(dir_okay=False), default=None,
                  help="Key file for the new slot (created with 32 random bytes if missing).")
    @click.option("--new-passphrase-file", type=click.Path(dir_okay=False), default=None,
                  help="File holding the passphrase for the new slot (default: prompt on a terminal).")
    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any) -> Any:
        return f(*args, **kw)
    return wrapper


def _show_slots(d: dict[str, Any]) -> None:
    if not d["encrypted"]:
        out.print(f"{d['repository']}: not encrypted (no key slots)")
        return
    out.print(f"{d['repository']}: encrypted ({d['cipher']}, chunk names {d['names']})")
    table = Table("slot", "kind", "kdf", "created")
    for s in d["slots"]:
        kdf = s["kdf"] or {}
        params = ", ".join(f"{k}={v}" for k, v in kdf.items() if k != "name")
        table.add_row(s["id"], s["kind"] or "DAMAGED", f"{kdf.get('name', '?')} {params}".strip(), s["created"] or "")
    out.print(table)


@repo.command("init")
@click.argument("url")
@click.option("--encrypt", is_flag=True,
              help="Encrypt the repository (needs a passphrase or key file; given one, it is encrypted anyway).")
@click.option("--format", "format_", type=click.IntRange(1, 2), default=None,
              help="1: 256 KiB chunks; 2: page-level packs (default: [backups] format, else 1).")
@common
@secret_options
def repo_init(conf: cfg.Config, as_json: bool, url: str, encrypt: bool, format_: int | None) -> None:
    """Create a repository at URL; with --encrypt, every object is sealed under a random key
    wrapped by the passphrase or key file (a missing --key-file is created)."""
    from ..backup import keys
    from ..backup.store import check_url
    check_url(url)
    emit(keys.init(url, encrypt, format_ or conf.backups.format), as_json, _show_slots)


@repo.command("info")
@_REPO
@common
@secret_options
def repo_info(conf: cfg.Config, as_json: bool, url: str | None) -> None:
    """What the repository holds: format, encryption, packs or chunks, stored and logical bytes, dedup ratio."""
    from ..backup.info import repository_info
    from ..backup.repository import Repository
    emit(repository_info(Repository.open(_url(conf, url))), as_json,
         lambda d: out.print("\n".join(f"{k}: {v}" for k, v in d.items() if k != "verdict")))


@repo.group("key")
def repo_key() -> None:
    """Key slots of an encrypted repository (each wraps the repository key with a passphrase or key file)."""


@repo_key.command("list")
@_REPO
@common
def key_list(conf: cfg.Config, as_json: bool, url: str | None) -> None:
    """List the key slots (no secret needed; nothing secret is shown)."""
    from ..backup import keys
    emit(keys.list_slots(_url(conf, url)), as_json, _show_slots)


@repo_key.command("add")
@_REPO
@_new_options
@common
@secret_options
def key_add(conf: cfg.Config, as_json: bool, url: str | None, new_passphrase_file: str | None,
            new_key_file: str | None) -> None:
    """Add a key slot for a new passphrase or key file (a current secret must open the repository)."""
    from ..backup import keys
    u = _url(conf, url)
    data = keys.add_slot(u, _new_secret(u, new_passphrase_file, new_key_file))

    def human(d: dict[str, Any]) -> None:
        out.print(f"added key slot {d['added']}")
        _show_slots({**d, **keys.list_slots(u)})
    emit(data, as_json, human)


@repo_key.command("remove")
@click.argument("slot_id")
@_REPO
@common
@secret_options
def key_remove(conf: cfg.Config, as_json: bool, slot_id: str, url: str | None) -> None:
    """Remove key slot SLOT_ID (refused for the last one; a current secret must open the repository)."""
    from ..backup import keys
    data = keys.remove_slot(_url(conf, url), slot_id)
    emit(data, as_json, lambda d: out.print(f"removed key slot {d['removed']}; {len(d['slots'])} left"))


@repo_key.command("passwd")
@click.argument("slot_id", required=False)
@_REPO
@_new_options
@common
@secret_options
def key_passwd(conf: cfg.Config, as_json: bool, slot_id: str | None, url: str | None,
               new_passphrase_file: str | None, new_key_file: str | None) -> None:
    """Change the secret of the slot the current secret opens (SLOT_ID, if given, must be that slot):
    the new slot is written durably before the old one is removed."""
    from ..backup import keys
    u = _url(conf, url)
    data = keys.change(u, _new_secret(u, new_passphrase_file, new_key_file), slot_id)
    emit(data, as_json, lambda d: out.print(f"key slot {d['removed']} replaced by {d['added']}; "
                                            "the old secret no longer opens the repository"))
