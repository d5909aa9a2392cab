"""Reading a config file: TOML in, a checked ``Config`` out, every mistake a ``ConfigError`` that says
where and what to write instead. Relative paths resolve against the file's directory."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from ..errors import ConfigError, UsageError
from ..schedule import Schedule, check_pass_schedule, check_windows, parse_duration
from .model import (
    DEFAULT_CONFIG_NAME, DEFAULT_LISTEN, BackupConfig, ClusterConfig, Command, Config, DatabaseConfig, NotifyConfig,
    ReplicationConfig, SQLSettings, SyncConfig, SyncGroup,
)

if TYPE_CHECKING:
    from ..sql.users import User

_KNOWN: dict[str, set[str] | None] = {
    "daemon": {"listen", "data_dir", "token_file", "tls_cert", "tls_key", "tls_ca"},
    "sql": {f.name for f in dataclasses.fields(SQLSettings)},
    "users": None,
    "cluster": {"name", "node", "mode", "lease", "etcd", "ttl", "peers", "on_promote", "on_demote"},
    "contops": {"max_duration", "gate_timeout", "rollin_timeout"},
    "freeze": {"timeout"},
    "backups": {"repository", "schedule", "verify_schedule", "keep_last", "keep_hourly", "keep_daily",
                "keep_weekly", "keep_monthly", "drill_schedule", "format", "passphrase_file", "key_file",
                "archive", "archive_interval", "archive_retention"},
    "databases": None,
    "replication": {"peer_token_file", "origin", "peer_ca_file"},
    "sync": {"site"},
    "sync_groups": None,
    "notify": {"webhook", "webhook_secret_file", "webhook_retries", "webhook_timeout", "smtp_host", "smtp_port",
               "smtp_starttls", "smtp_user", "smtp_password_file", "email_from", "email_to", "command", "interval",
               "backup_max_age", "verify_max_age", "replication_lag", "sync_lag_changes", "disk_free_percent"},
}
_DATABASE_KEYS = ("files", "repository", "schedule", "durability", "group_commit", "foreign_keys", "sync_group",
                  "drill_check", "drill_command", "replicate_to", "replicate_schedule", "blackout", "on_failure",
                  "replica_of", "passphrase_file", "key_file", "archive", "archive_interval", "archive_retention")
_SYNC_GROUP_KEYS = {"sites", "topology", "hub", "policy", "priority", "update_delete", "resolver", "schedule",
                    "blackout", "on_failure", "counters", "keys", "invariants"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_URL = re.compile(r"^https?://[^/\s]+/?$")


def _split_listen(value: Any, source: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{source}: [daemon] listen must be 'HOST:PORT', got {value!r}",
                          hint="for example listen = \"127.0.0.1:8750\"")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        port_no = int(port)
    except ValueError:
        raise ConfigError(f"{source}: [daemon] listen port {port!r} is not a number") from None
    if not 0 < port_no < 65536:
        raise ConfigError(f"{source}: [daemon] listen port {port_no} is out of range 1-65535")
    return host, port_no


def read_list_file(path: str, base: str | None = None) -> list[str]:
    """One path per line (the seed's DATAFILE.TXT); blank lines and '#' comments skipped.
    Relative paths are taken relative to ``base`` (default: the working directory)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"list file {path} does not exist",
                          hint="a list file holds one database file path per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read list file {path}: {exc}") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(line))))
    if not out:
        raise ConfigError(f"list file {path} names no file", hint="write one database file path per line")
    return out


def load(path: str | None = None) -> Config:
    """Load ``path``; without it, ``./bastion.toml`` if present, else the embedded default."""
    if path is None:
        if os.path.exists(DEFAULT_CONFIG_NAME):
            path = DEFAULT_CONFIG_NAME
        else:
            return _build({}, "embedded default", os.getcwd())
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          hint="pass --config with an existing file, or omit it to use the embedded default") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return _build(raw, os.path.abspath(path), os.path.dirname(os.path.abspath(path)))


# -- small checks every section uses ---------------------------------------------------------

def _unknown_keys(table: dict[str, Any], known: Any, where: str) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        raise ConfigError(f"{where} unknown key '{extra[0]}'", hint="known keys: " + ", ".join(sorted(known)))


