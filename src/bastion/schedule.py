"""When things run: durations, local-time windows, and the two schedule grammars.

- ``parse_duration``: '90s', '5m', '1h30m', '250ms' or a number of seconds.
- ``Schedule``: jobs the daemon runs on its own (backups, verifies, drills): 'every 1h' or cron.
- ``Timing``: the pass loops (replication's shipper, sync's syncer): ``continuous``,
  ``every DURATION`` or ``manual``, plus blackout windows ("HH:MM-HH:MM", local time).

A leaf module: it imports nothing else from bastion but the errors.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, what: str = "duration") -> float:
    """'90s', '5m', '1h30m', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration such as '30s' or '4h', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            try:
                seconds = float(text)
            except ValueError:
                raise ConfigError(f"{what}: {value!r} is not a duration",
                                  hint="write it as a number of seconds or like '30s', '5m', '4h', '1h30m'") from None
    else:
        raise ConfigError(f"{what}: expected a duration such as '30s', got {value!r}")
    if not math.isfinite(seconds):  # float() takes 'inf'/'nan', and TOML has inf/nan literals
        raise ConfigError(f"{what}: {value!r} is not a finite duration",
                          hint="write it as a number of seconds or like '30s', '5m', '4h', '1h30m'")
    if seconds <= 0:
        raise ConfigError(f"{what}: must be more than zero, got {value!r}",
                          hint="write a positive duration, like '30s', '5m', '4h'")
    return seconds


@dataclass(frozen=True)
class Schedule:
    text: str
    every: float | None = None     # seconds, for 'every ...'
    cron: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "schedule") -> Schedule:
        t = str(text).strip()
        if t.lower().startswith("every "):
            return cls(t, every=parse_duration(t[6:], what))
        from croniter import croniter
        if not croniter.is_valid(t):
            raise ConfigError(f"{what}: {text!r} is neither 'every DURATION' nor a cron expression",
                              hint="for example schedule = \"every 1h\" or schedule = \"15 3 * * *\"")
        return cls(t, cron=t)

    def next_after(self, t: float) -> float:
        if self.every is not None:
            return t + self.every
        from croniter import croniter
        assert self.cron is not None    # parse() sets one of every and cron
        base = dt.datetime.fromtimestamp(t, dt.UTC)
        return croniter(self.cron, base).get_next(dt.datetime).timestamp()

    @property
    def interval_hint(self) -> float:
        """A rough period, to cap the retry back-off of a failed run."""
        if self.every is not None:
            return self.every
        now = dt.datetime.now(dt.UTC).timestamp()
        first = self.next_after(now)
        return max(1.0, self.next_after(first) - first)


@dataclass(frozen=True)
class Timing:
    """When a pass loop may send: its schedule (continuous, every N, manual) and blackout windows."""
    mode: str                       # continuous | every | manual
    every: float = 0.0
    blackout: tuple[tuple[int, int], ...] = ()    # (start, end) in minutes of the local day

    @classmethod
    def parse(cls, schedule: str, blackout: tuple[str, ...] = ()) -> Timing:
        windows = []
        for w in blackout:
            a, b = w.split("-")
            windows.append((_minutes(a), _minutes(b)))
        if schedule.startswith("every "):
            return cls("every", parse_duration(schedule[6:]), tuple(windows))
        return cls(schedule, 0.0, tuple(windows))

    def in_blackout(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now()
        m = now.hour * 60 + now.minute
        # a window may run past midnight ("23:00-01:00")
        return any((start <= m < end) if start <= end else (m >= start or m < end) for start, end in self.blackout)


def _minutes(hhmm: str) -> int:
    h, m = hhmm.strip().split(":")
    return int(h) * 60 + int(m)


# -- checking what a config file says --------------------------------------------------------

_WINDOW = re.compile(r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}$")


def check_pass_schedule(value: Any, what: str) -> str:
    """A pass loop's schedule as written in a config file: 'continuous', 'manual' or
    'every DURATION'; returns it normalised (lower case, trimmed)."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("continuous", "manual"):
        return text
    if text is None or not text.startswith("every "):
        raise ConfigError(f"{what} must be \"continuous\", \"manual\" or \"every DURATION\" (like \"every 10s\"), "
                          f"got {value!r}", hint="for example schedule = \"every 10s\"; the default is continuous")
    parse_duration(text[6:], what)
    return text


def check_windows(value: Any, what: str) -> tuple[str, ...]:
    """Blackout windows as written in a config file: one "HH:MM-HH:MM" or a list of them."""
    windows = [value] if isinstance(value, str) else value
    if not isinstance(windows, list) or not all(isinstance(w, str) and _WINDOW.match(w.strip()) for w in windows):
        raise ConfigError(f"{what} must be a list of \"HH:MM-HH:MM\" windows (local time), got {value!r}",
                          hint="for example blackout = [\"22:00-23:30\"]")
    for w in windows:
        for part in w.strip().split("-"):
            h, m = part.split(":")
            if int(h) > 23 or int(m) > 59:
                raise ConfigError(f"{what} window {w!r}: {part} is not a time of day",
                                  hint="hours 00-23, minutes 00-59; a window may run past midnight (\"23:00-01:00\")")
    return tuple(w.strip() for w in windows)
