"""Configuration: a TOML file turned into typed settings, with an embedded default.

With no config file Bastion runs on the embedded default: it listens on
127.0.0.1:8750, keeps its data under ``./var`` and protects no database until a
command names a file by path. Relative paths in a config file are resolved
against the directory of that file (the embedded default: the working directory).

``model`` holds the settings (frozen dataclasses, one per section); ``parse`` reads a file into them.
"""

from __future__ import annotations

from ..schedule import parse_duration
from .model import (
    DEFAULT_CONFIG_NAME,
    DEFAULT_LISTEN,
    BackupConfig,
    ClusterConfig,
    Command,
    Config,
    DatabaseConfig,
    NotifyConfig,
    ReplicationConfig,
    SQLSettings,
    SyncConfig,
    SyncGroup,
    database_of,
    ensure_data_dir,
)
from .parse import load, read_list_file

__all__ = [
    "DEFAULT_CONFIG_NAME", "DEFAULT_LISTEN", "BackupConfig", "ClusterConfig", "Command", "Config", "DatabaseConfig",
    "NotifyConfig", "ReplicationConfig", "SQLSettings", "SyncConfig", "SyncGroup", "database_of", "ensure_data_dir",
    "load", "parse_duration", "read_list_file",
]