def _whole(value: Any, where: str, low: int, high: int | None = None) -> int:
    """A whole number in [low, high]; TOML's true/false are not numbers here."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        limits = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{where} must be a whole number {limits}, got {value!r}",
                          hint=f"write it without quotes, e.g. {max(low, 1)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}", hint="write true or false, without quotes")
    return value


def _text(value: Any, where: str, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}", hint=f"for example {example}")
    return value


def _command(value: Any, where: str) -> Command | None:
    """A hook (bastion.hooks): a string runs through the shell, a non-empty list of strings is argv."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(x, str) and x for x in value):
        return tuple(value)
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"{where} must be a command (a string or a list of arguments)",
                      hint="for example \"/usr/local/bin/page-ops\" or [\"/usr/local/bin/page-ops\", \"--urgent\"]")


# -- the file as a whole ---------------------------------------------------------------------

def _build(raw: dict[str, Any], source: str, base: str) -> Config:
    _check_sections(raw, source)

    def resolve(p: str) -> str:
        return os.path.abspath(os.path.join(base, os.path.expanduser(p)))

    daemon = _daemon(raw.get("daemon", {}), source, resolve)
    contops = raw.get("contops", {})
    databases = _databases(raw, source, base, resolve)
    replication = _replication(raw.get("replication"), databases, source, resolve)
    cluster = _cluster(raw.get("cluster"), source)
    config = Config(
        source=source, **daemon,
        contops_max_duration=parse_duration(contops.get("max_duration", "4h"), f"{source}: [contops] max_duration"),
        gate_timeout=parse_duration(contops.get("gate_timeout", "10s"), f"{source}: [contops] gate_timeout"),
        rollin_timeout=parse_duration(contops.get("rollin_timeout", "5m"), f"{source}: [contops] rollin_timeout"),
        freeze_timeout=_freeze_timeout(raw.get("freeze", {}), source),
        databases=databases, backups=_backups(raw.get("backups", {}), base, source),
        sql=_sql(raw.get("sql", {}), source), users=_users(raw.get("users", {}), databases, source),
        cluster=cluster, replication=replication,
        sync=_sync(raw, databases, replication, source),
        notify=_notify(raw["notify"], f"{source}: [notify]", resolve) if "notify" in raw else None,
    )
    _check_replicated_cluster(config, source)
    return config


def _check_sections(raw: dict[str, Any], source: str) -> None:
    for section, value in raw.items():
        if section not in _KNOWN:
            raise ConfigError(f"{source}: unknown section [{section}]",
                              hint=f"known sections: {', '.join('[' + s + ']' for s in _KNOWN)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}] must be a table",
                              hint=f"write it as a section: [{section}] on a line of its own, its keys below")
        keys = _KNOWN[section]
        if keys is not None:
            for key in value:
                if key not in keys:
                    raise ConfigError(f"{source}: unknown key '{key}' in [{section}]",
                                      hint=f"known keys: {', '.join(sorted(keys))}")


def _daemon(raw: dict[str, Any], source: str, resolve: Callable[[str], str]) -> dict[str, Any]:
    """[daemon] -> the Config fields it sets (listen, data_dir, token and TLS files)."""
    host, port = _split_listen(raw.get("listen", DEFAULT_LISTEN), source)
    data_dir = raw.get("data_dir", "./var")
    if not isinstance(data_dir, str) or not data_dir:
        raise ConfigError(f"{source}: [daemon] data_dir must be a path, got {data_dir!r}",
                          hint="for example data_dir = \"/var/lib/bastion\"")
    data_dir = resolve(data_dir)
    token_file = raw.get("token_file")
    if token_file is not None and not (isinstance(token_file, str) and token_file):
        raise ConfigError(f"{source}: [daemon] token_file must be a path, got {token_file!r}",
                          hint="for example token_file = \"/etc/bastion/token\"; the default is DATA_DIR/token")
    token_file = resolve(token_file) if token_file else os.path.join(data_dir, "token")
    tls = [raw.get("tls_cert"), raw.get("tls_key")]
    if any(tls) and not all(isinstance(t, str) and t for t in tls):
        raise ConfigError(f"{source}: [daemon] TLS needs both tls_cert and tls_key (PEM files)")
    tls = [resolve(t) if t else None for t in tls]
    ca = raw.get("tls_ca")
    if ca is not None:
        if not isinstance(ca, str) or not ca or not tls[0]:
            raise ConfigError(f"{source}: [daemon] tls_ca must be a PEM file, with tls_cert and tls_key set",
                              hint="the CA certificate that signed tls_cert, for this machine's clients to trust")
        tls.append(resolve(ca))
    else:
        tls.append(None)
    for t in tls:
        if t and not os.path.isfile(t):
            raise ConfigError(f"{source}: TLS file {t} does not exist")
    return {"listen_host": host, "listen_port": port, "data_dir": data_dir, "token_file": token_file,
            "tls_cert": tls[0], "tls_key": tls[1], "tls_ca": tls[2]}


