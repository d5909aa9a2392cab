"""SQL: the interactive shell / -c through the daemon's SQL server, and passwd."""

from __future__ import annotations

import json
import os
import sys

import click

from .. import config as cfg
from ..errors import BastionError, UsageError
from ..tls import trust
from .base import cli, common, emit, err, out


@cli.command()
@click.argument("database")
@click.option("-c", "--command", "commands", multiple=True, help="Run this SQL and exit (repeatable).")
@click.option("--dsn", default=None,
              help="Connect to bastion://user@host:port,.../DB instead of this config's daemon with its admin token.")
@click.option("--user", default=None, help="Connect as this [users] user (password from $BASTION_PASSWORD or asked).")
@common
def sql(conf: cfg.Config, as_json: bool, database: str, commands: tuple[str, ...], dsn: str | None,
        user: str | None) -> None:
    """SQL on DATABASE through the daemon's SQL server: -c "..." or an interactive shell."""
    from .. import client
    from ..shell import interactive, run_one, show
    # this daemon first, then the other nodes of its cluster: the driver follows the active one
    peers = conf.cluster.peers if conf.cluster else {}
    hosts = ",".join(dict.fromkeys([conf.base_url.split("://", 1)[1], *peers.values()]))
    scheme = "bastions" if conf.tls_cert else "bastion"
    try:
        if dsn:
            con = client.connect(dsn, ca=conf.tls_ca or conf.tls_cert)
        elif user:
            pw = os.environ.get("BASTION_PASSWORD")
            if pw is None:
                pw = click.prompt(f"password for {user}", hide_input=True, err=True)
            con = client.connect(f"{scheme}://{user}@{hosts}/{database}", password=pw, ca=conf.tls_ca or conf.tls_cert,
                                 autocommit=True, failover_timeout=5)
        else:
            from ..daemon.auth import read_token
            con = client.connect(f"{scheme}://{hosts}/{database}", token=read_token(conf.token_file),
                                 ca=conf.tls_ca or conf.tls_cert, autocommit=True, failover_timeout=5)
        con.autocommit = True
    except client.Error as exc:
        if dsn:
            raise BastionError(str(exc), hint="check the DSN's hosts and credentials (docs/sql.md, DSN)") from None
        raise _no_sql_node(conf, exc) from None
    try:
        if not commands:
            sys.exit(interactive(con, out, err))
        results = []
        for c in commands:
            try:
                results.append(run_one(con, c))
            except client.Error as exc:
                raise BastionError(f"{exc.message}", hint=exc.hint,
                                   details={"completed": len(results)}) from None
        if as_json:
            print(json.dumps({"database": database, "results": results}, indent=2, default=lambda b: b.hex()))
        else:
            for r in results:
                show(out, r)
    finally:
        con.close()


def _no_sql_node(conf: cfg.Config, exc: Exception) -> BastionError:
    """Why `bastion sql` found no node to talk to, and what to do: the daemon is down, or
    this node is passive (then: which node is active, if any answers)."""
    from ..daemon.auth import read_token
    from ..peer import PeerClient
    here = PeerClient(conf.base_url, timeout=3.0, verify=trust(conf.tls_ca or conf.tls_cert))
    try:
        try:
            health = here.get("/v1/health")
        except BastionError:
            return BastionError(f"{exc}", hint=f"is the daemon running? nothing answers on {conf.listen} "
                                               "(start it with `bastion serve`; `bastion status` checks it)")
        if not conf.cluster or not isinstance(health, dict) or health.get("role") == "active":
            return BastionError(str(exc))
        name, role = conf.cluster.node, health.get("role")
        holder = None
        try:
            st = here.get("/v1/cluster/status", headers={"Authorization": f"Bearer {read_token(conf.token_file)}"})
            holder = ((st.get("lease") or {}).get("holder") or {}).get("node")
        except (BastionError, AttributeError):
            pass
    finally:
        here.close()
    peers = conf.cluster.peers
    if holder and holder != name:
        where = f" at {peers[holder]}" if holder in peers else " (not in this config's [cluster] peers)"
        return BastionError(f"this node ({name}) is {role}; the active node is {holder}{where}, and it did not "
                            f"answer: {exc}",
                            hint=f"run the command on {holder}, or pass --dsn bastion://HOST:PORT/DATABASE with its "
                                 "address; `bastion cluster status` shows every node")
    return BastionError(f"this node ({name}) is {role} and no node is active: {exc}",
                        hint="see `bastion cluster status`; a node becomes active once it holds the lease")


@cli.command()
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking.")
@common
def passwd(conf: cfg.Config, as_json: bool, password_stdin: bool) -> None:
    """Make a password hash for a [users] entry of the config (the password itself is never stored)."""
    from ..sql.users import hash_password
    if password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    if len(pw) < 8:
        raise UsageError("the password is too short (less than 8 characters)", hint="choose a longer one")
    h = hash_password(pw)
    emit({"password_hash": h, "exit_code": 0}, as_json,
         lambda d: out.print(f'password_hash = "{d["password_hash"]}"'))
