"""Schedules for jobs the daemon runs on its own: 'every 1h' or a cron expression."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    text: str
    every: float | None = None     # seconds, for 'every ...'
    cron: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "schedule") -> "Schedule":
        from .config import parse_duration
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
        base = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        return croniter(self.cron, base).get_next(dt.datetime).timestamp()

    @property
    def interval_hint(self) -> float:
        """A rough period, to cap the retry back-off of a failed run."""
        if self.every is not None:
            return self.every
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        first = self.next_after(now)
        return max(1.0, self.next_after(first) - first)