def _freeze_timeout(raw: dict[str, Any], source: str) -> float:
    timeout = parse_duration(raw.get("timeout", "10s"), f"{source}: [freeze] timeout")
    if timeout > 3600:  # freeze refuses more (it holds every writer): say so at load, not at each freeze
        raise ConfigError(f"{source}: [freeze] timeout must be at most 1h, got {raw.get('timeout')!r}",
                          hint="a freeze holds every writer; keep it short")
    return timeout


def _backups(b: dict[str, Any], base: str, source: str) -> BackupConfig:
    for key in ("schedule", "verify_schedule", "drill_schedule"):
        if b.get(key) is not None:
            Schedule.parse(b[key], f"{source}: [backups] {key}")
    keep = {}
    for key in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly"):
        if key in b:
            if not isinstance(b[key], int) or isinstance(b[key], bool) or b[key] < 0:
                raise ConfigError(f"{source}: [backups] {key} must be a whole number >= 0, got {b[key]!r}")
            keep[key[5:]] = b[key]
    fmt = b.get("format", 1)
    if fmt not in (1, 2) or isinstance(fmt, bool):
        raise ConfigError(f"{source}: [backups] format must be 1 or 2, got {fmt!r}",
                          hint="2 (page-level packs) applies to repositories created from now on; 1 is the default")
    return BackupConfig(_repo_url(b.get("repository"), base, source, None), b.get("schedule"),
                        b.get("verify_schedule"), keep, b.get("drill_schedule"), fmt,
                        **_key_paths(b, f"{source}: [backups]", base),
                        **_archive_keys(b, f"{source}: [backups]", {"archive": False, "archive_interval": "1s",
                                                                     "archive_retention": "7d"}))


def _key_paths(spec: dict[str, Any], where: str, base: str) -> dict[str, Any]:
    """passphrase_file / key_file of an encrypted repository: paths only (backup.keys reads them)."""
    out: dict[str, Any] = {}
    for key in ("passphrase_file", "key_file"):
        v = spec.get(key)
        if v is not None and not (isinstance(v, str) and v):
            raise ConfigError(f"{where} {key} must be a path, got {v!r}",
                              hint=f'for example {key} = "/etc/bastion/repo.{key[:-5]}" (never the secret itself)')
        out[key] = os.path.abspath(os.path.join(base, os.path.expanduser(v))) if v else None
    if out["passphrase_file"] and out["key_file"]:
        raise ConfigError(f"{where} sets both passphrase_file and key_file", hint="a repository is opened with one")
    return out


