"""Moved to bastion.schedule (durations, windows and schedules live in one leaf module)."""

from ..schedule import Timing

__all__ = ["Timing"]
