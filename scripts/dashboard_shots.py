"""Drive the dashboard in a real headless browser: the tests use it, and `make docs` runs it
to take the screenshots in docs/img/ of a small scene it builds itself (a protected bank
replicating to a second daemon while the workload writes, backups, a sync-style conflict).

The browser is the distribution's Chromium (Debian package `chromium`) driven by Playwright
(PyPI); Playwright's own browser download is never used."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PAGES = [("overview", "/dashboard/"), ("backups", "/dashboard/backups"), ("replication", "/dashboard/replication"),
         ("conflicts", "/dashboard/conflicts"), ("events", "/dashboard/events")]


def chromium() -> str:
    for p in (os.environ.get("BASTION_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium") or ""):
        if p and os.access(p, os.X_OK):
            return p
    raise RuntimeError("no chromium: install the Debian package (scripts/install-system-deps.sh does)")


@contextmanager
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # --no-sandbox: the sandbox needs user namespaces, which containers often lack
        b = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def login(page: Any, base: str, token: str | None = None, user: str | None = None, password: str | None = None) -> None:
    page.goto(f"{base}/dashboard/login")
    if token is not None:
        page.fill("#token", token)
    else:
        page.fill("#user", user or "")
        page.fill("#password", password or "")
    page.click("#login")
    page.wait_for_load_state("load")


def shoot(page: Any, base: str, outdir: Path, pages: list[tuple[str, str]] = PAGES) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, path in pages:
        page.goto(base + path)
        page.wait_for_load_state("load")
        f = outdir / f"dashboard-{name}.png"
        page.screenshot(path=str(f), full_page=True)
        out.append(f)
    return out


# -- the scene for `make docs` ------------------------------------------------------------------

def _scene(work: Path, outdir: Path) -> list[Path]:
    import secrets
    import subprocess
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import DaemonProc, free_port, write_config   # the test suite's real-daemon helpers
    from bastion.sync import conflict_log
    import apsw

    py = sys.executable
    app = work / "app"
    subprocess.run([py, "-m", "bastion.workload", "init", str(app), "--accounts", "200"], check=True)
    shop = work / "shop.db"
    con = apsw.Connection(str(shop))
    con.execute("PRAGMA journal_mode=WAL").fetchall()
    con.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);"
                "INSERT INTO orders VALUES (17, 'blue mug', 3), (18, 'tea pot', 1);")
    with con:
        conflict_log.record(con, table="orders", key_columns=["id"], key=[17], policy="lww", outcome="remote",
                            local=(1 << 20, "paris", ["id", "item", "qty"], [17, "blue mug", 2]),
                            remote=(2 << 20, "lyon", 5, ["id", "item", "qty"], [17, "blue mug", 3]))
    con.close()
    token_file = work / "peer.token"
    token_file.write_text(secrets.token_hex(32) + "\n")
    repl = f'[replication]\npeer_token_file = "{token_file}"\n'
    bdir = work / "standby"
    bdir.mkdir()
    bport = free_port()
    copy = bdir / "copy"
    cfg = write_config(bdir, bport, {"bank": [str(copy / "bank.db"), str(copy / "audit.db")]}, extra=repl)
    cfg.write_text(cfg.read_text().replace("[databases.bank]\n", '[databases.bank]\nreplica_of = "bank"\n'))
    standby = DaemonProc(cfg, bport, bdir / "var")
    pdir = work / "primary"
    pdir.mkdir()
    pport = free_port()
    cfg = write_config(pdir, pport, {"bank": [str(app / "bank.db"), str(app / "audit.db")], "shop": [str(shop)]},
                       extra=repl)
    cfg.write_text(cfg.read_text().replace(
        "[databases.bank]\n", f'[databases.bank]\nreplicate_to = "http://127.0.0.1:{bport}"\n'
                              'replicate_schedule = "every 15s"\n'))
    primary = DaemonProc(cfg, pport, pdir / "var")
    work_proc = None
    try:
        standby.start()
        primary.start()
        work_proc = subprocess.Popen([py, "-m", "bastion.workload", "run", str(app), "--seconds", "120",
                                      "--stats", str(work / "stats.json")])
        for name in ("bank", "shop", "bank"):
            r = primary.cli("backup", name)
            assert r.code == 0, r.err
            time.sleep(1)
        time.sleep(45)        # lag samples for the graphs (one every 5 s)
        base = f"http://127.0.0.1:{pport}"
        with browser() as b:
            page = b.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"{base}/dashboard/login")
            login_shot = outdir / "dashboard-login.png"
            outdir.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(login_shot))
            login(page, base, token=primary.token)
            return [login_shot, *shoot(page, base, outdir)]
    finally:
        if work_proc and work_proc.poll() is None:
            work_proc.terminate()
            work_proc.wait(60)
        primary.stop()
        standby.stop()


def main() -> int:
    import tempfile
    outdir = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img").resolve()
    with tempfile.TemporaryDirectory(prefix="bastion-docs-") as tmp:
        for f in _scene(Path(tmp), outdir):
            print(f"{f} ({f.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