def _archive_keys(spec: dict[str, Any], where: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """archive (true/false), archive_interval and archive_retention (durations), checked."""
    out: dict[str, Any] = {}
    arch = spec.get("archive", defaults.get("archive"))
    if arch is not None and not isinstance(arch, bool):
        raise ConfigError(f"{where} archive must be true or false, got {arch!r}")
    out["archive"] = arch
    for key in ("archive_interval", "archive_retention"):
        raw = spec.get(key, defaults.get(key))
        out[key] = None if raw is None else parse_duration(raw, f"{where} {key}")
        if out[key] is not None and out[key] <= 0:
            raise ConfigError(f"{where} {key} must be longer than 0")
    return out


# -- [databases.NAME] ------------------------------------------------------------------------

def _databases(raw: dict[str, Any], source: str, base: str,
               resolve: Callable[[str], str]) -> dict[str, DatabaseConfig]:
    databases: dict[str, DatabaseConfig] = {}
    owner: dict[str, str] = {}      # file -> database: a file belongs to one database
    clustered = (raw.get("cluster") or {}).get("mode") == "replicated"   # the cluster names the peer
    groups = raw.get("sync_groups") or {}
    for name, spec in raw.get("databases", {}).items():
        db = _database(name, spec, source, base, resolve, clustered, groups)
        for f in db.files:
            if owner.get(f) == name:
                raise ConfigError(f"{source}: file {f} is listed twice in [databases.{name}]")
            if f in owner:
                raise ConfigError(f"{source}: file {f} is listed in both [databases.{owner[f]}] and [databases.{name}]",
                                  hint="a file belongs to one database")
            owner[f] = name
        databases[name] = db
    return databases


def _database(name: str, spec: Any, source: str, base: str, resolve: Callable[[str], str], clustered: bool,
              groups: dict[str, Any]) -> DatabaseConfig:
    where = f"{source}: [databases.{name}]"
    if not _NAME.match(name):
        raise ConfigError(f"{source}: database name {name!r} may only use letters, digits, '_', '.', '-'")
    if not isinstance(spec, dict) or "files" not in spec:
        raise ConfigError(f"{where} needs files = [\"/path/one.db\", ...]")
    extra = set(spec) - set(_DATABASE_KEYS)
    if extra:
        raise ConfigError(f"{source}: unknown key '{sorted(extra)[0]}' in [databases.{name}]",
                          hint="known keys: " + ", ".join(_DATABASE_KEYS))
    foreign_keys = spec.get("foreign_keys", False)
    if not isinstance(foreign_keys, bool):
        raise ConfigError(f"{where} foreign_keys must be true or false")
    durability = spec.get("durability", "durable")
    if durability not in ("durable", "fast", "replicated"):
        raise ConfigError(f"{where} durability must be durable, fast or replicated, got {durability!r}")
    if durability == "replicated" and not spec.get("replicate_to") and not clustered:
        raise ConfigError(f"{where} durability = \"replicated\" needs real-time backup "
                          "to a second server: replicate_to = \"http://host:port\"",
                          hint="see docs/replication.md; or use \"durable\" (acknowledged after fsync)")
    group_commit = spec.get("group_commit", True)
    if not isinstance(group_commit, bool):
        raise ConfigError(f"{where} group_commit must be true or false")
    files_spec = spec["files"]
    if isinstance(files_spec, str) and files_spec.startswith("@"):
        files = read_list_file(resolve(files_spec[1:]), base)
    elif isinstance(files_spec, list) and files_spec and all(isinstance(f, str) and f for f in files_spec):
        files = [resolve(f) for f in files_spec]
    else:
        raise ConfigError(f"{where} files must be a non-empty list of paths or '@listfile'")
    sched = spec.get("schedule")
    if sched is not None:
        Schedule.parse(sched, f"{where} schedule")
    group = spec.get("sync_group")
    if group is not None and not (isinstance(group, str) and group in groups):
        raise ConfigError(f"{where} sync_group = {group!r} names no [sync_groups.NAME]",
                          hint="define the group: [sync_groups.NAME] sites = { site = \"http://host:port\" }")
    db = DatabaseConfig(name, tuple(files), _repo_url(spec.get("repository"), base, source, name), sched,
                        durability, group_commit, foreign_keys, **_replication_keys(spec, where),
                        sync_group=group, **_drill_keys(spec, where), **_key_paths(spec, where, base),
                        **_archive_keys(spec, where, {}))
    if group is not None and (db.replicate_to or db.replica_of):
        raise ConfigError(f"{where} is in a sync group: it cannot also replicate_to or be "
                          "a replica_of", hint="sync already keeps a copy on every site of the group")
    return db


def _drill_keys(spec: dict[str, Any], where: str) -> dict[str, Any]:
    check = spec.get("drill_check", [])
    if isinstance(check, str):
        check = [check]
    if not isinstance(check, list) or not all(isinstance(c, str) and c.strip() for c in check):
        raise ConfigError(f"{where} drill_check must be a list of SQL queries whose first value must be true",
                          hint='for example drill_check = ["SELECT count(*) > 0 FROM accounts"]')
    return {"drill_check": tuple(check), "drill_command": _command(spec.get("drill_command"), f"{where} drill_command")}


def _replication_keys(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """The real-time backup keys of one [databases.NAME] (see docs/replication.md)."""
    out: dict[str, Any] = {}
    to = spec.get("replicate_to")
    if to is not None:
        if not isinstance(to, str) or not _URL.match(to):
            raise ConfigError(f"{where} replicate_to must be the backup daemon's URL, like \"http://host:8750\", "
                              f"got {to!r}")
        out["replicate_to"] = to.rstrip("/")
    of = spec.get("replica_of")
    if of is not None:
        if not isinstance(of, str) or not _NAME.match(of):
            raise ConfigError(f"{where} replica_of must name the primary's database, got {of!r}")
        if to is not None:
            raise ConfigError(f"{where} cannot have both replicate_to and replica_of",
                              hint="a replica does not ship onward in this version; promote it first")
        out["replica_of"] = of
    others = [k for k in ("replicate_schedule", "blackout", "on_failure") if k in spec]
    if others and to is None:
        raise ConfigError(f"{where} {others[0]} needs replicate_to = \"http://host:port\" (the backup daemon)")
    out["replicate_schedule"] = check_pass_schedule(spec.get("replicate_schedule", "continuous"),
                                                    f"{where} replicate_schedule")
    out["blackout"] = check_windows(spec.get("blackout", []), f"{where} blackout")
    out["on_failure"] = _command(spec.get("on_failure"), f"{where} on_failure")
    return out


# -- sections that are their own dataclass ---------------------------------------------------

def _replication(raw: dict[str, Any] | None, databases: dict[str, DatabaseConfig], source: str,
                 resolve: Callable[[str], str]) -> ReplicationConfig:
    raw = raw or {}
    where = f"{source}: [replication]"
    token = raw.get("peer_token_file")
    if token is not None:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{where} peer_token_file must be a path, got {token!r}",
                              hint="for example peer_token_file = \"/etc/bastion/peer.token\"")
        token = resolve(token)
    origin = raw.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin.strip()):
        raise ConfigError(f"{where} origin must be a non-empty name, got {origin!r}",
                          hint="for example origin = \"site-a\"; the default is HOST:DATA_DIR")
    ca = raw.get("peer_ca_file")
    if ca is not None:
        if not isinstance(ca, str) or not ca:
            raise ConfigError(f"{where} peer_ca_file must be a path to a PEM file, got {ca!r}")
        ca = resolve(ca)
        if not os.path.isfile(ca):
            raise ConfigError(f"{where} peer_ca_file {ca} does not exist",
                              hint="the CA certificate (PEM) that signed the backup daemon's tls_cert")
    users = [n for n, d in databases.items() if d.replicate_to or d.replica_of]
    if users and token is None:
        raise ConfigError(f"{source}: [databases.{users[0]}] replicates, so [replication] needs "
                          "peer_token_file = \"path\"",
                          hint="a file holding a shared secret that both daemons read (e.g. `openssl rand -hex 32`)")
    return ReplicationConfig(peer_token_file=token, origin=origin, peer_ca_file=ca)


