"""The web dashboard (issue 17), tested in a real headless Chromium against a real daemon.

A database whose file name is an XSS payload, a conflict whose losing value is another:
the pages must show both as text and run neither. The session cookie is HttpOnly and
SameSite=Strict; POSTs without the session's CSRF token, or from another origin, change
nothing. A backup taken from the CLI appears; a conflict resolved in the browser is
reapplied in the database file itself."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import PY, DaemonProc, free_port, write_config
from support.replication import Pair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import dashboard_shots as shots

pytest.importorskip("playwright")

FILE_XSS = "<img src=x onerror=window.__xss=1>.db"
VALUE_XSS = '</td><script>window.__xss=2</script><img src=x onerror="window.__xss=3">'
READER_PW = "reader-pass-1"

_SEED = r"""
import sys, apsw
from bastion.sync import conflict_log
path, value = sys.argv[1], sys.argv[2]
con = apsw.Connection(path)
con.execute("PRAGMA journal_mode=WAL").fetchall()
con.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, n INTEGER);"
            "INSERT INTO notes VALUES (1, 'kept', 1), (2, 'also kept', 2);")
cols = ["id", "body", "n"]
with con:
    # as a rejoining old primary leaves them (policy failover, the local row kept)
    conflict_log.record(con, table="notes", key_columns=["id"], key=[1], policy="failover", outcome="local",
                        local=(1 << 20, "n2", cols, [1, "kept", 1]), remote=(2 << 20, "n1", 7, cols, [1, value, 9]))
    conflict_log.record(con, table="notes", key_columns=["id"], key=[2], policy="failover", outcome="local",
                        local=(1 << 20, "n2", cols, [2, "also kept", 2]),
                        remote=(2 << 20, "n1", 8, cols, [2, "lost", 5]))
