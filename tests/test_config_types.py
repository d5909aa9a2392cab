"""Config sections parse into typed dataclasses; a bad value is a ConfigError that names the key.

For each section: one config that uses it, checked field by field (types included), then
several classes of bad input (wrong type, unknown key, out of range, missing required),
each refused at load with the section and key in the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import (ClusterConfig, NotifyConfig, ReplicationConfig, SQLSettings, SyncConfig, SyncGroup,
                            load)
from bastion.errors import EXIT_USAGE, ConfigError


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return load(str(path))


def _refused(tmp_path: Path, text: str, *words: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    err = info.value
    assert err.exit_code == EXIT_USAGE
    assert str(tmp_path / "bastion.toml") in err.message           # which file
    for w in words:                                                 # which section and key, what is wrong
        assert w in err.message, (w, err.message)
    return err


# -- [sql] -----------------------------------------------------------------------------------------

def test_sql_section_is_typed(tmp_path: Path) -> None:
    conf = _load(tmp_path, '[sql]\nidle_timeout = "1m"\nthreads = 4\n')
    assert isinstance(conf.sql, SQLSettings)
    assert conf.sql.idle_timeout == 60.0 and isinstance(conf.sql.idle_timeout, float)
    assert conf.sql.threads == 4 and conf.sql.pool_size == SQLSettings().pool_size   # the rest: defaults
    assert _load(tmp_path, "").sql == SQLSettings()


@pytest.mark.parametrize("body, words", [
    ('threads = "4"', ["[sql] threads", "whole number", "'4'"]),          # wrong type
    ("threads = true", ["[sql] threads", "whole number"]),                # a bool is not a number
    ("pool_size = 0", ["[sql] pool_size", ">= 1"]),                       # out of range
    ('idle_timeout = "soon"', ["[sql] idle_timeout", "not a duration"]),
    ("idle_timeout = -1", ["[sql] idle_timeout", "more than zero"]),
    ("threds = 4", ["unknown key 'threds' in [sql]"]),                    # unknown key
])
def test_bad_sql_values(tmp_path: Path, body: str, words: list[str]) -> None:
    err = _refused(tmp_path, f"[sql]\n{body}\n", *words)
    assert err.hint


# -- [users.NAME] ------------------------------------------------------------------------------------

def test_users_are_typed(tmp_path: Path) -> None:
    from bastion.sql.users import User, hash_password
    h = hash_password("secret")
    conf = _load(tmp_path, f'[databases.bank]\nfiles = ["{tmp_path}/bank.db"]\n'
                           f'[users.alice]\npassword_hash = "{h}"\naccess = {{ bank = "read-only" }}\n')
    alice = conf.users["alice"]
    assert isinstance(alice, User) and alice.password_hash == h and alice.access == {"bank": "read-only"}


@pytest.mark.parametrize("body, words", [
    ('password_hash = "plain"', ["[users.alice]", "password_hash"]),            # wrong value
    ("access = { bank = \"read-write\" }", ["[users.alice]", "password_hash"]),  # missing required
    ('password_hash = "H"\naccess = "all"', ["[users.alice]", "access must be a table"]),
    ('password_hash = "H"\naccess = { shop = "read-only" }', ["[users.alice]", "'shop'", "not configured"]),
    ('password_hash = "H"\naccess = { bank = "admin" }', ["[users.alice]", "access for 'bank'", "'admin'"]),
    ('password_hash = "H"\nrole = "admin"', ["[users.alice]", "unknown key 'role'"]),
])
def test_bad_users(tmp_path: Path, body: str, words: list[str]) -> None:
    from bastion.sql.users import hash_password
    body = body.replace('"H"', f'"{hash_password("x")}"')
    _refused(tmp_path, f'[databases.bank]\nfiles = ["{tmp_path}/bank.db"]\n[users.alice]\n{body}\n', *words)


# -- [cluster] -------------------------------------------------------------------------------------

def test_cluster_section_is_typed(tmp_path: Path) -> None:
    conf = _load(tmp_path, '[cluster]\nnode = "n1"\nlease = "etcd"\netcd = "http://127.0.0.1:2379"\nttl = "2s"\n'
                           'peers = { n1 = "127.0.0.1:1", n2 = "127.0.0.1:2" }\non_promote = ["/bin/true", "x"]\n')
    c = conf.cluster
    assert isinstance(c, ClusterConfig)
    assert (c.node, c.name, c.mode, c.lease) == ("n1", "bastion", "shared", "etcd")
    assert c.etcd == ("http://127.0.0.1:2379",) and c.ttl == 2.0
    assert c.peers == {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2"}
    assert c.on_promote == ("/bin/true", "x") and c.on_demote is None
    assert _load(tmp_path, "").cluster is None


@pytest.mark.parametrize("body, words", [
    ('lease = "file"', ["[cluster]", "needs node"]),                                  # missing required
    ('node = "n1"\nttl = "2m"', ["[cluster] ttl", "between 0.5s and 60s"]),            # out of range
    ('node = "n1"\nttl = true', ["[cluster] ttl"]),                                    # wrong type
    ('node = "n1"\nmode = "active"', ["[cluster] mode", "'active'"]),
    ('node = "n1"\npeers = ["a:1"]', ["[cluster] peers"]),
    ('node = "n1"\netcd = 5', ["[cluster] etcd", "5"]),                # wrong type, even with the file lease
    ('node = "n1"\non_promote = []', ["[cluster] on_promote", "command"]),            # an empty argv
    ('node = "n1"\non_demote = 7', ["[cluster] on_demote", "command"]),
    ('node = "n1"\nnodes = 2', ["unknown key 'nodes' in [cluster]"]),                 # unknown key
])
def test_bad_cluster(tmp_path: Path, body: str, words: list[str]) -> None:
    _refused(tmp_path, f"[cluster]\n{body}\n", *words)


# -- [replication] ----------------------------------------------------------------------------------

def test_replication_section_is_typed(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    conf = _load(tmp_path, '[replication]\npeer_token_file = "tok"\norigin = "site-a"\npeer_ca_file = "ca.pem"\n')
    r = conf.replication
    assert isinstance(r, ReplicationConfig)
    assert r == ReplicationConfig(str(tmp_path / "tok"), "site-a", str(tmp_path / "ca.pem"))
    assert _load(tmp_path, "").replication == ReplicationConfig()


@pytest.mark.parametrize("body, words", [
    ("[replication]\norigin = 5", ["[replication] origin", "5"]),                        # wrong type
    ('[replication]\npeer_token_file = ""', ["[replication] peer_token_file", "path"]),
    ('[replication]\npeer_ca_file = "nope.pem"', ["[replication] peer_ca_file", "does not exist"]),
    ('[replication]\ntoken = "x"', ["unknown key 'token' in [replication]"]),             # unknown key
    ('[databases.bank]\nfiles = ["/x/bank.db"]\nreplicate_to = "http://h:1"',            # missing required
     ["[databases.bank] replicates", "peer_token_file"]),
])
def test_bad_replication(tmp_path: Path, body: str, words: list[str]) -> None:
    _refused(tmp_path, body + "\n", *words)


# -- [sync] and [sync_groups.NAME] ----------------------------------------------------------------

SYNC = ('[replication]\npeer_token_file = "tok"\n[sync]\nsite = "a"\n'
        '[databases.bank]\nfiles = ["/x/bank.db"]\nsync_group = "g"\n'
        '[sync_groups.g]\nsites = { a = "http://127.0.0.1:1/", b = "http://127.0.0.1:2", c = "http://127.0.0.1:3" }\n')


def test_sync_sections_are_typed(tmp_path: Path) -> None:
    from bastion.sync.policy import Policy
    conf = _load(tmp_path, SYNC + 'topology = "hub"\nhub = "b"\nschedule = "Every 5s"\nblackout = "22:00-23:00"\n'
                                  'on_failure = "logger x"\ncounters = ["accounts.balance"]\n'
                                  'keys = { audit = "rekey" }\n')
    assert isinstance(conf.sync, SyncConfig) and conf.sync.site == "a"
    g = conf.sync.groups["g"]
    assert isinstance(g, SyncGroup) and g.name == "g"
    assert g.sites == {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2", "c": "http://127.0.0.1:3"}
    assert (g.topology, g.hub, g.neighbours) == ("hub", "b", ("b",))      # a spoke talks to the hub only
    assert isinstance(g.policy, Policy)
    assert g.schedule == "every 5s" and g.blackout == ("22:00-23:00",) and g.on_failure == "logger x"
    assert g.counters == ("accounts.balance",) and g.keys == {"audit": "rekey"} and g.invariants == {}
    mesh = _load(tmp_path, SYNC).sync.groups["g"]
    assert (mesh.topology, mesh.neighbours) == ("mesh", ("b", "c"))
    assert _load(tmp_path, "").sync == SyncConfig()


@pytest.mark.parametrize("body, words", [
    ('on_failure = 5', ["[sync_groups.g]", "on_failure", "command"]),                  # wrong type
    ('blackout = ["25:00-26:00"]', ["[sync_groups.g]", "blackout", "not a time of day"]),   # out of range
    ('blackout = 22', ["[sync_groups.g]", "blackout", "HH:MM-HH:MM"]),
    ('schedule = "sometimes"', ["[sync_groups.g]", "schedule", "'sometimes'"]),
    ('schedule = "every 0s"', ["[sync_groups.g]", "schedule", "more than zero"]),
    ('topology = "ring"', ["[sync_groups.g]", "topology", "'ring'"]),
    ('topology = "hub"', ["[sync_groups.g]", "hub = one of the sites"]),                 # missing required
    ('topology = "hub"\nhub = 5', ["[sync_groups.g]", "hub must be one of the sites", "5"]),   # wrong type
    ('hub = "z"', ["[sync_groups.g]", "hub must be one of the sites", "'z'"]),
    ('counters = "accounts.balance"', ["[sync_groups.g]", "counters must be a list"]),
    ('neighbors = ["b"]', ["[sync_groups.g]", "unknown key 'neighbors'"]),               # unknown key
])
def test_bad_sync_group(tmp_path: Path, body: str, words: list[str]) -> None:
    err = _refused(tmp_path, SYNC + body + "\n", *words)
    assert err.hint


def test_bad_sync_site_and_sites(tmp_path: Path) -> None:
    _refused(tmp_path, SYNC.replace('site = "a"', "site = 5"), "[sync] site", "5")
    _refused(tmp_path, SYNC.replace('site = "a"', 'site = "z"'), "[sync_groups.g]", "does not list", "'z'")
    one = SYNC.replace(', b = "http://127.0.0.1:2", c = "http://127.0.0.1:3"', "")
    _refused(tmp_path, one, "[sync_groups.g] sites", "at least two")                     # missing required
    _refused(tmp_path, SYNC.replace("[sync]\n", "[sync]\nname = \"a\"\n"), "unknown key 'name' in [sync]")


# -- [notify] ----------------------------------------------------------------------------------------

def test_notify_section_is_typed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "pw").write_text("hunter2\n")
    conf = _load(tmp_path, '[notify]\nwebhook = "http://127.0.0.1:9/h"\nwebhook_secret_file = "secret"\n'
                           'email_to = "ops@example.com"\nsmtp_host = "mail"\nsmtp_port = 587\nsmtp_starttls = true\n'
                           'smtp_user = "bastion"\nsmtp_password_file = "pw"\ninterval = "10s"\n'
                           'backup_max_age = "26h"\nsync_lag_changes = 100\ndisk_free_percent = 10\n'
                           'command = ["/bin/echo", "alert"]\n')
    n = conf.notify
    assert isinstance(n, NotifyConfig)
    assert n.webhook == ("http://127.0.0.1:9/h",) and n.webhook_secret == "s3cret"
    assert n.email_to == ("ops@example.com",) and (n.smtp_host, n.smtp_port, n.smtp_starttls) == ("mail", 587, True)
    assert (n.smtp_user, n.smtp_password) == ("bastion", "hunter2")
    assert n.interval == 10.0 and n.backup_max_age == 26 * 3600.0 and n.verify_max_age is None
    assert n.sync_lag_changes == 100 and n.disk_free_percent == 10.0 and isinstance(n.disk_free_percent, float)
    assert n.command == ("/bin/echo", "alert")
    assert "s3cret" not in repr(n) and "hunter2" not in repr(n)       # secrets stay out of logs
    assert _load(tmp_path, "").notify is None


MAIL = 'email_to = "ops@example.com"\nsmtp_host = "mail"\n'


@pytest.mark.parametrize("body, words", [
    (MAIL + 'smtp_starttls = "yes"', ["[notify] smtp_starttls", "true or false"]),       # wrong type
    (MAIL + "smtp_port = true", ["[notify] smtp_port"]),
    (MAIL + "smtp_port = 70000", ["[notify] smtp_port", "70000"]),                        # out of range
    (MAIL + "email_from = 5", ["[notify] email_from"]),
    (MAIL + "smtp_user = 5", ["[notify] smtp_user"]),
    ('webhook = "http://x"\nwebhook_retries = 21', ["[notify] webhook_retries", "0 to 20"]),
    ('webhook = "http://x"\nsync_lag_changes = 0', ["[notify] sync_lag_changes", ">= 1"]),
    ('webhook = "http://x"\ndisk_free_percent = 100', ["[notify] disk_free_percent"]),
    ('webhook = "http://x"\ncommand = []', ["[notify] command", "command"]),
    ('email_to = "ops@example.com"', ["[notify]", "smtp_host"]),                          # missing required
    ('webhook = "http://x"\nwebhok = "http://y"', ["unknown key 'webhok'"]),               # unknown key
])
def test_bad_notify(tmp_path: Path, body: str, words: list[str]) -> None:
    _refused(tmp_path, f"[notify]\n{body}\n", *words)


# -- [daemon] ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, words", [
    ("token_file = 5", ["[daemon] token_file", "path"]),            # was a TypeError at load, not a ConfigError
    ("data_dir = 5", ["[daemon] data_dir", "path"]),
    ('listen = "127.0.0.1:99999"', ["[daemon] listen", "out of range"]),
    ('tls_cert = "c.pem"', ["[daemon] TLS", "tls_key"]),
])
def test_bad_daemon(tmp_path: Path, body: str, words: list[str]) -> None:
    _refused(tmp_path, f"[daemon]\n{body}\n", *words)


# -- the services take their sections, not the daemon ------------------------------------------------

def test_replication_and_sync_are_built_from_their_parts(tmp_path: Path) -> None:
    from bastion.replication.service import Replication
    from bastion.sync.service import Sync
    (tmp_path / "tok").write_text("t" * 32 + "\n")
    conf = _load(tmp_path, SYNC.replace('"/x/bank.db"', f'"{tmp_path}/bank.db"'))
    # no Daemon anywhere: the config, the catalog, continuous operations, the SQL service, the token
    rep = Replication(conf, catalog=None, contops=None, sql=None)  # type: ignore[arg-type]
    assert rep.peer_token == "t" * 32 and rep.shippers == {}
    sync = Sync(conf, catalog=None, contops=None, token=rep.peer_token)  # type: ignore[arg-type]
    try:
        s = sync.get("bank")
        assert s.group is conf.sync.groups["g"] and s.site == "a" and s.group.neighbours == ("b", "c")
    finally:
        sync.stop()
    with pytest.raises(ConfigError, match="peer_token_file"):
        Sync(conf, catalog=None, contops=None, token=None)  # type: ignore[arg-type]