def _sync(raw: dict[str, Any], databases: dict[str, DatabaseConfig], replication: ReplicationConfig,
          source: str) -> SyncConfig:
    """[sync] site and [sync_groups.NAME]: multi-site sync (docs/sync.md)."""
    groups_raw = raw.get("sync_groups") or {}
    used = {d.sync_group for d in databases.values() if d.sync_group}
    if not groups_raw:
        return SyncConfig()
    site = (raw.get("sync") or {}).get("site") or socket.gethostname()
    if not isinstance(site, str) or not _NAME.match(site):
        raise ConfigError(f"{source}: [sync] site must be a simple name (letters, digits, _ . -), got {site!r}",
                          hint="for example site = \"paris\"; the default is this machine's host name")
    groups = {name: _sync_group(name, g, site, name in used, source) for name, g in groups_raw.items()}
    if used and replication.peer_token_file is None:
        raise ConfigError(f"{source}: sync groups talk over the peer API, so [replication] needs "
                          "peer_token_file = \"path\"", hint="the same secret file on every site")
    return SyncConfig(site=site, groups=groups)


def _sync_group(name: str, g: Any, site: str, used: bool, source: str) -> SyncGroup:
    where = f"{source}: [sync_groups.{name}]"
    if not isinstance(g, dict):
        raise ConfigError(f"{where} must be a table", hint=f"write it as [sync_groups.{name}] with its keys below")
    _unknown_keys(g, _SYNC_GROUP_KEYS, where)
    sites = g.get("sites")
    if not isinstance(sites, dict) or len(sites) < 2 or not all(
            isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and _URL.match(v) for k, v in sites.items()):
        raise ConfigError(f"{where} sites must list at least two sites: {{ name = \"http://host:port\", ... }}",
                          hint="every site of the group lists the same sites, itself included")
    if site not in sites and used:
        raise ConfigError(f"{where} does not list this daemon's site {site!r}",
                          hint="set [sync] site = \"NAME\" to one of: " + ", ".join(sorted(sites)))
    topology = g.get("topology", "mesh" if len(sites) > 2 else "pair")
    hub = g.get("hub")
    if topology not in ("pair", "hub", "mesh"):
        raise ConfigError(f"{where} topology must be \"pair\", \"hub\" or \"mesh\", got {topology!r}",
                          hint="the default is \"pair\" for two sites, \"mesh\" for more")
    if topology == "pair" and len(sites) != 2:
        raise ConfigError(f"{where} topology = \"pair\" needs exactly two sites",
                          hint="use topology = \"mesh\" (every site with every other) or \"hub\"")
    if hub is not None and hub not in sites:
        raise ConfigError(f"{where} hub must be one of the sites ({', '.join(sorted(sites))}), got {hub!r}",
                          hint="for example hub = \"" + sorted(sites)[0] + "\" with topology = \"hub\"")
    if topology == "hub" and hub not in sites:
        raise ConfigError(f"{where} topology = \"hub\" needs hub = one of the sites ({', '.join(sorted(sites))})",
                          hint="for example hub = \"" + sorted(sites)[0] + "\"")
    neighbours = [str(hub)] if topology == "hub" and site != hub else sorted(n for n in sites if n != site)
    from ..sync.check import parse_invariants
    from ..sync.policy import Policy
    from ..sync.site import KEY_STRATEGIES, _counter_spec
    try:
        policy = Policy.of({k: g[k] for k in ("policy", "priority", "update_delete", "resolver") if k in g})
    except UsageError as exc:
        raise ConfigError(f"{where} {exc.message}", hint=exc.hint) from None
    try:       # per-table settings (docs/sync.md): checked here, applied in each file by the daemon
        counters = g.get("counters") or []
        if not isinstance(counters, list):
            raise UsageError(f"counters must be a list of \"table.column\", got {counters!r}",
                             hint="for example counters = [\"accounts.balance\"]")
        counters = [".".join(_counter_spec(c)) for c in counters]
        keys = g.get("keys") or {}
        if not isinstance(keys, dict) or not all(v in KEY_STRATEGIES for v in keys.values()):
            raise UsageError(f"keys must be a table of TABLE = {' or '.join(map(repr, KEY_STRATEGIES))}")
        invariants = parse_invariants(g.get("invariants"), where)
    except UsageError as exc:
        raise ConfigError(f"{where} {exc.message}", hint=exc.hint) from None
    return SyncGroup(name=name, sites={k: v.rstrip("/") for k, v in sites.items()}, topology=topology, hub=hub,
                     neighbours=tuple(neighbours), policy=policy,
                     schedule=check_pass_schedule(g.get("schedule", "continuous"), f"{where} schedule"),
                     blackout=check_windows(g.get("blackout", []), f"{where} blackout"),
                     on_failure=_command(g.get("on_failure"), f"{where} on_failure"),
                     counters=tuple(counters), keys=dict(keys), invariants=invariants)


