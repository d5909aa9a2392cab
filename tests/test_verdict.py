"""Exit codes belong to the CLI: library results (and the daemon's answers) say how an operation
went with a "verdict" (errors.Outcome); the CLI maps it to the exit code and keeps the "exit_code"
keys that --json output has always had."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from bastion.backup import Repository, verify
from bastion.errors import NoRepository

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"

# Outside cli/, "exit_code" may only be an error's own code, a command's (hooks, drill_command),
# or an answer kept for older clients.
EXIT_CODE_ALLOWED = {
    "errors.py", "hooks.py", "drill.py", "cluster/node.py", "daemon/app.py",
}


def test_no_library_module_puts_exit_codes_in_new_results():
    found = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
             if p.relative_to(SRC).parts[0] != "cli" and re.search(r"""["']exit_code["']""", p.read_text())}
    assert found <= EXIT_CODE_ALLOWED, sorted(found - EXIT_CODE_ALLOWED)


@pytest.mark.parametrize(("verdict", "code"), [("ok", 0), ("partial", 1), ("failed", 2)])
def test_the_cli_maps_every_verdict_nested_ones_included(verdict, code):
    from bastion.cli.base import exit_code_of, with_exit_codes
    data = with_exit_codes({"verdict": verdict, "backups": [{"database": "a", "verdict": verdict}]})
    assert data["exit_code"] == code and data["backups"][0]["exit_code"] == code
    assert exit_code_of(data) == code


def test_a_failure_that_is_an_error_keeps_the_errors_own_code():
    from bastion.cli.base import exit_code_of, with_exit_codes
    entry = {"database": "x", "error": NoRepository("no repository at file:///x").to_dict(), "verdict": "failed"}
    assert with_exit_codes({"backups": [entry]})["backups"][0]["exit_code"] == 3
    # a result composed in the CLI (no verdict) keeps its exit_code; conflict records have an
    # "outcome" (the winner) that is none of the CLI's business
    assert exit_code_of({"exit_code": 1}) == 1 and exit_code_of({"outcome": "remote"}) == 0


def test_backup_verify_results_carry_a_verdict_and_the_cli_the_exit_code(daemon, bank, tmp_path):
    r = daemon.api("POST", "/v1/backups", {"targets": ["bank"]})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["verdict"] == "ok" and "exit_code" not in b and b["verified"] is True
    repo_dir = daemon.data_dir / "backups"
    res = verify(Repository.open(f"file://{repo_dir}"), [b["backup"]], record=False)
    assert res["verdict"] == "ok" and "exit_code" not in res

    r = daemon.cli("verify", b["backup"], "--json")
    assert r.code == 0 and r.json["exit_code"] == 0 and r.json["verdict"] == "ok", r.err
    # checked, but the outcome cannot be recorded: partial, exit 1
    copy = tmp_path / "copy"
    shutil.copytree(repo_dir, copy)
    shutil.rmtree(copy / "verified", ignore_errors=True)
    (copy / "verified").write_text("a file where the records go")
    r = daemon.cli("verify", b["backup"], "--repo", f"file://{copy}", "--json")
    assert r.code == 1 and r.json["exit_code"] == 1 and r.json["verdict"] == "partial", (r.code, r.out, r.err)
    assert r.json["recorded"] is False and r.json["ok"] is True
    # a damaged chunk: failed, exit 2
    chunk = next(p for p in sorted((copy / "chunks").rglob("*")) if p.is_file())
    chunk.write_bytes(b"not the chunk")
    res = verify(Repository.open(f"file://{copy}"), [b["backup"]], record=False)
    assert res["verdict"] == "failed" and res["problems"]
    r = daemon.cli("verify", b["backup"], "--repo", f"file://{copy}", "--json")
    assert r.code == 2 and r.json["exit_code"] == 2 and r.json["verdict"] == "failed", r.err
