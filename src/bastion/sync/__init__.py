"""n-way synchronisation of SQLite files between sites, with conflict policies (issue 5).

The engine is a library over change capture: :mod:`.site` keeps each file's sync state
and exchanges changes, :mod:`.policy` decides conflicts. The daemon moves batches
between sites (``changes_for`` on one side, ``apply`` on the other).
"""

from .policy import Choice, Policy, Version, load_resolver
from .model import ApplyResult, SyncChange
from .site import (adopt, apply, changes_for, changes_for_wire, configure, conflict, conflicts, from_wire, ingest,
                   install, is_installed, prune, record_peer, resolve, site_of, status, to_wire, vector)
from .state import raise_clock

__all__ = ["ApplyResult", "Choice", "Policy", "SyncChange", "Version", "adopt", "apply", "changes_for",
           "changes_for_wire", "configure",
           "conflict", "conflicts", "from_wire", "ingest", "install", "is_installed", "load_resolver", "prune",
           "raise_clock", "record_peer", "resolve", "site_of", "status", "to_wire", "vector"]