def _cluster(raw: dict[str, Any] | None, source: str) -> ClusterConfig | None:
    if raw is None:
        return None
    where = f"{source}: [cluster]"
    node = raw.get("node")
    if not isinstance(node, str) or not _NAME.match(node):
        raise ConfigError(f"{where} needs node = \"NAME\" (this node's unique name: letters, digits, _ . -)")
    lease = raw.get("lease", "file")
    if lease not in ("file", "etcd"):
        raise ConfigError(f"{where} lease must be \"file\" (in data_dir) or \"etcd\", got {lease!r}")
    etcd = raw.get("etcd", [])
    if isinstance(etcd, str):
        etcd = [etcd]
    if not isinstance(etcd, list) or not all(isinstance(e, str) and e.startswith(("http://", "https://"))
                                             for e in etcd) or (lease == "etcd" and not etcd):
        raise ConfigError(f"{where} lease = \"etcd\" needs etcd = [\"http://host:2379\", ...]"
                          if lease == "etcd" else f"{where} etcd must be a list of URLs, got {raw.get('etcd')!r}",
                          hint="for example etcd = [\"http://10.0.0.5:2379\"]")
    ttl = parse_duration(raw.get("ttl", "3s"), f"{where} ttl")
    if not 0.5 <= ttl <= 60:
        raise ConfigError(f"{where} ttl must be between 0.5s and 60s, got {raw.get('ttl')!r}")
    peers = raw.get("peers", {})
    if not isinstance(peers, dict) or not all(isinstance(v, str) and ":" in v for v in peers.values()):
        raise ConfigError(f"{where} peers must be a table of node = \"host:port\"",
                          hint="for example peers = { node-a = \"10.0.0.1:8750\", node-b = \"10.0.0.2:8750\" }")
    hooks = {h: _command(raw.get(h), f"{where} {h}") for h in ("on_promote", "on_demote")}
    name = raw.get("name", "bastion")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where} name must be a simple name", hint="letters, digits, _ . -; the default is bastion")
    mode = raw.get("mode", "shared")
    if mode not in ("shared", "replicated"):
        raise ConfigError(f"{where} mode must be \"shared\" (one data_dir for every node) or \"replicated\" "
                          f"(each node its own copy), got {mode!r}")
    if mode == "replicated":
        if lease != "etcd":
            raise ConfigError(f"{where} mode = \"replicated\" needs lease = \"etcd\": the nodes share nothing "
                              "else", hint="see docs/cluster.md, replicated standby")
        if node not in peers or len(peers) != 2:
            raise ConfigError(f"{where} mode = \"replicated\" needs peers = {{ NODE = \"host:port\", ... }} "
                              f"with exactly two nodes, this one ({node}) among them")
    return ClusterConfig(node=node, name=name, mode=mode, lease=lease, etcd=tuple(etcd), ttl=ttl, peers=dict(peers),
                         **hooks)