con.close()
"""


@pytest.fixture
def dash(tmp_path: Path):
    from bastion.sql.users import hash_password
    data = tmp_path / "data"
    data.mkdir()
    db = data / FILE_XSS
    subprocess.run([PY, "-c", _SEED, str(db), VALUE_XSS], check=True)
    port = free_port()
    cfg = write_config(tmp_path, port, {"app": [str(db)]},
                       extra=f'[users.reader]\npassword_hash = "{hash_password(READER_PW)}"\n'
                             'access = { app = "read-only" }\n')
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    yield d, db
    d.stop()


def base(d: DaemonProc) -> str:
    return f"http://127.0.0.1:{d.port}"


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, body, n FROM notes ORDER BY id").fetchall()
    finally:
        con.close()


def no_injected_markup(page) -> None:
    """Escaping held: no element or script from the payloads exists, none ran."""
    assert page.evaluate("window.__xss === undefined")
    assert page.locator("img").count() == 0
    srcs = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src'))")
    assert srcs == ["/dashboard/static/dashboard.js"], srcs


def test_browser_login_backup_conflict_and_escaping(dash, tmp_path: Path) -> None:
    d, db = dash
    with shots.browser() as b:
        page = b.new_page(viewport={"width": 1200, "height": 800})
        page.goto(base(d) + "/dashboard/")
        assert page.url.endswith("/dashboard/login")          # not logged in: the login page
        shots.login(page, base(d), token="wrong")
        assert "Wrong token" in page.inner_text("main")
        shots.login(page, base(d), token=d.token)
        assert page.url.endswith("/dashboard/")

        # the database, protected, its file name shown as text
        card = page.locator("#db-app")
        assert card.locator("[data-state]").first.get_attribute("data-state") == "protected"
        assert "protected" in card.locator("h2").inner_text()
        assert FILE_XSS in card.inner_text()
        assert "2 conflicts" in card.inner_text()
        no_injected_markup(page)

        # a backup taken from the CLI is listed, with its restore command
        r = d.cli("backup", "app", "--json")
        assert r.code == 0, r.err
        bid = r.json["backup"] if "backup" in r.json else r.json["id"]
        page.goto(base(d) + "/dashboard/backups")
        row = page.locator(f'tr[data-backup="{bid}"]')
        assert row.count() == 1
        assert FILE_XSS in row.inner_text()
        assert f"bastion restore {bid} --to ./restored-app" in row.inner_text()
        assert page.locator("#backups-app svg.chart rect.bar").count() == 1
        no_injected_markup(page)

        # a recovery drill's outcome, on the database's card (never run, then ok with RTO/RPO)
        page.goto(base(d) + "/dashboard/")
        assert page.locator("#db-app [data-drill]").get_attribute("data-drill") == "never"
        r = d.cli("drill", "app", "--json")
        assert r.code == 0, r.err
        page.goto(base(d) + "/dashboard/")
        drill = page.locator("#db-app [data-drill]")
        assert drill.get_attribute("data-drill") == "ok" and f"RTO {r.json['rto_seconds']} s" in drill.inner_text()
        no_injected_markup(page)

        # the conflict: both versions side by side, the payload as text; reapply the remote one
        page.goto(base(d) + "/dashboard/conflicts")
        c1 = page.locator("#conflict-app-0-1")
        assert VALUE_XSS in c1.locator("table.versions").inner_text()
        assert "kept" in c1.locator("table.versions").inner_text()
        no_injected_markup(page)
        c1.locator("button[value=reapply]").click()
        page.wait_for_load_state("load")
        assert "reapplied the remote version" in page.inner_text("main")
        page.locator("#conflict-app-0-2 button[value=dismiss]").click()
        page.wait_for_load_state("load")
        assert page.locator("#no-conflicts").count() == 1

        # in the database file itself: row 1 is the remote version, row 2 kept as it was
        assert rows(db) == [(1, VALUE_XSS, 9), (2, "also kept", 2)]
        settled = d.api("GET", "/v1/conflicts?database=app&all=true").json()["conflicts"]
        assert {c["id"]: c["resolution"] for c in settled} == {1: "reapplied the remote version", 2: "dismissed"}
        assert all(c["resolved_by"] == "admin (dashboard)" for c in settled)

        page.goto(base(d) + "/dashboard/cluster")
        assert "runs on its own" in page.inner_text("main")
        page.goto(base(d) + "/dashboard/events")
        assert "Recent events" in page.inner_text("h1")
        assert f"app: backup {bid}" in page.inner_text("table.events")       # from the repository
        assert "ended" in page.inner_text("table.events")                    # its session, from state.db
        no_injected_markup(page)
        files = shots.shoot(page, base(d), tmp_path / "shots")
        assert all(f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG" for f in files)

        # log out: the old cookie no longer opens anything
        cookie = next(c for c in page.context.cookies() if c["name"] == "bastion_session")
        page.click("header button")
        page.wait_for_load_state("load")
        assert page.url.endswith("/dashboard/login")
        r = httpx.get(base(d) + "/dashboard/", cookies={"bastion_session": cookie["value"]})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"


def test_sql_user_sees_only_and_cannot_resolve(dash) -> None:
    d, db = dash
    with shots.browser() as b:
        page = b.new_page()
        shots.login(page, base(d), user="reader", password="wrong")
        assert "Wrong token" in page.inner_text("main")
        shots.login(page, base(d), user="reader", password=READER_PW)
        assert "reader" in page.inner_text("header")
        assert page.locator("#db-app").count() == 1
        page.goto(base(d) + "/dashboard/conflicts")
        assert page.locator("form.resolve").count() == 0         # read-only: no forms
        assert "read-write role" in page.inner_text("main")
        csrf = page.locator("header input[name=csrf]").get_attribute("value")
        # and the route refuses even with a valid session and CSRF token
        r = page.request.post(base(d) + "/dashboard/conflicts/app/1/resolve",
                              form={"csrf": csrf, "action": "dismiss", "file": "0"})
        assert r.status == 401 and "may not change app" in r.text()
        page.goto(base(d) + "/dashboard/events")
        assert "Admins only" in page.inner_text("h1")
    assert rows(db)[0] == (1, "kept", 1)
    assert len(d.api("GET", "/v1/conflicts?database=app").json()["conflicts"]) == 2


def _session(d: DaemonProc) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=base(d))
    r = c.get("/dashboard/login")
    set_cookie = r.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', r.text).group(1)
    r = c.post("/dashboard/login", data={"login_csrf": login_csrf, "token": d.token})
    assert r.status_code == 303, r.text
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("bastion_session="))
    assert all(a in cookie for a in ("HttpOnly", "SameSite=Strict", "Path=/dashboard"))
    page = c.get("/dashboard/conflicts")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return c, csrf


def test_session_cookie_and_csrf(dash) -> None:
    d, db = dash
    # login itself needs the login form's double-submit token (no login CSRF)
    r = httpx.post(base(d) + "/dashboard/login", data={"token": d.token})
    assert r.status_code == 403 and "bastion_session" not in r.headers.get("set-cookie", "")
    c, csrf = _session(d)
    try:
        path = "/dashboard/conflicts/app/2/resolve"
        for data, headers in (({"action": "dismiss", "file": "0"}, {}),                      # no token
                              ({"action": "dismiss", "file": "0", "csrf": "x" + csrf}, {}),  # a wrong one
                              ({"action": "dismiss", "file": "0", "csrf": csrf},             # another site's page
                               {"Origin": "http://evil.example"})):
            r = c.post(path, data=data, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.text, r.text
        assert len(d.api("GET", "/v1/conflicts?database=app").json()["conflicts"]) == 2
        r = c.post(path, data={"action": "dismiss", "file": "0", "csrf": csrf}, headers={"Origin": base(d)})
        assert r.status_code == 303
        assert [x["id"] for x in d.api("GET", "/v1/conflicts?database=app").json()["conflicts"]] == [1]
        # a resolved one is refused with the library's own words, nothing changed
        r = c.post(path, data={"action": "reapply", "file": "0", "csrf": csrf})
        assert r.status_code == 409 and "already resolved" in r.text
        # pages carry a CSP that forbids inline script, and are never cached
        r = c.get("/dashboard/")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"
    finally:
        c.close()
    # the session cookie opens the dashboard only, never the admin API
    r = httpx.get(base(d) + "/v1/status", cookies=dict(c.cookies))
    assert r.status_code == 401
    assert rows(db)[1] == (2, "also kept", 2)


def test_lag_graph_of_a_replicating_database(tmp_path: Path, bank) -> None:
    """Replication lag is sampled into a bounded ring and drawn as an SVG line."""
    pair = Pair(tmp_path, bank).start()
    try:
        bank.start(60)
        deadline = time.monotonic() + 60
        while None in [f["applied"] for f in pair.status()["files"]]:     # seeded, streaming
            assert time.monotonic() < deadline, pair.status()
            time.sleep(0.3)
        with shots.browser() as b:
            page = b.new_page()
            shots.login(page, base(pair.primary), token=pair.primary.token)
            for _ in range(3):                        # each view adds a sample (at most one a second)
                page.goto(base(pair.primary) + "/dashboard/replication")
                time.sleep(1.1)
            card = page.locator("#rep-bank")
            assert "primary" in card.inner_text()
            assert card.locator("svg.chart polyline.line").count() == 2    # seconds and changes
            page.goto(base(pair.primary) + "/dashboard/")
            assert "primary" in page.locator("#db-bank").inner_text()
    finally:
        if bank.proc and bank.proc.poll() is None:
            bank.stop()
        pair.stop()


def test_lag_history_is_bounded() -> None:
    from bastion.dashboard.samples import LagHistory
    h = LagHistory(lambda: None, maxlen=5)
    for i in range(100):
        h.add(("replication", "db", "seconds"), float(i), at=float(i))
    pts = h.series("replication", "db")["seconds"]
    assert [v for _, v in pts] == [95.0, 96.0, 97.0, 98.0, 99.0]


def test_login_guessing_is_limited_like_the_api(dash) -> None:
    """The login form counts failures as the SQL API does: past 5 for one name, 429 without hashing."""
    d, _ = dash
    with httpx.Client(base_url=base(d)) as c:
        codes = []
        for _ in range(7):
            page = c.get("/dashboard/login")
            login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
            r = c.post("/dashboard/login", data={"login_csrf": login_csrf, "user": "reader", "password": "guess"})
            codes.append(r.status_code)
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429], codes
        assert "Too many failed logins" in r.text
        # the right password is refused too while the window lasts: guessing cannot go on
        page = c.get("/dashboard/login")
        login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        r = c.post("/dashboard/login", data={"login_csrf": login_csrf, "user": "reader", "password": READER_PW})
        assert r.status_code == 429
