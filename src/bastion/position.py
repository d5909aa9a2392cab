"""Where a copy is: the value types for positions that cross module, process and HTTP seams.

- :class:`Position`: a place in one file's capture log (its ``seq``; ``hlc`` rides along).
  Totally ordered by ``seq``: one file's log is one sequence.
- :class:`Cut`: a position per file of one database, read at one commit boundary (what
  replication ships and a replica acknowledges). Ordered only partially, file by file:
  :meth:`Cut.covers`.
- :class:`Vector`: per origin, the highest change number a sync site holds. A partial
  order (two sites may each hold what the other lacks): :meth:`Vector.covers`,
  :meth:`Vector.join`, :meth:`Vector.compare`, and no ``<``.
- :class:`Instant`: the moment a backup was taken. Totally ordered; its ISO text and
  epoch float are the manifest's pair, its stamp starts the backup's id.

Each is immutable and hashable, prints in words, and reads and writes the JSON forms that
were there before it (HTTP API, state files, manifests), byte for byte. ``from_json``
is for input from outside (a peer, a repository, a file): it checks the shape and raises
:class:`~bastion.errors.UsageError` saying what is wrong.

This module imports nothing of Bastion's but errors.py: every layer may use it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _count(value: Any, what: str) -> int:
    """A non-negative integer (not a bool, not a float) or UsageError."""
    if type(value) is not int or value < 0:
        raise UsageError(f"{what} must be a non-negative integer, not {value!r}",
                         hint="the sender is not a Bastion of this format, or the data was altered")
    return value


@dataclass(frozen=True, order=True)
class Position:
    """A place in one file's capture log: the entry ``seq`` (0 is the install mark).

    Equal and ordered by ``seq`` only: within one file an entry's clock value follows from
    its seq, and some records (a replica's answer) carry the seq alone (``hlc`` 0)."""
    seq: int
    hlc: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        _count(self.seq, "a capture position")
        _count(self.hlc, "a capture clock value")

    def __str__(self) -> str:
        return f"position {self.seq}"

    def to_json(self) -> dict[str, int]:
        return {"seq": self.seq, "hlc": self.hlc}

    @classmethod
    def from_json(cls, value: Any) -> Position:
        """``{"seq": n, "hlc": h}`` (as to_json writes), or a bare seq."""
        if isinstance(value, Mapping):
            if "seq" not in value:
                raise UsageError(f"a capture position needs a seq: {dict(value)!r}")
            return cls(_count(value["seq"], "a capture position"), _count(value.get("hlc", 0), "a clock value"))
        return cls(_count(value, "a capture position"))


@dataclass(frozen=True)
class Cut:
    """One position per file of a database, all read at one commit boundary.

    The JSON form is the list of seqs (``[12, 40]``), as the peer routes and replication
    status have it; ``to_json(clock=True)`` keeps each file's clock value too (seeding)."""
    positions: tuple[Position, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.positions, tuple) or not self.positions:
            raise UsageError("a cut needs one position per file (at least one file)")
        for p in self.positions:
            if not isinstance(p, Position):
                raise UsageError(f"a cut holds positions, not {p!r}")

    @classmethod
    def of(cls, items: Iterable[int | Position]) -> Cut:
        return cls(tuple(p if isinstance(p, Position) else Position(p) for p in items))

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[Position]:
        return iter(self.positions)

    def __getitem__(self, i: int) -> Position:
        return self.positions[i]

    @property
    def seqs(self) -> list[int]:
        return [p.seq for p in self.positions]

    def _same_files(self, other: Cut) -> None:
        if len(other) != len(self):
            raise UsageError(f"cuts of {len(self)} and {len(other)} files cannot be compared",
                             hint="both must list one position per file of the same database")

    def covers(self, other: Cut) -> bool:
        """Every file is at or past ``other``'s position (a copy at self holds all of other)."""
        self._same_files(other)
        return all(a >= b for a, b in zip(self.positions, other.positions))

    def __str__(self) -> str:
        return "cut " + "/".join(str(p.seq) for p in self.positions)

    def to_json(self, clock: bool = False) -> list[Any]:
        return [p.to_json() for p in self.positions] if clock else self.seqs

    @classmethod
    def from_json(cls, value: Any, files: int | None = None) -> Cut:
        """A list of seqs or of ``{"seq", "hlc"}``; ``files``: how many the database has."""
        if not isinstance(value, list) or not value:
            raise UsageError(f"a cut must be a non-empty list of positions, not {value!r}")
        if files is not None and len(value) != files:
            raise UsageError(f"a cut of {len(value)} files, for a database of {files}",
                             hint="list one position per file, in the database's file order")
        return cls(tuple(Position.from_json(v) for v in value))

    @classmethod
    def held(cls, value: Any, files: int | None = None) -> Cut | None:
        """A replica's answer, where a file it holds nothing of is None: then it holds no cut."""
        if isinstance(value, list) and any(v is None for v in value):
            if files is not None and len(value) != files:
                raise UsageError(f"an answer for {len(value)} files, for a database of {files}")
            return None
        return cls.from_json(value, files)


Order = Literal["equal", "before", "after", "concurrent"]


class Vector(Mapping[str, int]):
    """Per origin, the highest change number held (a sync site's version vector).

    An origin not listed counts as 0, so ``{"a": 0}`` equals ``{}``. Kept in the order it
    was given (its JSON comes out as it went in). A partial order: no ``<``."""
    __slots__ = ("_d",)
    _d: dict[str, int]

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        items = entries.items() if isinstance(entries, Mapping) else entries
        d: dict[str, int] = {}
        for o, n in items:
            if not isinstance(o, str) or not o:
                raise UsageError(f"a vector's origin must be a non-empty string, not {o!r}")
            d[o] = _count(n, f"the change number of origin {o!r}")
        object.__setattr__(self, "_d", d)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Vector is immutable")

    def __getitem__(self, origin: str) -> int:
        return self._d[origin]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def seq(self, origin: str) -> int:
        """The highest change of ``origin`` held (0: none)."""
        return self._d.get(origin, 0)

    def _nonzero(self) -> dict[str, int]:
        return {o: n for o, n in self._d.items() if n}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Vector):
            return self._nonzero() == other._nonzero()
        if isinstance(other, Mapping):
            return self._nonzero() == {o: n for o, n in other.items() if n}
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._nonzero().items()))

    def covers(self, other: Mapping[str, int]) -> bool:
        """Everything ``other`` holds is held here."""
        return all(self.seq(o) >= n for o, n in other.items())

    def join(self, other: Mapping[str, int]) -> Vector:
        """The least vector covering both (per origin, the higher)."""
        d = dict(self._d)
        for o, n in other.items():
            d[o] = max(d.get(o, 0), n)
        return Vector(d)

    def compare(self, other: Mapping[str, int]) -> Order:
        mine, theirs = self.covers(other), Vector(other).covers(self)
        if mine and theirs:
            return "equal"
        return "after" if mine else "before" if theirs else "concurrent"

    def lacking(self, other: Mapping[str, int]) -> int:
        """How many changes held here ``other`` lacks (change numbers are gap-free per origin)."""
        return sum(max(0, n - other.get(o, 0)) for o, n in self._d.items())

    def __repr__(self) -> str:
        return f"Vector({self._d!r})"

    def __str__(self) -> str:
        return "{" + ", ".join(f"{o}: {n}" for o, n in sorted(self._d.items())) + "}"

    def to_json(self) -> dict[str, int]:
        return dict(self._d)

    @classmethod
    def from_json(cls, value: Any) -> Vector:
        if not isinstance(value, Mapping):
            raise UsageError(f"a vector must be an object of origin -> change number, not {value!r}")
        return cls(value)