def _check_replicated_cluster(config: Config, source: str) -> None:
    if not (config.cluster and config.cluster.mode == "replicated"):
        return
    if config.replication.peer_token_file is None:
        raise ConfigError(f"{source}: [cluster] mode = \"replicated\" streams between the nodes, so "
                          "[replication] needs peer_token_file = \"path\"",
                          hint="the same secret file on both nodes (e.g. `openssl rand -hex 32`)")
    for d in config.databases.values():
        if d.replicate_to or d.replica_of:
            raise ConfigError(f"{source}: [databases.{d.name}] in a replicated cluster the nodes replicate to "
                              "each other: remove replicate_to / replica_of")


def _sql(raw: dict[str, Any], source: str) -> SQLSettings:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(SQLSettings):
        if f.name not in raw:
            continue
        if f.type == "float":
            out[f.name] = parse_duration(raw[f.name], f"{source}: [sql] {f.name}")
        else:
            out[f.name] = _whole(raw[f.name], f"{source}: [sql] {f.name}", 1)
    return SQLSettings(**out)


def _users(raw: dict[str, Any], databases: dict[str, DatabaseConfig], source: str) -> dict[str, User]:
    from ..sql.users import ROLES, User, valid_hash
    users = {}
    for name, spec in raw.items():
        where = f"{source}: [users.{name}]"
        if not _NAME.match(name):
            raise ConfigError(f"{where}: user names may only use letters, digits, '_', '.', '-'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table", hint=f"write it as [users.{name}] with its keys below")
        extra = set(spec) - {"password_hash", "access"}
        if extra:
            raise ConfigError(f"{where}: unknown key '{sorted(extra)[0]}'", hint="known keys: password_hash, access")
        ph = spec.get("password_hash")
        if not isinstance(ph, str) or not valid_hash(ph):
            raise ConfigError(f"{where}: password_hash must be a hash made by `bastion passwd`",
                              hint="run `bastion passwd` and paste its output; passwords are never stored in clear")
        access = spec.get("access", {})
        if not isinstance(access, dict):
            raise ConfigError(f"{where}: access must be a table of database = \"read-write\" | \"read-only\"")
        for db, role in access.items():
            if db != "*" and db not in databases:
                raise ConfigError(f"{where}: access names database {db!r}, which is not configured",
                                  hint="known: " + ", ".join(sorted(databases)) + " (or \"*\" for all)")
            if role not in ROLES:
                raise ConfigError(f"{where}: access for {db!r} must be \"read-write\" or \"read-only\", got {role!r}")
        users[name] = User(name, ph, dict(access))
    return users


