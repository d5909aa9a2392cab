"""The web dashboard: server-rendered pages under /dashboard, served by the daemon itself.

No build step and no third-party front end: Jinja templates (autoescaped: every value from
a database or a repository is untrusted), a stylesheet, a few lines of script for the
copy buttons, and charts drawn as inline SVG on the server. Routes stay thin over
views.py, which calls the same library functions as the admin API."""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from ..errors import BastionError
from . import svg, views
from .samples import LagHistory
from .session import COOKIE, LOGIN_COOKIE, PATH, Sessions, cookie_header, same

_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
_HEADERS = {
    # no inline script runs even if something slipped through escaping; no framing (clickjacking)
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def mount(app: FastAPI, daemon: Any, auth: Any, node: Any = None) -> LagHistory:
    """Add the dashboard routes to ``app``. ``auth`` is the API's Authenticator (same token, same users)."""
    import importlib.resources

    env = Environment(loader=PackageLoader("bastion.dashboard", "templates"),
                      autoescape=select_autoescape(default=True))
    env.globals.update(line=svg.line, bars=svg.bars, human_bytes=svg.human_bytes)
    static = importlib.resources.files("bastion.dashboard") / "static"
    sessions = Sessions()
    secure = bool((node or daemon).config.tls_cert)      # Secure cookies when the daemon serves TLS
    history = LagHistory(lambda: daemon)
    history.start()

    def render(name: str, status: int = 200, headers: dict[str, str] | None = None, **ctx: Any) -> HTMLResponse:
        body = env.get_template(name).render(**ctx)
        return HTMLResponse(body, status_code=status, headers={**_HEADERS, **(headers or {})})

    def current(request: Request) -> Any:
        return sessions.get(request.cookies.get(COOKIE))

    def to_login() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/login", status_code=303)

    def page(request: Request, name: str, active: str, **ctx: Any) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        return render(name, user=s.principal, csrf=s.csrf, active=active, clustered=node is not None, **ctx)

    def same_origin(request: Request) -> bool:
        """A browser sends Origin on every POST; when it does, it must be this daemon."""
        origin = request.headers.get("origin")     # "null" under a no-referrer policy: refused
        if origin is None:       # not a browser form (curl, tests): the CSRF token still decides
            return True
        return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"

    async def form(request: Request) -> dict[str, str]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return {}
        body = (await request.body())[:65536].decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def refused(status: int, message: str) -> HTMLResponse:
        return render("message.html", status=status, title="Refused", message=message, user=None, active="")

    @app.get(PATH, include_in_schema=False)
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/", status_code=303)

    @app.get(f"{PATH}/static/{{name}}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in _STATIC:
            return Response("not found", status_code=404)
        return Response((static / name).read_bytes(), media_type=_STATIC[name],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=300"})

    @app.get(f"{PATH}/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        if current(request) is not None:
            return RedirectResponse(f"{PATH}/", status_code=303)
        return _login_form(None)

    def _login_form(error: str | None, status: int = 200) -> Response:
        import secrets
        token = secrets.token_urlsafe(24)
        return render("login.html", status=status, error=error, login_csrf=token, user=None, active="",
                      headers={"Set-Cookie": cookie_header(LOGIN_COOKIE, token, secure, max_age=3600)})

    @app.post(f"{PATH}/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        f = await form(request)
        if not same_origin(request) or not same(f.get("login_csrf"), request.cookies.get(LOGIN_COOKIE)):
            return refused(403, "The login form expired or came from another site: open the login page again.")
        if f.get("token"):
            header = "Bearer " + f["token"].strip()
        elif f.get("user"):
            header = "Basic " + base64.b64encode(f"{f['user']}:{f.get('password', '')}".encode()).decode()
        else:
            return _login_form("Enter the admin token, or a user name and password.", 400)
        # the API's own limiter: failures count per client and user, and an unknown name costs a scrypt
        client = request.client.host if request.client else "?"
        if header.startswith("Basic "):
            principal, wait = await run_in_threadpool(auth.login, header, client)   # scrypt: off the event loop
            if wait > 0:
                return _login_form(f"Too many failed logins from this address: try again in {int(wait) + 1} s.", 429)
        else:
            principal = await run_in_threadpool(auth.principal, header)
        if principal is None:
            await asyncio.sleep(0.5)       # slows guessing a little; scrypt does the rest
            return _login_form("Wrong token, or wrong user name or password.", 401)
        sid, _ = sessions.create(principal)
        resp = RedirectResponse(f"{PATH}/", status_code=303)
        resp.headers.append("Set-Cookie", cookie_header(COOKIE, sid, secure))
        resp.headers.append("Set-Cookie", cookie_header(LOGIN_COOKIE, "", secure, max_age=0))
        return resp

    @app.post(f"{PATH}/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        s = current(request)
        f = await form(request)
        if s is not None and same_origin(request) and same(f.get("csrf"), s.csrf):
            sessions.drop(request.cookies.get(COOKIE))
        resp = to_login()
        resp.headers.append("Set-Cookie", cookie_header(COOKIE, "", secure, max_age=0))
        return resp

    @app.get(f"{PATH}/", include_in_schema=False)
    def overview(request: Request) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        data, err = views.guarded(lambda: views.overview(daemon, s.principal), None)
        return page(request, "overview.html", "overview", data=data, error=err, cluster=views.cluster(node))

    @app.get(f"{PATH}/backups", include_in_schema=False)
    def backups(request: Request) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        data, err = views.guarded(lambda: views.backups(daemon, s.principal), [])
        return page(request, "backups.html", "backups", repos=data, error=err)

    @app.get(f"{PATH}/replication", include_in_schema=False)
    def replication(request: Request) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        data, err = views.guarded(lambda: views.replication(daemon, s.principal, history), None)
        return page(request, "replication.html", "replication", data=data, error=err, interval=history.interval)

    @app.get(f"{PATH}/conflicts", include_in_schema=False)
    def conflicts(request: Request, all: bool = False, done: str | None = None) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        data, err = views.guarded(lambda: views.conflicts(daemon, s.principal, all), [])
        return page(request, "conflicts.html", "conflicts", conflicts=data, error=err, show_all=all, done=done)

    @app.post(f"{PATH}/conflicts/{{database}}/{{cid}}/resolve", include_in_schema=False)
    async def resolve(request: Request, database: str, cid: int) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        f = await form(request)
        if not same_origin(request) or not same(f.get("csrf"), s.csrf):
            return refused(403, "This form did not come from this dashboard session (CSRF check failed): "
                                "reload the page and try again.")
        try:
            file = int(f.get("file", "0"))
            res = await run_in_threadpool(views.resolve, daemon, s.principal, database, cid, f.get("action", ""),
                                          f.get("version") or None, file)
        except ValueError:
            return refused(400, "bad form: file must be a number")
        except Exception as exc:  # the library's words on a page, not a JSON body
            status = exc.http_status if isinstance(exc, BastionError) else 500
            return render("message.html", status=status, title="Not resolved", user=s.principal,
                          csrf=s.csrf, active="conflicts", message=views._err(exc))
        note = quote(f"{database} #{res['id']}: {res['resolution']}")
        return RedirectResponse(f"{PATH}/conflicts?done={note}", status_code=303)

    @app.get(f"{PATH}/cluster", include_in_schema=False)
    def cluster(request: Request) -> Response:
        return page(request, "cluster.html", "cluster", cluster=views.cluster(node))

    @app.get(f"{PATH}/events", include_in_schema=False)
    def events(request: Request) -> Response:
        s = current(request)
        if s is None:
            return to_login()
        if not s.principal.admin:
            return render("message.html", status=403, title="Admins only", user=s.principal, csrf=s.csrf,
                          active="events", message="The daemon's history covers every database: log in with the "
                                                   "admin token to see it.")
        data, err = views.guarded(lambda: views.events(daemon, node), [])
        return page(request, "events.html", "events", events=data, error=err)

    return history
