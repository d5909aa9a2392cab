"""When a shipper may send: its schedule (continuous, every N, manual) and blackout windows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ..config import parse_duration


@dataclass(frozen=True)
class Timing:
    mode: str                       # continuous | every | manual
    every: float = 0.0
    blackout: tuple[tuple[int, int], ...] = ()    # (start, end) in minutes of the local day

    @classmethod
    def parse(cls, schedule: str, blackout: tuple[str, ...] = ()) -> "Timing":
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
        for start, end in self.blackout:
            # a window may run past midnight ("23:00-01:00")
            if (start <= m < end) if start <= end else (m >= start or m < end):
                return True
        return False


def _minutes(hhmm: str) -> int:
    h, m = hhmm.strip().split(":")
    return int(h) * 60 + int(m)