def _notify(raw: Any, where: str, resolve: Callable[[str], str]) -> NotifyConfig:
    """[notify]: durations in seconds, secrets read from their files."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = _KNOWN["notify"]
    _unknown_keys(raw, known, where)
    out: dict[str, Any] = {"interval": parse_duration(raw.get("interval", "30s"), f"{where} interval")}
    hooks_ = raw.get("webhook", [])
    hooks_ = [hooks_] if isinstance(hooks_, str) else hooks_
    if not isinstance(hooks_, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                               for u in hooks_):
        raise ConfigError(f"{where} webhook must be a URL or a list of URLs (http:// or https://)",
                          hint="for example webhook = \"https://hooks.example.com/bastion\"")
    out["webhook"] = tuple(hooks_)
    if "webhook_secret_file" in raw:
        out["webhook_secret"] = _secret(raw["webhook_secret_file"], f"{where} webhook_secret_file", resolve,
                                        "a file holding the shared secret of the HMAC signature")
    out["webhook_retries"] = _whole(raw.get("webhook_retries", 3), f"{where} webhook_retries", 0, 20)
    if "webhook_timeout" in raw:
        out["webhook_timeout"] = parse_duration(raw["webhook_timeout"], f"{where} webhook_timeout")
    to = raw.get("email_to", [])
    to = [to] if isinstance(to, str) else to
    if not isinstance(to, list) or not all(isinstance(a, str) and "@" in a for a in to):
        raise ConfigError(f"{where} email_to must be an address or a list of addresses",
                          hint="for example email_to = [\"ops@example.com\"]")
    out["email_to"] = tuple(to)
    if to:
        host = raw.get("smtp_host")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where} email_to needs smtp_host = \"mail.example.com\"")
        out["smtp_host"] = host
        out["smtp_port"] = _whole(raw.get("smtp_port", 25), f"{where} smtp_port", 1, 65535)
        out["smtp_starttls"] = _bool(raw.get("smtp_starttls", False), f"{where} smtp_starttls")
        sender = raw.get("email_from")
        out["email_from"] = (_text(sender, f"{where} email_from", "email_from = \"bastion@example.com\"")
                             if sender is not None else f"bastion@{socket.getfqdn()}")
        if "smtp_user" in raw:
            out["smtp_user"] = _text(raw["smtp_user"], f"{where} smtp_user", "smtp_user = \"bastion\"")
            pw = raw.get("smtp_password_file")
            if not pw:
                raise ConfigError(f"{where} smtp_user needs smtp_password_file = \"path\" (never a password in "
                                  "the config)")
            out["smtp_password"] = _secret(pw, f"{where} smtp_password_file", resolve,
                                           "a file holding the SMTP password, readable by the daemon only")
    out["command"] = _command(raw.get("command"), f"{where} command")
    for key in ("backup_max_age", "verify_max_age", "replication_lag"):
        if key in raw:
            out[key] = parse_duration(raw[key], f"{where} {key}")
    if "sync_lag_changes" in raw:
        out["sync_lag_changes"] = _whole(raw["sync_lag_changes"], f"{where} sync_lag_changes", 1)
    if "disk_free_percent" in raw:
        v = raw["disk_free_percent"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 100:
            raise ConfigError(f"{where} disk_free_percent must be a number from 0 to 99, got {v!r}",
                              hint="for example disk_free_percent = 10 (0 turns the check off)")
        out["disk_free_percent"] = float(v)
    if not (out["webhook"] or out["email_to"] or out["command"]):
        raise ConfigError(f"{where} names no channel", hint="set webhook, email_to (with smtp_host) or command")
    return NotifyConfig(**out)


def _secret(path: Any, where: str, resolve: Callable[[str], str], what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where} must be a path, got {path!r}", hint=what)
    full = resolve(path)
    try:
        with open(full, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{where} {full}: {exc.strerror}", hint=what) from None
    if not secret:
        raise ConfigError(f"{where} {full} is empty", hint=what)
    return secret


def _repo_url(value: Any, base: str, source: str, db: str | None) -> str | None:
    """A repository URL; a plain path is a local directory relative to the config file."""
    if value is None:
        return None
    where = f"[databases.{db}] repository" if db else "[backups] repository"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {where} must be a URL such as \"file:///backups\" or \"sftp://host/path\"")
    from ..backup.store import check_url   # the one list of schemes and options; no connection made
    try:
        check_url(value)
    except UsageError as exc:
        raise ConfigError(f"{source}: {where}: {exc.message}", hint=exc.hint) from None
    if "://" in value:
        return value
    return "file://" + os.path.abspath(os.path.join(base, os.path.expanduser(value)))
