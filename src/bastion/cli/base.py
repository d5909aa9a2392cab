"""What every command shares: the top-level group, --config/--json, output, the admin client."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from .. import __version__
from .. import config as cfg
from ..daemon.client import AdminClient
from ..errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, Outcome

if TYPE_CHECKING:
    from ..backup import Repository

# Piped or redirected, rich would squeeze tables into 80 columns and cut paths with '…':
# give them the room they need, so `bastion status | grep` sees whole paths.
out = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# `bastion exec NAME... -- CMD` and `bastion freeze NAME... -- CMD`: click drops "--",
# so main() cuts the command off argv before click parses the rest.
_TAIL: list[str] = []


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --json mean the same on every command."""
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Config file (default ./bastion.toml if present, else the embedded default).")
    @functools.wraps(f)
    def wrapper(*args: Any, config_path: str | None, as_json: bool, **kw: Any) -> Any:
        ctx = click.get_current_context()
        path = config_path or (ctx.obj or {}).get("config")
        conf = cfg.load(path)
        from ..backup import keys
        keys.configure(conf)    # encrypted repositories this command opens: their secret from the config
        return f(conf, as_json, *args, **kw)
    return wrapper


def secret_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--passphrase-file / --key-file: the secret of an encrypted repository the command reads itself
    (before the config and the environment); on a terminal, a prompt when none is found. Goes below
    @common."""
    @click.option("--key-file", type=click.Path(dir_okay=False), default=None,
                  help="Key file of an encrypted repository.")
    @click.option("--passphrase-file", type=click.Path(dir_okay=False), default=None,
                  help="File holding the passphrase of an encrypted repository.")
    @functools.wraps(f)
    def wrapper(conf: cfg.Config, as_json: bool, *args: Any, passphrase_file: str | None, key_file: str | None,
                **kw: Any) -> Any:
        from ..backup import keys
        keys.configure(conf, passphrase_file=passphrase_file, key_file=key_file,
                       prompt=not as_json and sys.stdin.isatty() and err.is_terminal)
        return f(conf, as_json, *args, **kw)
    return wrapper


def targets_option(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.argument("targets", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every configured database (and protected file).")
    @functools.wraps(f)
    def wrapper(conf: cfg.Config, as_json: bool, targets: tuple[str, ...], all_: bool, **kw: Any) -> Any:
        return f(conf, as_json, expand_targets(conf, targets), all_, **kw)
    return wrapper


def expand_targets(conf: cfg.Config, args: tuple[str, ...]) -> list[str]:
    """Database names stay names; '@list' files and paths become absolute paths."""
    names: list[str] = []
    for a in args:
        if a.startswith("@"):
            names.extend(cfg.read_list_file(a[1:]))
        elif a in conf.databases:
            names.append(a)
        elif os.sep in a or os.path.exists(a):
            names.append(os.path.abspath(a))
        else:
            names.append(a)  # the daemon says it is unknown and lists what it knows
    return names


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A positive, finite number of seconds: 'nan'/'inf' parse as floats but cannot be sent as JSON."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of seconds, got {value:g}")
    return value


EXIT_OF = {Outcome.OK: EXIT_OK, Outcome.PARTIAL: EXIT_PARTIAL, Outcome.FAILED: EXIT_FAILED}


def exit_code_of(data: dict[str, Any]) -> int:
    """The exit code of a result: libraries (and the daemon's answers) say how it went with a
    "verdict" (errors.Outcome); a result without one (composed here) carries "exit_code"."""
    if "verdict" in data:
        verdict, err = Outcome(data["verdict"]), data.get("error")
        if verdict == Outcome.FAILED and isinstance(err, dict) and isinstance(err.get("exit_code"), int):
            return int(err["exit_code"])      # failed with an error (to_dict): the error's own code
        return EXIT_OF[verdict]
    return int(data.get("exit_code", EXIT_OK))


def with_exit_codes(data: Any) -> Any:
    """``data`` with an "exit_code" beside every "verdict", nested results included (a result
    per database): --json has always carried them, and only the CLI maps one to the other."""
    if isinstance(data, list):
        return [with_exit_codes(x) for x in data]
    if not isinstance(data, dict):
        return data
    out = {k: with_exit_codes(v) for k, v in data.items()}
    if "verdict" in out:
        out["exit_code"] = exit_code_of(out)
    return out


def emit(data: Mapping[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    shown: dict[str, Any] = with_exit_codes(data)
    code = exit_code_of(shown)
    if as_json:
        print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    else:
        human(shown)
    if code:
        sys.exit(code)


def _client(conf: cfg.Config) -> AdminClient:
    return AdminClient(conf)


def _spinner(as_json: bool, text: str) -> AbstractContextManager[Any]:
    import contextlib
    if as_json or not err.is_terminal:
        return contextlib.nullcontext()
    return err.status(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file for every command (each command also takes --config).")
@click.version_option(__version__, prog_name="bastion")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Bastion protects the SQLite databases of unmodified applications.

    \b
    Exit codes: 0 success, 1 partial, 2 failed (or copy not consistent), 3 usage.
    """
    ctx.obj = {"config": config_path}


def _repo(conf: cfg.Config, url: str | None, database: str | None = None) -> Repository:
    from ..backup import Repository
    from ..backup.backups import default_repository
    return Repository.open(url or default_repository(conf, database))


def _backup_progress(as_json: bool) -> AbstractContextManager[Any]:   # a rich Progress, or None
    """Per database under way: bytes as the daemon counts them ("3.0 MiB of 12.0 MiB"); while the
    total is unknown, a spinner and a pulsing bar with the bytes so far, never a made-up "0/?"."""
    import contextlib

    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    if as_json or not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                    TextColumn("{task.fields[bytes]}", markup=False), TimeRemainingColumn(),
                    console=err, transient=True)


def _progress(as_json: bool, what: str) -> AbstractContextManager[Any]:   # a rich Progress, or None
    """A rich progress bar on a terminal (stderr); nothing otherwise."""
    import contextlib

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    if as_json or not err.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                    TimeRemainingColumn(), console=err, transient=True)
