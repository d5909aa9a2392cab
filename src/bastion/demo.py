"""`make demo`: the main job on the embedded default, start to finish.

Starts a daemon with no config file, a bank application in another process that keeps
writing two database files, and proves, while the application writes:

- continuous operations: a plain `tar` of the main files is a consistent copy;
- freeze/thaw: writers are held, readers go on, a snapshot tool's copy is exactly the
  frozen state, and writers go on after the thaw;
- built-in backups: `bastion backup`, `bastion verify --full`, `bastion restore --to DIR`,
  and the restored copy is intact and holds the state of the backup's instant.

Each run works in its own directory, var/demo/RUN (its data_dir is ./var in there), and
listens on 127.0.0.1:8750, or on a free port when 8750 is taken (then a bastion.toml in
the run directory says so): two runs at once do not collide. What each claim rests on is
measured, never a timing threshold, so a loaded machine does not make it fail. Exit code
0 when every claim is proved, 1 otherwise. Everything it starts is stopped.

    python -m bastion.demo [--keep]     (--keep: keep the run directory even on success)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from . import workload

PY = sys.executable
BASE = Path("var") / "demo"
DEFAULT_PORT = 8750
FILES = ("app/bank.db", "app/audit.db")      # relative to the run directory


class Abort(Exception):
    """A step could not go on (its failure is already recorded as a claim)."""


def say(text: str) -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, base: Path = BASE) -> None:
        # unique per run: the pid, and a timestamp so that a re-used pid gets a new directory
        self.run = base.resolve() / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.claims: list[tuple[bool, str]] = []
        self.port = DEFAULT_PORT
        self.daemon: subprocess.Popen | None = None
        self.app: subprocess.Popen | None = None

    # -- helpers --------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.run / rel

    def show(self, rel: str = "") -> str:
        """A path as the reader sees it: relative to where the demo was started."""
        return os.path.relpath(self.run / rel)

    def bastion(self, *args: str, show: bool = True) -> tuple[int, dict[str, Any], str]:
        """Run the CLI in the run directory (so: its embedded default, or its bastion.toml)."""
        if show:
            say(f"$ bastion {' '.join(args)}")
        cut = args.index("--") if "--" in args else len(args)
        argv = [*args[:cut], "--json", *args[cut:]]
        p = subprocess.run([PY, "-m", "bastion", *argv], capture_output=True, text=True, cwd=self.run)
        try:
            data = json.loads(p.stdout) if p.stdout.strip() else {}
        except ValueError:
            data = {}
        return p.returncode, data, p.stderr.strip()

    def must(self, *args: str) -> dict[str, Any]:
        """A command the next steps depend on: its failure is a failed claim and ends the demo."""
        code, data, err = self.bastion(*args)
        if code != 0:
            self.claim(False, f"`bastion {args[0]}` exited with code {code}: {err.splitlines()[-1] if err else ''}")
            if err:
                say("    " + err.replace("\n", "\n    "))
            raise Abort
        return data

    def claim(self, ok: bool, text: str) -> bool:
        self.claims.append((ok, text))
        say(f"  {'OK  ' if ok else 'FAIL'} {text}")
        return ok

    def transfers(self, rel: str = "app/bank.db") -> int:
        """A reader, as any application could be (read-only, in this process, never the daemon's)."""
        con = sqlite3.connect(f"file:{self.path(rel)}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT value FROM meta WHERE key='transfers'").fetchone()[0]
        finally:
            con.close()

    def audit_rows(self, rel: str, upto: int) -> str:
        """A digest of audit rows 1..upto (the audit table only ever grows)."""
        con = sqlite3.connect(f"file:{self.path(rel)}?mode=ro", uri=True, timeout=30)
        try:
            h = hashlib.sha256()
            for row in con.execute("SELECT seq, src, dst, amount, at FROM audit WHERE seq <= ? ORDER BY seq", (upto,)):
                h.update(repr(row).encode())
            return h.hexdigest()
        finally:
            con.close()

    def check(self, d: str) -> dict[str, Any]:
        return workload.check((str(self.path(d) / "bank.db"), str(self.path(d) / "audit.db")))

    # -- the daemon ------------------------------------------------------------------------
    def start_daemon(self) -> None:
        """On 8750 with no config at all (the embedded default) when it is free; else on a free
        port named in the run directory's bastion.toml. Another program may take the port
        between the check and the daemon's bind: then try again on another port."""
        for attempt in range(5):
            if attempt == 0 and _port_free(DEFAULT_PORT):
                self.port = DEFAULT_PORT
                note = "the embedded default: no config file"
            else:
                self.port = _free_port()
                self.path("bastion.toml").write_text(
                    f'# port {DEFAULT_PORT} was taken: only the listen address differs from the embedded default\n'
                    f'[daemon]\nlisten = "127.0.0.1:{self.port}"\n')
                note = f"port {DEFAULT_PORT} is taken: ./bastion.toml sets listen, the rest is the embedded default"
            log = self.path("daemon.log")
            say(f"$ bastion serve        ({note}; log: {self.show('daemon.log')})")
            with open(log, "w") as fh:
                self.daemon = subprocess.Popen([PY, "-m", "bastion", "serve"], cwd=self.run, stdout=fh,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.daemon.poll() is not None:
                    break
                code, _, _ = self.bastion("status", show=False)
                if code == 0 and self.daemon.poll() is None:
                    say(f"  daemon pid {self.daemon.pid} listening on 127.0.0.1:{self.port}, data in "
                        f"{self.show('var')}")
                    return
                time.sleep(0.2)
            text = log.read_text(errors="replace")
            self.stop_daemon()
            if "already in use" in text:
                say(f"  port {self.port} was taken meanwhile: trying another one")
                continue
            self.claim(False, f"the daemon started: it did not (log: {self.show('daemon.log')})")
            say("    " + "\n    ".join(text.splitlines()[-10:]))
            raise Abort
        self.claim(False, "the daemon started: no free port after 5 attempts")
        raise Abort

    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.daemon.pid, signal.SIGKILL)
            self.daemon.wait(10)

    def start_app(self) -> None:
        ready = self.path("app-ready")
        self.app = subprocess.Popen([PY, "-m", "bastion.workload", "run", str(self.path("app")), "--stats",
                                     str(self.path("app-stats.json")), "--ready", str(ready)], cwd=self.run)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.app.poll() is not None or time.monotonic() > deadline:
                self.claim(False, "the bank application started: it did not")
                raise Abort
            time.sleep(0.05)

    def stop_app(self) -> dict[str, Any]:
        assert self.app is not None
        self.app.send_signal(signal.SIGTERM)
        self.app.wait(60)
        self.app = None
        return json.loads(self.path("app-stats.json").read_text())

    def wait_for_commits(self, after: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.transfers()) <= after and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    # -- the story -------------------------------------------------------------------------
    def main(self) -> None:
        self.run.mkdir(parents=True)
        say("== Bastion demo: protect a running application's SQLite databases ==")
        say(f"run directory: {self.show()} (its own data_dir and files: runs at the same time do not share them)")
        workload.init(str(self.path("app")), accounts=2000, pad=200)
        say(f"created {FILES[0]} and {FILES[1]}: 2,000 accounts of {workload.BALANCE} each")
        self.start_daemon()
        self.must("protect", *FILES)
        self.start_app()
        say("started the bank application (a separate process using Python's sqlite3): each transfer "
            "updates two accounts in bank.db and adds an audit row in audit.db, in one transaction")
        time.sleep(1)
        fig: dict[str, Any] = {}
        self.contops(fig)
        self.freeze(fig)
        self.backup(fig)
        stats = self.stop_app()
        self.claim(stats["errors"] == {}, f"the application never saw an error ({stats['commits']:,} commits, "
                                          f"{stats['commits_per_s']:.0f}/s)")
        live = self.check("app")
        self.claim(live["ok"] and live["transfers"] == stats["commits"],
                   f"the live database is intact with every acknowledged commit ({live['transfers']:,})")
        worst = max((s for t, s in stats["slow"] if fig["frozen_at"] - 1 <= t <= fig["thawed_at"]), default=0.0)
        say("\n-- figures (measured, not claims: they vary with the machine's load) --")
        say(f"  startbu: writers paused {fig['start']['writers_paused_ms']:.2f} ms, command latency "
            f"{fig['start']['latency_ms']:.1f} ms; delta rolled in at endbu: {fig['end']['delta_bytes']:,} bytes")
        say(f"  freeze hold: {fig['hold'] * 1000:.1f} ms; worst application commit around it: {worst * 1000:.1f} ms; "
            f"main files alone complete under the freeze: {'yes' if fig['main_complete'] else 'no (WAL needed)'}")
        say(f"  backup: {fig['backup_seconds']:.2f} s; application p99 commit latency "
            f"{stats['p99_latency_ms']:.1f} ms")

    def contops(self, fig: dict[str, Any]) -> None:
        say("\n-- continuous operations: copy with plain tar while the application writes --")
        start = self.must("startbu", *FILES)
        before = [_sha256(self.path(f)) for f in FILES]
        n_start = self.transfers()
        say("$ tar -cf contops-copy.tar -C app bank.db audit.db")
        subprocess.run(["tar", "-cf", "contops-copy.tar", "-C", "app", "bank.db", "audit.db"], check=True,
                       cwd=self.run)
        n_end = self.wait_for_commits(n_start + 100)
        after = [_sha256(self.path(f)) for f in FILES]
        end = self.must("endbu", *FILES)
        self.claim(before == after and n_end > n_start,
                   "main files unchanged byte for byte during continuous operations (sha256 before and after; "
                   f"the application committed {n_end - n_start:,} transfers meanwhile)")
        with tarfile.open(self.path("contops-copy.tar")) as tf:
            tf.extractall(self.path("contops-copy"), filter="data")
        res = self.check("contops-copy")
        self.claim(res["bank_integrity"] == "ok" and res["audit_integrity"] == "ok",
                   "the tar copy passes PRAGMA integrity_check (both files)")
        self.claim(res["total"] == res["expected_total"],
                   f"the copy keeps the invariant: total balance {res['total']:,} == {res['expected_total']:,}")
        self.claim(res["transfers"] == res["audit_rows"] == res["audit_max_seq"] and res["transfers"] <= n_start,
                   f"both files captured at one instant, startbu's: {res['transfers']:,} transfers in bank.db, "
                   f"{res['audit_rows']:,} audit rows in audit.db")
        self.claim(end.get("consistent") is True and all(f["roll_in"] == "complete" for f in end["files"]),
                   f"endbu rolled the delta in: {end['delta_bytes']:,} bytes in "
                   f"{max(f['roll_in_seconds'] for f in end['files']) * 1000:.1f} ms")
        fig["start"], fig["end"] = start, end

    def freeze(self, fig: dict[str, Any]) -> None:
        say("\n-- freeze/thaw: a snapshot tool's copy, writers held, readers free --")
        n0 = self.wait_for_commits(self.transfers())            # the application is writing
        fr = self.must("freeze", *FILES, "--timeout", "25")      # under the application's 30 s busy timeout
        n1 = self.transfers()                                     # a reader, during the freeze
        copy = ["app/bank.db", "app/bank.db-wal", "app/audit.db", "app/audit.db-wal"]
        copy = [c for c in copy if self.path(c).exists()]
        self.path("freeze-copy").mkdir()
        say(f"$ cp {' '.join(copy)} freeze-copy/        (a snapshot takes main files and WALs alike)")
        subprocess.run(["cp", *copy, "freeze-copy/"], check=True, cwd=self.run)
        time.sleep(0.5)
        n2 = self.transfers()
        code, th, err = self.bastion("thaw", *FILES)
        thawed_at = time.time()
        self.claim(n1 == n2 and n1 >= n0,
                   f"writers held, readers free: a reader saw {n1:,} transfers at the start of the freeze and "
                   f"{n2:,} after the copy and half a second more, while the application kept trying to write")
        self.claim(code == 0 and th.get("consistent") is True,
                   "thaw confirms the freeze held from freeze to thaw" + (f" (it said: {err})" if code else ""))
        res = self.check("freeze-copy")
        self.claim(res["ok"] and res["transfers"] == n1,
                   f"the copy is consistent and is exactly the frozen state (integrity ok, invariant, "
                   f"{res['transfers']:,} transfers == {res['audit_rows']:,} audit rows == {n1:,} seen while frozen)")
        n3 = self.wait_for_commits(n2)
        self.claim(n3 > n2, f"writers went on after the thaw ({n3 - n2:,} more transfers)")
        fig["frozen_at"] = fr.get("frozen_at_epoch", thawed_at)
        fig["thawed_at"] = thawed_at
        fig["hold"] = th.get("hold_seconds", 0.0)
        fig["main_complete"] = all(f.get("main_file_complete") for f in fr.get("files", []))

    def backup(self, fig: dict[str, Any]) -> None:
        say("\n-- built-in backup: take, verify, restore elsewhere, prove the restored copy --")
        n_before = self.transfers()
        t0 = time.monotonic()
        b = self.must("backup", *FILES)
        fig["backup_seconds"] = time.monotonic() - t0
        n_after = self.transfers()
        bid = b.get("backup") or b.get("id")
        self.claim(bool(bid) and b.get("verified") is not False,
                   f"backup {bid} taken while the application wrote {n_after - n_before:,} transfers: "
                   f"{b.get('logical_bytes', 0):,} bytes read, {b.get('stored_bytes_added', 0):,} stored, "
                   "quick verify ok")
        if not bid:
            raise Abort
        code, _, err = self.bastion("verify", bid, "--full")
        self.claim(code == 0, "verify --full: every chunk read back and re-hashed, the backup restored to scratch "
                              "space, integrity_check and content digests match" + (f" ({err})" if code else ""))
        code, _, err = self.bastion("restore", bid, "--to", "restored")
        if not self.claim(code == 0, "the backup restored into restored/, a directory apart from the live files"
                          + (f" ({err})" if code else "")):
            raise Abort
        # where restore put the files (by their names in the backup; not assuming the layout)
        found = [p.parent for p in self.path("restored").rglob("bank.db") if (p.parent / "audit.db").exists()]
        if not found:
            held = sorted(str(p.relative_to(self.path("restored"))) for p in self.path("restored").rglob("*"))
            self.claim(False, f"the restored copy holds bank.db and audit.db: it holds {held}")
            raise Abort
        restored = os.path.relpath(found[0], self.run)
        res = self.check(restored)
        self.claim(res["bank_integrity"] == "ok" and res["audit_integrity"] == "ok",
                   "the restored copy passes PRAGMA integrity_check (both files)")
        self.claim(res["total"] == res["expected_total"],
                   f"the restored copy keeps the invariant: total balance {res['total']:,}")
        n = res["transfers"]
        self.claim(res["transfers"] == res["audit_rows"] == res["audit_max_seq"] and n_before <= n <= n_after,
                   f"the restored copy is the state of one instant during the backup: {n:,} transfers == "
                   f"{res['audit_rows']:,} audit rows, between {n_before:,} (before `bastion backup`) and "
                   f"{n_after:,} (after)")
        self.claim(self.audit_rows(f"{restored}/audit.db", n) == self.audit_rows("app/audit.db", n),
                   f"its {n:,} audit rows are the live database's rows 1..{n:,}, field for field")

    def finish(self, keep: bool) -> int:
        if self.app is not None and self.app.poll() is None:
            self.app.kill()
            self.app.wait(10)
        self.stop_daemon()
        failed = [t for ok, t in self.claims if not ok]
        say(f"\n{len(self.claims) - len(failed)} of {len(self.claims)} claims proved"
            + (f", {len(failed)} FAILED" if failed else "") + "; everything started was stopped.")
        if failed:
            say(f"kept {self.show()} for a look (daemon.log, the copies)")
        elif keep:
            say(f"kept {self.show()}")
        else:
            shutil.rmtree(self.run, ignore_errors=True)
        return 1 if failed or not self.claims else 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the daemon binds
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bastion.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the run directory even when every claim holds")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)      # stopped from outside: still stop what it started
    demo = Demo()
    try:
        demo.main()
    except Abort:
        say("the demo cannot go on after this failure")
    except KeyboardInterrupt:
        demo.claim(False, "interrupted")
    finally:
        code = demo.finish(args.keep)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
