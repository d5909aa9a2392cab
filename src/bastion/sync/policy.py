"""Conflict policies: which version of a row stays when two sites changed it concurrently.

Sites decide on their own, in whatever order changes reach them, so a policy must pick
the same winner everywhere. The built-in rules are a *total order* on versions (a sort
key): the winner among any set of concurrent versions is the greatest, whatever order
they arrived in.

- ``lww`` (default): the higher (hlc, origin) wins. The hybrid clock orders a change after
  every change its site had seen, and the origin breaks ties: there are none.
- ``priority``: a list of site ids, earlier wins; versions of the same site, or of two
  unlisted sites, fall back to lww. A listed site beats an unlisted one.
- ``update_delete`` (with either rule): when exactly one version is a delete,
  ``delete-wins`` or ``update-wins`` decides before anything else. ``lww`` here is only
  accepted with the lww rule (where it changes nothing): mixed with priority it would not
  be an order (a > b > c > a is possible) and sites could end with different rows.
- ``resolver``: a user's function, ``"package.module:function"``, called as
  ``f(table, local, remote)`` with each version as a dict column -> value (None for a
  deleted row). It returns the row to keep (a dict: columns it leaves out keep the
  remote's value, or the local's when the remote is a delete), None to delete, or the
  string ``"local"`` / ``"remote"``. A row different from both is written as a new local
  change, which then syncs out. A resolver must be deterministic and symmetric
  (``f(t, a, b)`` and ``f(t, b, a)`` keep the same row) or sites will not converge.
"""

from __future__ import annotations

import importlib
import math
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

from ..errors import UsageError

RULES = ("lww", "priority", "resolver")
UPDATE_DELETE = ("lww", "delete-wins", "update-wins")


class Version(NamedTuple):
    """One version of a row: who made it, when, and what it holds (``values`` None: deleted)."""
    hlc: int
    origin: str
    columns: tuple[str, ...]
    values: tuple[Any, ...] | None

    @property
    def deleted(self) -> bool:
        return self.values is None

    @property
    def ident(self) -> tuple[int, str]:
        return self.hlc, self.origin

    def row(self) -> dict[str, Any] | None:
        return None if self.values is None else dict(zip(self.columns, self.values))


class Choice(NamedTuple):
    """What a policy kept: ``"local"``, ``"remote"``, or ``"merged"`` with ``row`` (None: deleted)."""
    winner: str
    row: dict[str, Any] | None = None


def same_value(a: Any, b: Any) -> bool:
    """Equal as SQLite stores them: same type, and floats bit for bit (-0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def same_row(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)


_RESOLVERS: dict[str, Callable[..., Any]] = {}


def load_resolver(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (or ``package.module.function``); cached."""
    fn = _RESOLVERS.get(path)
    if fn is not None:
        return fn
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    hint = "give the resolver as 'package.module:function', importable by the daemon's Python"
    if not mod_name or not attr:
        raise UsageError(f"resolver {path!r} is not a dotted path to a function", hint=hint)
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:   # ImportError, or whatever the module raised while loading
        raise UsageError(f"resolver {path!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}", hint=hint) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"resolver {path!r}: module {mod_name!r} has no {attr!r}", hint=hint) from None
    if not callable(obj):
        raise UsageError(f"resolver {path!r} is not callable ({type(obj).__name__})", hint=hint)
    _RESOLVERS[path] = obj
    return obj


