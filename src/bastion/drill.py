"""Disaster-recovery drills (placeholder: filled in below)."""

from __future__ import annotations

from typing import Any


def latest_all(state: Any) -> dict[str, dict[str, Any]]:
    return state.latest_drills()
