"""The bank application at three sites cut off from each other, then healed (issue 18).

Each site runs the unmodified bank workload (src/bastion/workload.py: per transfer, two
accounts updated with ``balance = balance -/+ ?``, the transfer count bumped, and one audit
row inserted with the next number) in its own network namespace while no site reaches
another. Every site numbers its audit rows 1, 2, 3... and moves money on the same
accounts. After the heal:

- every audit row written at any site is there exactly once, at every site (row-level
  last-writer-wins took the rows numbered alike at two sites for one row and kept one);
- the total balance is what it was (``accounts.balance`` is a counter column: both sites'
  debits count) and the transfer count is the number of audit rows (``meta.value`` too);
- the sites hold the same rows, intact; ``bastion sync check`` says so, and reports an
  invariant that stops holding.

Needs root (network namespaces); skipped with the reason otherwise. BASTION_BANK_SECONDS
sets how long the applications write while cut off (the issue's case: 30).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import PY, free_port, init_bank, integrity, wait_for
from support.netns import Net
from support.sites import NsSite, ro

pytestmark = pytest.mark.timeout(400)

SITES = ("a", "b", "c")
ACCOUNTS = 20
SECONDS = float(os.environ.get("BASTION_BANK_SECONDS", "3"))
CONVERGE = 120.0          # a loaded 2-core machine; it takes about a second unloaded


class BankSite(NsSite):
    """A site whose database is the bank's two files, with the group's counters and invariants."""

    def __init__(self, base: Path, name: str, sp: Any, port: int, sites: dict[str, str], token: Path) -> None:
        self.bank, self.audit = base / name / "bank.db", base / name / "audit.db"      # files() gives them
        super().__init__(base, name, sp, port, sites, token)
        self.db = self.bank                 # NsSite.app writes here

    def files(self) -> list[Path]:
        return [self.bank, self.audit]

    def group(self) -> dict[str, Any]:
        return {"counters": ["accounts.balance", "meta.value"]}

    def group_extra(self) -> str:
        return ('[sync_groups.g.invariants]\n'
                f'money = {{ sql = "SELECT sum(balance) FROM accounts", expect = {ACCOUNTS * 1000} }}\n'
                'same_transfers = { sql = "SELECT value FROM meta WHERE key = \'transfers\'" }\n'
                'audit_rows = { sql = "SELECT count(*) FROM audit", expect = "same", file = 1 }\n')

    def workload(self, seconds: float) -> subprocess.Popen:
        self.stats = self.dir / "stats.json"
        return subprocess.Popen(self.ns(PY, "-m", "bastion.workload", "run", str(self.dir), "--seconds", str(seconds),
                                        "--rate", "150", "--stats", str(self.stats)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def check(self) -> tuple[int, dict[str, Any]]:
        r = self.cli("sync", "check", "shop", "--json")
        assert r.out, f"sync check on {self.name} printed nothing (exit {r.code}): {r.err}"
        return r.code, r.json


def audit_rows(site: BankSite) -> Counter:
    """The audit rows as what they record (src, dst, amount, time): the key may have moved."""
    con = ro(site.audit)
    try:
        return Counter(con.execute("SELECT src, dst, amount, at FROM audit").fetchall())
    finally:
        con.close()


def bank_state(site: BankSite) -> tuple[list[tuple], list[tuple], list[tuple]]:
    con = ro(site.bank)
    try:
        acc = con.execute("SELECT * FROM accounts ORDER BY id").fetchall()
        meta = con.execute("SELECT * FROM meta ORDER BY key").fetchall()
    finally:
        con.close()
    con = ro(site.audit)
    try:
        audit = con.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    finally:
        con.close()
    return acc, meta, audit


def vector(path: Path) -> dict[str, int]:
    try:
        con = ro(path)
        try:
            return dict(con.execute("SELECT origin, oseq FROM _bastion_sync_seen WHERE oseq > 0").fetchall())
        finally:
            con.close()
    except sqlite3.OperationalError:
        return {}


def cpu_seconds(site: BankSite) -> float:
    """User + system CPU time of a site's daemon so far (ip netns exec execs it: the same pid)."""
    assert site.proc is not None
    f = Path(f"/proc/{site.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def test_bank_at_three_partitioned_sites_keeps_every_row_and_the_money(tmp_path: Path, net: Net) -> None:
    spaces = {n: net.add() for n in SITES}
    ports = {n: free_port() for n in SITES}
    urls = {n: f"http://{spaces[n].addr}:{ports[n]}" for n in SITES}
    token = tmp_path / "peer.token"
    token.write_text(os.urandom(32).hex())
    s = {n: BankSite(tmp_path, n, spaces[n], ports[n], urls, token) for n in SITES}
    a = s["a"]
    init_bank(a.dir, ACCOUNTS)
    for f in (a.bank, a.audit):
        sqlite3.connect(f).execute("PRAGMA journal_mode = WAL").fetchall()
    cut = False
    try:
        a.start()
        wait_for(a.up, 60, "site a's daemon up")
        for n in ("b", "c"):
            s[n].start()
        wait_for(lambda: all(x.up() for x in s.values()), 60, "the daemons up")
        wait_for(lambda: all(x.bank.exists() and x.audit.exists() and vector(x.bank) is not None for x in s.values())
                 and all(json.loads(x.cli("sync", "status", "shop", "--json").out or "{}").get("databases", [{}])[0]
                         .get("state") == "in sync" for x in s.values()), 90, "b and c joined, all in sync")

        for x in s.values():
            net.cut(x.sp, "switch")
        cut = True
        runs = {n: x.workload(SECONDS) for n, x in s.items()}
        for n, p in runs.items():
            _out, err = p.communicate(timeout=SECONDS + 120)
            assert p.returncode == 0, f"workload at {n}: {err}"
        commits = {n: json.loads(x.stats.read_text())["commits"] for n, x in s.items()}
        written = {n: audit_rows(x) for n, x in s.items()}
        assert all(commits.values()), commits
        # Every site numbered its rows from 1: the collisions this is about.
        seqs = [set(r[2] for r in bank_state(x)[2]) for x in s.values()]
        assert seqs[0] & seqs[1] & seqs[2], "the sites did not number audit rows alike"

        cpu0 = {n: cpu_seconds(x) for n, x in s.items()}
        t_heal = time.monotonic()
        for x in s.values():
            net.heal(x.sp, "switch")
        cut = False
        want = sum(written.values(), Counter())

        def converged() -> bool:
            vs = [(vector(x.bank), vector(x.audit)) for x in s.values()]
            return vs[0] == vs[1] == vs[2] and all(bank_state(x) == bank_state(a) for x in s.values())
        wait_for(converged, CONVERGE, "the three sites converged after the heal")
        took = time.monotonic() - t_heal
        cpu = ", ".join(f"{n} {cpu_seconds(x) - cpu0[n]:.1f} s" for n, x in s.items())
        print(f"\nbank at 3 sites, {SECONDS:g} s cut off, {sum(commits.values())} transfers: converged "
              f"{took:.2f} s after the heal (daemons' CPU meanwhile: {cpu}; load average {os.getloadavg()[0]:.1f})")

        total = sum(commits.values())
        for x in s.values():
            got = audit_rows(x)
            assert got == want, (f"{x.name}: audit rows lost or doubled: {sum((want - got).values())} missing, "
                                 f"{sum((got - want).values())} extra")
            acc, meta, audit = bank_state(x)
            assert sum(r[2] for r in acc) == ACCOUNTS * 1000, f"{x.name}: money created or lost"
            assert dict(meta)["transfers"] == total == len(audit)
            assert integrity(x.bank) == integrity(x.audit) == "ok"
        code, rep = a.check()
        assert code == 0 and rep["converged"] and rep["ok"], rep
        assert {k: v["ok"] for k, v in rep["invariants"].items()} == {"money": True, "same_transfers": True,
                                                                       "audit_rows": True}
        assert set(rep["invariants"]["money"]["values"]) == set(SITES)

        # An invariant that stops holding is reported, with each site's value, and the exit code says so.
        a.app("UPDATE accounts SET balance = balance + 1 WHERE id = 1")   # money out of nowhere
        wait_for(lambda: all(bank_state(x) == bank_state(a) for x in s.values()), CONVERGE, "the write synced")
        code, rep = s["b"].check()
        assert code == 1 and rep["converged"] and not rep["ok"], rep
        assert not rep["invariants"]["money"]["ok"] and rep["invariants"]["audit_rows"]["ok"]
        assert set(rep["invariants"]["money"]["values"].values()) == {ACCOUNTS * 1000 + 1}
        assert any("money" in p for p in rep["problems"]), rep["problems"]
    finally:
        if cut:
            for x in s.values():
                net.heal(x.sp, "switch")
        for x in s.values():
            x.stop()
