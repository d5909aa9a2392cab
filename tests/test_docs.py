"""The documentation stays true: every command, option and config key is documented, every
relative link resolves, every TOML example loads, and the behaviours the user guide promises
(in its caveats and in recover --discard-changes) hold against a real daemon and application."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path
from collections.abc import Iterator

import click
import pytest

from bastion import config as cfg
from bastion.cli import cli
from bastion.errors import ConfigError

from support import check_bank

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "user-guide.md"
SQLITE3 = shutil.which("sqlite3") or "/usr/bin/sqlite3"

# Commands whose full reference lives on another page. The user guide still names each of
# them (its command index); their options may be documented there or on that page. A page
# that does not exist yet leaves the user guide as the only place.
ELSEWHERE = {
    "backup": "backups.md", "backups": "backups.md", "backups list": "backups.md",
    "verify": "backups.md", "restore": "backups.md", "prune": "backups.md",
    "sql": "sql.md", "passwd": "sql.md",
    "cluster": "cluster.md", "cluster status": "cluster.md", "cluster switchover": "cluster.md",
}
PARTIAL = re.compile(r"<!--\s*partial:\s*\S.*-->")


def markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        path = prefix + (name,)
        yield " ".join(path), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path)


def mentions(text: str, word: str) -> bool:
    """``word`` (a command path or an option like -c / --max-duration) as a whole token."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# -- commands and options ------------------------------------------------------------

def test_every_command_is_in_the_user_guide():
    guide = GUIDE.read_text()
    missing = [path for path, _ in commands(cli) if f"`bastion {path}" not in guide]
    assert not missing, f"commands not named in {GUIDE.name} (add them to its command index): {missing}"


def test_every_option_is_documented():
    pages = {p.name: p.read_text() for p in DOCS.glob("*.md")}
    missing = []
    # the root's own options, and -h/--help, which every command inherits from the root's settings
    root_opts = [o for p in cli.params if isinstance(p, click.Option) for o in p.opts]
    root_opts += cli.context_settings.get("help_option_names", ["--help"])
    checks = [("(bastion)", root_opts, [GUIDE.name])]
    for path, cmd in commands(cli):
        opts = [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts]
        where = [GUIDE.name] + ([ELSEWHERE[path]] if ELSEWHERE.get(path) in pages else [])
        checks.append((path, opts, where))
    for path, opts, where in checks:
        for opt in opts:
            if not any(mentions(pages[w], opt) for w in where):
                missing.append(f"bastion {path} {opt} (looked in {', '.join(where)})")
    assert not missing, "undocumented options:\n" + "\n".join(missing)


def test_the_option_walk_sees_what_click_parses():
    # guards the two tests above: if the walk found nothing, they would pass vacuously
    found = dict(commands(cli))
    assert {"startbu", "endbu", "exec", "recover", "freeze", "thaw", "backups list"} <= set(found)
    startbu_opts = {o for p in found["startbu"].params for o in getattr(p, "opts", [])}
    assert {"--max-duration", "--all", "--json", "--config"} <= startbu_opts
    assert mentions("run `bastion startbu --max-duration 5`", "--max-duration")
    assert not mentions("--max-duration-x", "--max-duration") and not mentions("--config", "-c")


# -- config keys -----------------------------------------------------------------------

def discovered_keys(section: str, tmp_path: Path) -> set[str]:
    """Keys of a [section.NAME] sub-table, as the loader itself lists them when it refuses one."""
    for body in ('files = ["/srv/app/x.db"]\n', ""):
        path = tmp_path / f"probe-{section}.toml"
        path.write_text(f"[{section}.probe]\n{body}zz_not_a_key = 1\n")
        try:
            cfg.load(str(path))
        except ConfigError as exc:
            if exc.hint and exc.hint.startswith("known keys:"):
                return {k.strip() for k in exc.hint[len("known keys:"):].split(",")}
    raise AssertionError(f"cannot find the keys of [{section}.NAME]: the loader no longer lists them "
                         "when it refuses an unknown key; update this test")


def config_keys(tmp_path: Path) -> dict[str, set[str]]:
    out = {}
    for section, keys in cfg.parse._KNOWN.items():
        out[section] = set(keys) if keys is not None else discovered_keys(section, tmp_path)
    return out


def test_every_config_key_is_in_the_user_guide(tmp_path):
    guide = GUIDE.read_text()
    keys = config_keys(tmp_path)
    assert {"max_duration", "gate_timeout", "rollin_timeout"} <= keys["contops"]
    assert "files" in keys["databases"]
    missing = [f"[{s}]" for s in keys if f"`[{s}]`" not in guide and f"`[{s}.NAME]`" not in guide]
    for section, names in keys.items():
        for key in sorted(names):
            if f"`{key}`" not in guide and not re.search(rf"^{re.escape(key)} = ", guide, re.M):
                missing.append(f"[{section}] {key}")
    assert not missing, f"config sections/keys not documented in {GUIDE.name}: {missing}"


