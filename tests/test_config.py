"""Config parsing: bastion.config.load on real files, and the CLI's answer to a broken config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bastion.config import load, parse_duration
from bastion.errors import ConfigError, EXIT_USAGE

from support import PY


def write(tmp_path: Path, text: str, name: str = "bastion.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def fails(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    err = info.value
    assert err.exit_code == EXIT_USAGE
    return err


def test_minimal_config_works_as_written(tmp_path):
    path = write(tmp_path, '[databases.bank]\nfiles = ["/srv/app/bank.db", "/srv/app/audit.db"]\n')
    conf = load(str(path))
    assert conf.source == str(path)
    assert list(conf.databases) == ["bank"]
    assert conf.databases["bank"].files == ("/srv/app/bank.db", "/srv/app/audit.db")
    # everything else is the embedded default, relative to the config's directory
    assert conf.listen == "127.0.0.1:8750"
    assert conf.data_dir == str(tmp_path / "var")
    assert conf.token_file == str(tmp_path / "var" / "token")
    assert conf.contops_max_duration == 4 * 3600
    assert conf.freeze_timeout == 10


def test_full_config_and_relative_paths(tmp_path):
    path = write(tmp_path, """
[daemon]
listen = "127.0.0.1:9123"
data_dir = "state"

[contops]
max_duration = "1h30m"
gate_timeout = "250ms"
rollin_timeout = 42

[freeze]
timeout = "2m"

[databases.bank]
files = ["app/bank.db", "~/audit.db"]

[databases.shop]
files = ["/abs/shop.db"]
""")
    conf = load(str(path))
    assert (conf.listen_host, conf.listen_port) == ("127.0.0.1", 9123)
    assert conf.data_dir == str(tmp_path / "state")
    assert conf.contops_max_duration == 5400
    assert conf.gate_timeout == 0.25
    assert conf.rollin_timeout == 42
    assert conf.freeze_timeout == 120
    assert conf.databases["bank"].files == (str(tmp_path / "app" / "bank.db"),
                                            os.path.expanduser("~/audit.db"))
    assert conf.databases["shop"].files == ("/abs/shop.db",)


def test_no_config_file_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = load(None)
    assert conf.source == "embedded default"
    assert conf.databases == {}
    assert conf.data_dir == str(tmp_path / "var")


def test_listfile_in_files(tmp_path):
    (tmp_path / "files.txt").write_text("# the bank\nbank.db\n\n  /abs/audit.db  \n")
    conf = load(str(write(tmp_path, '[databases.bank]\nfiles = "@files.txt"\n')))
    assert conf.databases["bank"].files == (str(tmp_path / "bank.db"), "/abs/audit.db")


def test_listfile_missing_or_empty(tmp_path):
    err = fails(tmp_path, '[databases.bank]\nfiles = "@nope.txt"\n')
    assert str(tmp_path / "nope.txt") in err.message and "does not exist" in err.message
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    err = fails(tmp_path, '[databases.bank]\nfiles = "@empty.txt"\n')
    assert "empty.txt" in err.message and "names no file" in err.message


def test_unknown_section(tmp_path):
    err = fails(tmp_path, '[deamon]\nlisten = "127.0.0.1:1"\n')
    assert "unknown section [deamon]" in err.message
    assert "[daemon]" in err.hint  # says which sections exist
    assert str(tmp_path / "bastion.toml") in err.message


def test_unknown_key(tmp_path):
    err = fails(tmp_path, '[contops]\nmax_duraton = "1h"\n')
    assert "unknown key 'max_duraton' in [contops]" in err.message
    assert "max_duration" in err.hint
    err = fails(tmp_path, '[databases.bank]\nfiles = ["/a.db"]\nfile = ["/b.db"]\n')
    assert "unknown key 'file' in [databases.bank]" in err.message


@pytest.mark.parametrize("listen, words", [
    ('"localhost"', "must be 'HOST:PORT'"),
    ("8750", "must be 'HOST:PORT'"),
    ('"127.0.0.1:http"', "is not a number"),
    ('"127.0.0.1:0"', "out of range"),
    ('"127.0.0.1:70000"', "out of range"),
])
def test_bad_listen(tmp_path, listen, words):
    err = fails(tmp_path, f"[daemon]\nlisten = {listen}\n")
    assert "[daemon] listen" in err.message and words in err.message


def test_ipv6_listen(tmp_path):
    conf = load(str(write(tmp_path, '[daemon]\nlisten = "[::1]:9000"\n')))
    assert (conf.listen_host, conf.listen_port) == ("::1", 9000)
    assert conf.base_url == "http://[::1]:9000"


@pytest.mark.parametrize("key, value", [
    ("max_duration", '"5x"'), ("max_duration", '"0s"'), ("max_duration", "-3"), ("max_duration", '""'),
    ("max_duration", "true"), ("gate_timeout", '"ten seconds"'), ("rollin_timeout", "0"),
    ("max_duration", "inf"), ("max_duration", "nan"), ("max_duration", '"inf"'),
])
def test_bad_durations(tmp_path, key, value):
    err = fails(tmp_path, f"[contops]\n{key} = {value}\n")
    assert f"[contops] {key}" in err.message
    # the message names the config file, like every other config error
    assert str(tmp_path / "bastion.toml") in err.message


def test_bad_freeze_timeout(tmp_path):
    err = fails(tmp_path, '[freeze]\ntimeout = "soon"\n')
    assert "[freeze] timeout" in err.message and "'soon' is not a duration" in err.message
    assert "30s" in err.hint


def test_durations():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800
    assert parse_duration(1.5) == 1.5
    assert parse_duration(" 90 s ") == 90


def test_duplicate_files_across_databases(tmp_path):
    err = fails(tmp_path, """
