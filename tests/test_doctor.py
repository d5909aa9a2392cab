"""`bastion doctor` on real files, real permissions, a real unreachable peer; and the packaging
(wheel contents and entry point, systemd unit)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import PY, free_port, write_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "bastion.service"


def doctor(cfg: Path) -> tuple[int, dict]:
    p = subprocess.run([PY, "-m", "bastion", "--config", str(cfg), "doctor", "--json"], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, json.loads(p.stdout)


def by_check(data: dict, prefix: str) -> list[dict]:
    return [c for c in data["checks"] if c["check"].startswith(prefix)]


def test_doctor_finds_problems_and_says_what_to_do(tmp_path: Path):
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()                                    # rollback journal: not WAL
    (tmp_path / "var").mkdir(mode=0o700)
    token = tmp_path / "var" / "token"
    token.write_text("t0ken\n")
    token.chmod(0o644)                              # readable by others: a failure
    dead = free_port()
    cfg = write_config(tmp_path, free_port(), {"app": [str(db)]})
    cfg.write_text(cfg.read_text() + f'replicate_to = "http://127.0.0.1:{dead}"\n\n[replication]\n'
                   f'peer_token_file = "{token}"\n')
    code, data = doctor(cfg)
    assert code == 2, data
    tok = by_check(data, "permissions of token file")[0]
    assert tok["status"] == "failed" and "chmod 600" in tok["hint"]
    wal = by_check(data, "database app")[0]
    assert wal["status"] == "warning" and "not WAL" in wal["message"]
    peer = by_check(data, "reach replication target of app")[0]
    assert peer["status"] == "failed" and str(dead) in peer["message"]
    clock = by_check(data, "clock sync")[0]
    assert clock["status"] in ("ok", "warning", "unknown")
    assert by_check(data, "free space")

    # fixed: WAL, token 0600, no peer -> at most warnings (clock) and exit 0 or 1
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    token.chmod(0o600)
    cfg = write_config(tmp_path, free_port(), {"app": [str(db)]})
    code, data = doctor(cfg)
    assert code in (0, 1), data
    assert by_check(data, "database app")[0]["status"] == "ok"
    assert by_check(data, "permissions of token file")[0]["status"] == "ok"
    assert not [c for c in data["checks"] if c["status"] == "failed"]
    human = subprocess.run([PY, "-m", "bastion", "--config", str(cfg), "doctor"], capture_output=True, text=True)
    assert human.returncode == code and "WAL mode" in human.stdout


def build_requirements_installed() -> bool:
    """Whether this venv holds pyproject's [build-system] requires (the test extra lists them): then the
    wheel is built by the same backend without an isolated build env, which would fetch them from the
    package index (slow, and it fails offline)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    for req in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]):
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                return False
        except PackageNotFoundError:
            return False
    return True


def test_wheel_holds_the_package_and_the_entry_point(tmp_path: Path):
    isolation = ["--no-build-isolation"] if build_requirements_installed() else []
    p = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    wheel = next(tmp_path.glob("bastion-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for mod in ("bastion/cli/__init__.py", "bastion/metrics.py", "bastion/notify.py", "bastion/drill.py",
                    "bastion/doctor.py", "bastion/daemon/app.py", "bastion/backup/restore.py",
                    "bastion/py.typed"):   # PEP 561: the annotations are part of the package
            assert mod in names, mod
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        text = z.read(ep).decode()
        assert "bastion = bastion.cli:main" in text
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        assert "Requires-Dist: prometheus-client" in meta
    # installable into a fresh venv on its own (dependencies are the venv's business; --no-deps)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}     # not the tree under test
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    script = (venv / "bin" / "bastion").read_text()
    assert "from bastion.cli import main" in script
    assert list(venv.glob("lib/python*/site-packages/bastion/metrics.py"))


def test_systemd_unit_is_hardened_and_valid(tmp_path: Path):
    text = UNIT.read_text()
    for opt in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ReadWritePaths=",
                "ProtectHome=", "User=bastion", "ExecStart=", "Restart=on-failure"):
        assert opt in text, opt
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed")
    # verify needs the ExecStart binary to exist: point it at a real one in a copy
    unit = tmp_path / "bastion.service"
    unit.write_text(text.replace("/usr/local/bin/bastion", shutil.which("true") or "/bin/true"))
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in (p.stdout + p.stderr).splitlines()
                if ("bastion.service" in line and "Unknown" in line) or "Failed to parse" in line]
    assert not problems, p.stdout + p.stderr