# -- links -------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text()), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_relative_links_resolve():
    broken = []
    checked = 0
    for md in markdown_files():
        text = FENCE.sub("", md.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    assert checked > 20, "the link scan found almost no links: is the pattern broken?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slugs_follow_github():
    assert slug("recover --discard-changes") == "recover---discard-changes"
    assert slug("Continuous operations: why a held read transaction") == \
        "continuous-operations-why-a-held-read-transaction"
    assert slug("Wiring Bastion into your backup tool") == "wiring-bastion-into-your-backup-tool"


# -- TOML examples -------------------------------------------------------------------------

def toml_blocks() -> Iterator[tuple[str, str, bool]]:
    for md in markdown_files():
        text = md.read_text()
        for m in re.finditer(r"^```toml[^\n]*\n(.*?)^```", text, re.S | re.M):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text[:m.start()].count("\n") + 1
            yield f"{md.relative_to(ROOT)}:{line}", m.group(1), bool(PARTIAL.search(before))


def test_there_are_toml_examples_to_check():
    blocks = list(toml_blocks())
    assert sum(1 for _, _, partial in blocks if not partial) >= 4, blocks


@pytest.mark.parametrize("where, text, partial", [pytest.param(*b, id=b[0]) for b in toml_blocks()])
def test_toml_example_parses_and_loads(where, text, partial, tmp_path):
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where}: not valid TOML: {exc}")
    if partial:   # marked <!-- partial: why --> in the page: a fragment, parsed only
        return
    for name in re.findall(r'files\s*=\s*"@([^"]+)"', text):   # list files the example names
        (tmp_path / name).write_text("/srv/app/listed.db\n")
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    try:
        cfg.load(str(path))
    except ConfigError as exc:
        pytest.fail(f"{where}: the loader refuses this example: {exc.message} (hint: {exc.hint}); "
                    "fix it, or mark it <!-- partial: why --> if it is a fragment")


# -- behaviours the user guide promises ------------------------------------------------------

def test_guide_minimal_config_is_the_tested_one():
    """The guide's minimal config is word for word the one tests/test_config.py loads."""
    block = next(text for where, text, _ in toml_blocks() if where.startswith("docs/user-guide.md"))
    assert block == '[databases.bank]\nfiles = ["/srv/app/bank.db", "/srv/app/audit.db"]\n'


def test_refused_discard_makes_an_active_session_interrupted(daemon, bank):
    """Caveat: a refused --discard-changes has closed the daemon's connections (the hold), so
    the copy under way cannot be trusted and endbu must say so."""
    bank.start()
    try:
        assert daemon.cli("startbu", "bank").code == 0
        r = daemon.cli("recover", "bank", "--discard-changes")
        assert r.code == 2 and f"open in process {bank.proc.pid}" in r.err, r.err
        st = daemon.cli("status", "--json").json
        statuses = {f["contops"]["status"] for db in st["databases"] for f in db["files"] if f["contops"]}
        assert statuses == {"interrupted"}, st
        r = daemon.cli("endbu", "bank")
        assert r.code == 2, (r.out, r.err)
        assert "recover --discard-changes released the hold" in r.err and "is not consistent" in r.err, r.err
    finally:
        stats = bank.stop()
    assert stats["errors"] == {}
    res = check_bank(bank.dir)
    assert res["ok"] and res["transfers"] == stats["commits"], res


def test_discard_refuses_while_frozen_and_the_freeze_holds(daemon, bank):
    bank.start()
    try:
        assert daemon.cli("startbu", "bank").code == 0
        assert daemon.cli("freeze", "bank", "--timeout", "60").code == 0
        r = daemon.cli("recover", "bank", "--discard-changes")
        assert r.code == 2 and "frozen since" in r.err and "would end the freeze" in r.err, r.err
        n0 = bank.transfers()
        time.sleep(0.5)
        assert bank.transfers() == n0, "writers went on: the refused recover ended the freeze"
        r = daemon.cli("thaw", "bank", "--json")
        assert r.code == 0 and r.json["consistent"], r.out
        r = daemon.cli("endbu", "bank", "--json")
        assert r.code == 0 and r.json["consistent"], r.out
    finally:
        stats = bank.stop()
    assert stats["errors"] == {}
    res = check_bank(bank.dir)
    assert res["ok"] and res["transfers"] == stats["commits"], res


def test_journal_mode_delete_fails_on_a_protected_file(daemon, bank):
    con = sqlite3.connect(bank.bank, timeout=2)
    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            con.execute("PRAGMA journal_mode=DELETE").fetchall()
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()
    assert check_bank(bank.dir)["ok"]


def test_sqlite3_shell_without_timeout_fails_during_a_freeze(daemon, bank):
    assert daemon.cli("freeze", "bank", "--timeout", "30").code == 0
    try:
        sql = "UPDATE meta SET value = value WHERE key = 'accounts';"
        p = subprocess.run([SQLITE3, str(bank.bank), sql], capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "database is locked" in p.stderr, (p.returncode, p.stderr)
        # with .timeout it waits for the thaw instead, and succeeds
        waiter = subprocess.Popen([SQLITE3, "-cmd", ".timeout 30000", str(bank.bank), sql],
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiter.poll() is None, "the write did not wait for the thaw"
    finally:
        r = daemon.cli("thaw", "bank")
    assert r.code == 0, r.err
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert check_bank(bank.dir)["ok"]
