"""The typed settings a config file turns into: one frozen dataclass per section.

Read by every part of the daemon; built only by ``bastion.config.parse``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from ..sql.users import User
    from ..sync.policy import Policy

DEFAULT_CONFIG_NAME = "bastion.toml"
DEFAULT_LISTEN = "127.0.0.1:8750"


@dataclass(frozen=True)
class DatabaseConfig:
    name: str
    files: tuple[str, ...]
    repository: str | None = None    # overrides [backups] repository
    schedule: str | None = None      # overrides [backups] schedule
    durability: str = "durable"      # SQL server commits: durable | fast | replicated
    group_commit: bool = True        # durable commits share fsyncs (false: one fsync per commit)
    foreign_keys: bool = False       # SQL server connections enforce foreign keys
    # real-time backup (bastion.replication): the primary names its peer, a replica its primary
    replicate_to: str | None = None          # peer daemon URL (primary side)
    replicate_schedule: str = "continuous"   # continuous | every DURATION | manual
    blackout: tuple[str, ...] = ()           # "HH:MM-HH:MM" local-time windows when nothing is sent
    on_failure: str | tuple[str, ...] | None = None   # command run once per failure streak
    replica_of: str | None = None            # this copy follows the primary's database of that name
    # set by a replicated cluster's active node (never read from a file): while its standby is
    # down or being seeded, "replicated" commits are acknowledged once durable here (degraded)
    standby_optional: bool = False
    sync_group: str | None = None            # multi-site sync: the [sync_groups.NAME] this database is in
    # recovery drills (bastion.drill): SQL assertions each returning a true first value, and/or a command
    drill_check: tuple[str, ...] = ()
    drill_command: str | tuple[str, ...] | None = None
    # an encrypted repository's secret (backup.keys): paths, read when needed; override [backups]
    passphrase_file: str | None = None
    key_file: str | None = None
    # WAL archive for point-in-time restore (bastion.backup.archive); None: [backups]' value
    archive: bool | None = None
    archive_interval: float | None = None
    archive_retention: float | None = None


@dataclass(frozen=True)
class BackupConfig:
    repository: str | None = None    # default file://<data_dir>/backups
    schedule: str | None = None      # 'every 1h' or cron; none: backups only on request
    verify_schedule: str | None = None   # full verify of each database's newest backup
    keep: dict[str, int] = field(default_factory=dict)   # retention applied after scheduled backups
    drill_schedule: str | None = None    # recovery drill of each database's newest backup (bastion.drill)
    format: int = 1                      # of a repository created by a backup: 1 (chunks) or 2 (page packs)
    passphrase_file: str | None = None   # encrypted repositories' secret (backup.keys): a path, never the secret
    key_file: str | None = None
    archive: bool = False                # archive committed WAL frames between backups (point-in-time restore)
    archive_interval: float = 1.0        # seconds between archive segments: the archive's RPO
    archive_retention: float = 7 * 86400.0   # segments older than this that no kept backup needs are pruned


Command = str | tuple[str, ...]     # a hook: a string runs through the shell, a list is argv (bastion.hooks)


@dataclass(frozen=True)
class SQLSettings:
    """[sql]: limits of the SQL server (bastion.sql.service)."""
    idle_timeout: float = 30.0        # an interactive transaction idle this long is rolled back
    busy_timeout: float = 15.0        # wait this long for the write lock (ours, then SQLite's)
    max_transactions: int = 64        # open interactive transactions, all databases together
    pool_size: int = 8                # idle connections kept per database and role
    statement_timeout: float = 30.0   # a statement running longer is interrupted
    max_result_rows: int = 100_000    # rows one statement may return
    max_result_bytes: int = 64 << 20  # and their size (values as sent, roughly)
    max_request_bytes: int = 32 << 20  # body of one SQL request
    max_transactions_per_user: int = 8  # open interactive transactions of one user
    threads: int = 32                 # worker threads for SQL requests (the admin API has its own)

    @property
    def writer_idle_timeout(self) -> float:
        """A transaction that holds the write lock and is idle is rolled back well before a
        waiting writer's busy timeout ends: a vanished client must not fail every writer."""
        return min(self.idle_timeout, self.busy_timeout / 2)


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: failover between nodes (bastion.cluster)."""
    node: str                        # this node's unique name
    name: str = "bastion"            # the cluster's name (the lease key)
    mode: str = "shared"             # shared (one data_dir) | replicated (each node its own copy)
    lease: str = "file"              # file (in data_dir) | etcd
    etcd: tuple[str, ...] = ()       # etcd endpoints, for lease = "etcd"
    ttl: float = 3.0                 # lease time to live, seconds
    peers: dict[str, str] = field(default_factory=dict)   # node -> "host:port"
    on_promote: Command | None = None
    on_demote: Command | None = None


@dataclass(frozen=True)
class ReplicationConfig:
    """[replication]: what the daemons share to talk to each other (peer API)."""
    peer_token_file: str | None = None   # shared secret of the peer API (replication, sync, cluster)
    origin: str | None = None            # this daemon's name as a capture origin
    peer_ca_file: str | None = None      # CA that signed the peers' tls_cert


@dataclass(frozen=True)
class SyncGroup:
    """[sync_groups.NAME]: the sites of one multi-site sync group, as seen from this site."""
    name: str
    sites: dict[str, str]                # site -> base URL (no trailing /)
    topology: str                        # pair | hub | mesh
    hub: str | None
    neighbours: tuple[str, ...]          # the sites this one exchanges with
    policy: Policy
    schedule: str = "continuous"         # continuous | manual | every DURATION
    blackout: tuple[str, ...] = ()       # "HH:MM-HH:MM" local-time windows
    on_failure: Command | None = None
    counters: tuple[str, ...] = ()       # "table.column" merged as counters
    keys: dict[str, str] = field(default_factory=dict)    # table -> key strategy (rekey | shared)
    invariants: dict[str, dict[str, Any]] = field(default_factory=dict)   # bastion.sync.check


@dataclass(frozen=True)
class SyncConfig:
    """[sync] and every [sync_groups.NAME]."""
    site: str = ""                       # this daemon's site id ("" when no group is configured)
    groups: dict[str, SyncGroup] = field(default_factory=dict)


@dataclass(frozen=True)
class NotifyConfig:
    """[notify]: channels and thresholds of bastion.notify."""
    interval: float = 30.0
    webhook: tuple[str, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_retries: int = 3
    webhook_timeout: float = 10.0
    email_to: tuple[str, ...] = ()
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    email_from: str | None = None
    command: Command | None = None
    backup_max_age: float | None = None
    verify_max_age: float | None = None
    replication_lag: float | None = None
    sync_lag_changes: int | None = None
    disk_free_percent: float = 5.0


@dataclass(frozen=True)
class Config:
    source: str                      # path of the config file, or "embedded default"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8750
    data_dir: str = "./var"
    token_file: str = ""
    contops_max_duration: float = 4 * 3600.0
    gate_timeout: float = 10.0       # how long startbu/freeze may wait for writers to pause
    rollin_timeout: float = 300.0    # how long endbu waits for the delta to roll in
    freeze_timeout: float = 10.0     # default --timeout of freeze
    databases: dict[str, DatabaseConfig] = field(default_factory=dict)
    backups: BackupConfig = field(default_factory=BackupConfig)
    sql: SQLSettings = field(default_factory=SQLSettings)
    users: dict[str, User] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None     # what local clients (the CLI) trust for tls_cert; default: tls_cert itself
    cluster: ClusterConfig | None = None
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    notify: NotifyConfig | None = None       # None: no [notify] section, nothing is sent

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def base_url(self) -> str:
        host = self.listen_host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.listen_port}"

    @property
    def state_path(self) -> str:
        return os.path.join(self.data_dir, "state.db")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "listen": self.listen, "data_dir": self.data_dir,
            "contops": {"max_duration": self.contops_max_duration, "gate_timeout": self.gate_timeout,
                        "rollin_timeout": self.rollin_timeout},
            "freeze": {"timeout": self.freeze_timeout},
            "databases": {n: list(d.files) for n, d in self.databases.items()},
        }


def database_of(config: Config, path: str) -> str | None:
    for name, db in config.databases.items():
        if path in db.files:
            return name
    return None


def ensure_data_dir(config: Config) -> Path:
    p = Path(config.data_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p