[databases.bank]
files = ["/srv/app/bank.db"]
[databases.other]
files = ["/srv/app/../app/bank.db"]
""")
    assert "/srv/app/bank.db" in err.message
    assert "[databases.bank]" in err.message and "[databases.other]" in err.message
    assert "one database" in err.hint


def test_duplicate_file_within_a_database(tmp_path):
    err = fails(tmp_path, '[databases.bank]\nfiles = ["/srv/bank.db", "/srv/bank.db"]\n')
    assert "/srv/bank.db" in err.message and "twice" in err.message


def test_duplicate_between_listfile_and_list(tmp_path):
    (tmp_path / "files.txt").write_text("/srv/bank.db\n")
    err = fails(tmp_path, '[databases.a]\nfiles = "@files.txt"\n[databases.b]\nfiles = ["/srv/bank.db"]\n')
    assert "/srv/bank.db" in err.message and "[databases.a]" in err.message


@pytest.mark.parametrize("spec, words", [
    ('[databases.bank]\n', "needs files"),
    ('[databases.bank]\nfiles = []\n', "non-empty list"),
    ('[databases.bank]\nfiles = "bank.db"\n', "non-empty list"),
    ('[databases.bank]\nfiles = [1, 2]\n', "non-empty list"),
    ('[databases."my bank"]\nfiles = ["/a.db"]\n', "may only use"),
    ('[databases]\nbank = "/a.db"\n', "needs files"),
    ('daemon = 3\n', "must be a table"),
])
def test_bad_databases(tmp_path, spec, words):
    err = fails(tmp_path, spec)
    assert words in err.message


def test_not_toml_and_missing(tmp_path):
    err = fails(tmp_path, '[daemon\nlisten = "x"\n')
    assert "not valid TOML" in err.message and str(tmp_path / "bastion.toml") in err.message
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "missing.toml"))
    assert "missing.toml" in info.value.message and "does not exist" in info.value.message


def test_cli_with_broken_config_exits_3(tmp_path):
    broken = write(tmp_path, '[contops]\nmax_duration = "forever"\n', "broken.toml")
    p = subprocess.run([PY, "-m", "bastion", "status", "--config", str(broken)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert p.stdout == ""
    assert "[contops] max_duration" in p.stderr and "'forever' is not a duration" in p.stderr
    assert str(broken) in p.stderr
    assert "hint:" in p.stderr
    # the group-level --config means the same
    p = subprocess.run([PY, "-m", "bastion", "--config", str(broken), "startbu", "bank"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "'forever' is not a duration" in p.stderr
    p = subprocess.run([PY, "-m", "bastion", "status", "--config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "nope.toml" in p.stderr and "does not exist" in p.stderr


def test_freeze_timeout_over_an_hour_is_refused_at_load(tmp_path):
    # `bastion freeze` refuses a timeout over 3600 s: a config default above that would make every freeze fail
    err = fails(tmp_path, '[freeze]\ntimeout = "2h"\n')
    assert "[freeze] timeout" in err.message and "at most 1h" in err.message
    assert load(str(write(tmp_path, '[freeze]\ntimeout = "1h"\n'))).freeze_timeout == 3600