@dataclass(frozen=True, order=True)
class Instant:
    """When a backup was taken (Unix seconds). Its text is ISO 8601 UTC with milliseconds."""
    epoch: float

    def __post_init__(self) -> None:
        e = self.epoch
        if type(e) not in (int, float) or not math.isfinite(e) or e <= 0:
            raise UsageError(f"an instant must be a positive number of seconds, not {e!r}")

    @classmethod
    def now(cls) -> Instant:
        return cls(time.time())

    @property
    def iso(self) -> str:
        t = self.epoch
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"

    @property
    def stamp(self) -> str:
        """To the second, for names that sort by time (a backup id starts with it)."""
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.epoch))

    def __str__(self) -> str:
        return self.iso

    def to_json(self) -> dict[str, Any]:
        """The manifest's pair: ``instant`` (text) and ``instant_epoch`` (the float itself)."""
        return {"instant": self.iso, "instant_epoch": self.epoch}

    @classmethod
    def from_json(cls, value: Any) -> Instant:
        """From a manifest's ``instant`` and ``instant_epoch``, which must name the same moment."""
        if not isinstance(value, Mapping):
            raise UsageError(f"an instant must be an object with instant and instant_epoch, not {value!r}")
        text, epoch = value.get("instant"), value.get("instant_epoch")
        if not isinstance(text, str) or not ISO.fullmatch(text):
            raise UsageError(f"instant {text!r} is not an ISO 8601 UTC time like 2026-12-03T14:15:07.123Z")
        got = cls(epoch)  # type: ignore[arg-type]  # __post_init__ checks it is a number
        if abs(cls._parse(text) - got.epoch) >= 1.0:
            raise UsageError(f"instant {text} and instant_epoch {epoch!r} name different moments",
                             hint="the manifest was edited or damaged")
        return got

    @staticmethod
    def _parse(text: str) -> float:
        import calendar
        whole, _, frac = text[:-1].partition(".")
        try:
            t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            raise UsageError(f"instant {text!r} is not a valid date and time") from None
        return t + (float("0." + frac) if frac else 0.0)
