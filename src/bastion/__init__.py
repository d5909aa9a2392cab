"""Bastion: data protection for SQLite databases used by unmodified applications."""

__version__ = "0.1.0"

from .errors import BastionError

__all__ = ["BastionError", "__version__"]
