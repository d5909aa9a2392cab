"""The command line: parse, call the daemon's API, print. Nothing else lives here.

Exit codes (like BUTIL): 0 success, 1 partial (done, with a warning such as an
incomplete roll-in), 2 failed (including "the copy is not consistent" and "no
daemon"), 3 usage (bad command line, unknown database; nothing was done).

One module per command group; each registers its commands on ``cli`` when imported.
"""

from __future__ import annotations

import sys

import click

from ..errors import EXIT_FAILED, EXIT_USAGE, BastionError
from . import backups, cluster, ops, replicate, repo, sql, sync  # noqa: F401 - they register their commands
from .base import _TAIL, _fmt_bytes, cli, err

__all__ = ["_fmt_bytes", "cli", "main"]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _TAIL.clear()
    if "--" in args and any(c in args[: args.index("--")] for c in ("exec", "freeze")):
        i = args.index("--")
        _TAIL.extend(args[i + 1:])
        args = args[:i]
    try:
        cli.main(args=args, prog_name="bastion", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(EXIT_FAILED)
    except click.UsageError as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show(file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except BastionError as exc:
        err.print(f"error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