@dataclass(frozen=True)
class Policy:
    """A conflict policy. Every site of a group must use the same one."""
    rule: str = "lww"
    priority: tuple[str, ...] = ()
    update_delete: str | None = None
    resolver: str | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UsageError(f"unknown conflict policy {self.rule!r}", hint=f"use one of {', '.join(RULES)}")
        if self.update_delete is not None and self.update_delete not in UPDATE_DELETE:
            raise UsageError(f"unknown update_delete rule {self.update_delete!r}",
                             hint=f"use one of {', '.join(UPDATE_DELETE)}")
        if self.rule == "priority":
            if not self.priority or not all(isinstance(s, str) and s for s in self.priority):
                raise UsageError("the priority policy needs a list of site ids, highest priority first")
            if len(set(self.priority)) != len(self.priority):
                raise UsageError("the priority list names a site twice")
            if self.update_delete == "lww":
                raise UsageError("update_delete = 'lww' cannot be combined with the priority policy",
                                 hint="mixed, they do not order every set of versions the same way on every "
                                      "site; use delete-wins or update-wins, or leave it unset (priority decides)")
        if self.rule == "resolver":
            if not self.resolver:
                raise UsageError("the resolver policy needs a resolver ('package.module:function')")
            load_resolver(self.resolver)      # fail now, clearly, not in the middle of a sync

    @classmethod
    def of(cls, spec: Policy | str | Mapping[str, Any] | None) -> Policy:
        """From config: None (lww), a rule name, or a mapping with ``rule``/``policy``, ``priority``,
        ``update_delete``, ``resolver``."""
        if spec is None:
            return cls()
        if isinstance(spec, Policy):
            return spec
        if isinstance(spec, str):
            return cls(rule=spec)
        if isinstance(spec, Mapping):
            known = {"rule", "policy", "priority", "update_delete", "resolver"}
            extra = set(spec) - known
            if extra:
                raise UsageError(f"unknown conflict policy settings: {', '.join(sorted(extra))}",
                                 hint=f"known: {', '.join(sorted(known))}")
            rule = spec.get("rule") or spec.get("policy")
            if rule is None:
                rule = "resolver" if spec.get("resolver") else "priority" if spec.get("priority") else "lww"
            prio = spec.get("priority") or ()
            if isinstance(prio, str):
                prio = [prio]
            return cls(rule=str(rule), priority=tuple(prio), update_delete=spec.get("update_delete"),
                       resolver=spec.get("resolver"))
        raise UsageError(f"a conflict policy cannot be given as {type(spec).__name__}")

    @property
    def total(self) -> bool:
        """True when the policy is an order on versions (every rule but a resolver)."""
        return self.rule != "resolver"

    def describe(self) -> str:
        s = {"lww": "lww", "priority": f"priority({'>'.join(self.priority)})",
             "resolver": f"resolver({self.resolver})"}[self.rule]
        return f"{s}, {self.update_delete}" if self.update_delete and self.update_delete != "lww" else s

    def key(self, v: Version) -> tuple[Any, ...]:
        """The sort key of a version: the greatest wins. Only for total policies (and lww ties)."""
        if self.update_delete == "delete-wins":
            ud = int(v.deleted)
        elif self.update_delete == "update-wins":
            ud = int(not v.deleted)
        else:
            ud = 0
        if self.rule == "priority":
            rank = self.priority.index(v.origin) if v.origin in self.priority else len(self.priority)
            return ud, -rank, v.hlc, v.origin
        return ud, 0, v.hlc, v.origin

    def choose(self, table: str, local: Version, remote: Version) -> Choice:
        """The version to keep of two concurrent ones (their values differ)."""
        if self.rule != "resolver" or (self.update_delete is not None and local.deleted != remote.deleted):
            return Choice("remote" if self.key(remote) > self.key(local) else "local")
        fn = load_resolver(self.resolver or "")
        lrow, rrow = local.row(), remote.row()
        try:
            got = fn(table, lrow, rrow)
        except Exception as e:
            raise UsageError(f"resolver {self.resolver!r} failed on table {table!r}: {type(e).__name__}: {e}",
                             hint="fix the resolver; the batch was not applied and the next sync retries it") from e
        if got == "local" or got == "remote":
            return Choice(got)
        if got is None:
            if local.deleted:
                return Choice("local")
            return Choice("remote") if remote.deleted else Choice("merged", None)
        if not isinstance(got, Mapping):
            raise UsageError(f"resolver {self.resolver!r} returned {type(got).__name__} for table {table!r}",
                             hint="return a dict (the row), None (delete it), 'local' or 'remote'")
        cols = remote.columns if not remote.deleted else local.columns
        unknown = [c for c in got if c not in cols]
        if unknown:
            raise UsageError(f"resolver {self.resolver!r} returned columns {unknown} that table {table!r} "
                             "does not have", hint=f"its columns: {', '.join(cols)}")
        merged = dict(rrow if rrow is not None else lrow or {})
        merged.update(got)
        if same_row(merged, rrow):
            return Choice("remote")
        if same_row(merged, lrow):
            return Choice("local")
        return Choice("merged", merged)
