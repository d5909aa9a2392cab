"""The conflict log as the daemon's routes settle it: a sync site through sync, any other file
(failover's log) through :mod:`bastion.conflicts`. Everything else is :mod:`bastion.conflicts`'."""

from __future__ import annotations

import os
from typing import Any

import apsw

from ..conflicts import *  # noqa: F403 - the old import path of the conflict log
from ..conflicts import for_json, get, listing, merge, record, record_unshipped, rows  # noqa: F401
from ..conflicts import resolve as resolve_plain
from ..sqlite.connect import connection
from . import site


# replaces the star-imported resolve on purpose: a sync site's reapply must enter its version state
def resolve(target: apsw.Connection | str | os.PathLike[str], conflict_id: int, action: str,  # type: ignore[no-redef]
            by: str | None = None, version: str | None = None) -> dict[str, Any]:
    """``dismiss`` keeps the winner; ``reapply`` writes the losing version as a new local change."""
    with connection(target) as con:
        if site.is_installed(con):        # a sync site: the new change must enter its version state
            return site.resolve(con, conflict_id, action, by=by, version=version)
        return resolve_plain(con, conflict_id, action, by=by, version=version)
