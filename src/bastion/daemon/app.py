"""The HTTP API: thin routes over Daemon methods. Every endpoint needs the admin token."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .. import __version__
from ..cluster import control
from ..errors import AuthError, BastionError, NotActive, UnknownTarget, UsageError, from_os_error, internal_error
from .auth import Authenticator
from ..backup.backups import BackupBatch, BackupResult
from ..contops import EndResult, RecoverResult, StartResult
from ..freeze import FreezeResult, ThawResult
from .core import Daemon, DaemonStatus

log = logging.getLogger("bastion.api")



def error_response(exc: BastionError, status: int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Bastion's HTTP error format, the only one the daemon answers with: {"error": exc.to_dict()}
    under the error's HTTP status. bastion.peer.error_from_response reads it back into the same
    class (the errors.py registry), so the CLI and other daemons see the type, not just words."""
    return JSONResponse(status_code=status or exc.http_status, content={"error": exc.to_dict()}, headers=headers)

class TargetRequest(BaseModel):
    targets: list[str] = Field(default_factory=list, description="database names or absolute file paths")
    all: bool = Field(False, description="every configured database and protected file")


class StartRequest(TargetRequest):
    max_duration: float | None = Field(None, gt=0, description="seconds; default from [contops] max_duration")


class EndRequest(TargetRequest):
    wait: bool = Field(True, description="return only once the delta is rolled in")


class RecoverRequest(TargetRequest):
    discard_changes: bool = Field(False, description="return the files to their startbu instant")


class BackupRequest(TargetRequest):
    to: str | None = Field(None, description="repository URL; default file://<data_dir>/backups")


class ReplaceRequest(BaseModel):
    backup: str
    repository: str | None = Field(None, description="repository URL; default from the config")


class DrillRequest(BaseModel):
    database: str
    repository: str | None = Field(None, description="repository URL; default the database's repository")


class FreezeRequest(TargetRequest):
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds before an automatic thaw")


class SQLRequest(BaseModel):
    statements: list[Any] = Field(..., min_length=1, description=(
        'each "SELECT ..." or {"sql": "...", "params": [...] | {name: value}, "many": [[...], ...]}; '
        'values are JSON null/number/string, {"$blob": "<base64>"} or {"$float": "inf"}'))
    readonly: bool = Field(False, description="run on a read-only connection even if the user may write")


class BeginRequest(BaseModel):
    statements: list[Any] = Field(default_factory=list, description="statements to run right after BEGIN")
    write: bool = Field(False, description="BEGIN IMMEDIATE: take the write lock now")
    readonly: bool = Field(False, description="a read-only transaction")


class SwitchoverRequest(BaseModel):
    to: str | None = Field(None, description="the node to hand over to (default: whichever passive node is first)")


class WorkRequest(BaseModel):
    statements: list[Any] = Field(..., min_length=1)


_PUBLIC_PREFIX = "/v1/health"


def _dashboard(path: str) -> bool:
    """The dashboard checks its own session cookie (bastion.dashboard), with the same token and users."""
    return path == "/" or path == "/dashboard" or path.startswith("/dashboard/")


class SQLBodyLimit:
    """SQL requests larger than [sql] max_request_bytes are refused before they are read:
    a JSON body costs several times its size once parsed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/sql/"):
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            resp = error_response(UsageError(
                f"the request body is larger than the server takes ({self.limit} bytes)", details={"limit": self.limit},
                hint="send fewer rows per request; [sql] max_request_bytes raises the limit"), status=413)
            return await resp(scope, receive, send)
        seen = 0

        async def counted() -> dict:     # no Content-Length (chunked): stop reading past the limit
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            return {"type": "http.disconnect"} if seen > self.limit else msg
        return await self.app(scope, counted, send)


class AuthMiddleware:
    """Every request but /v1/health needs credentials: the admin token everywhere, a
    configured user only under /v1/sql/. Plain ASGI (not BaseHTTPMiddleware), because it
    runs on every SQL request and should cost microseconds."""

    def __init__(self, app: Any, auth: Authenticator, node: Any = None, peer: Any = None) -> None:
        self.app, self.auth, self.node, self.peer = app, auth, node, peer
        # scrypt runs on threads of its own: password guessing cannot take the API's threads
        self.hashing = anyio.CapacityLimiter(4)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_PUBLIC_PREFIX) or _dashboard(scope["path"]):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if scope["path"].startswith("/v1/peer/"):
            # replication peers: the shared peer token, and only here (never the admin API)
            allowed = None if self.peer is None else self.peer(header)
            if allowed is None and self.node is not None:
                resp = error_response(NotActive(
                    f"node {self.node.name} is {self.node.role}: it takes no peer requests now",
                    details={"role": self.node.role}, hint="it is changing roles; retry"))
                return await resp(scope, receive, send)
            if not allowed:
                resp = error_response(AuthError("missing or wrong peer token",
                                                hint="both daemons must read the same [replication] peer_token_file"))
                return await resp(scope, receive, send)
            return await self.app(scope, receive, send)
        principal = self.auth.cached(header)
        if principal is None and header and header.startswith("Basic "):
            client = (scope.get("client") or ("?", 0))[0]
            principal, wait = await anyio.to_thread.run_sync(self.auth.login, header, client, limiter=self.hashing)
            if wait > 0:
                resp = error_response(AuthError("too many failed logins from this address: try again later",
                                                details={"retry_after": round(wait, 1)},
                                                hint=f"wait {wait:.0f} s; check the user name and password"),
                                      status=429, headers={"Retry-After": str(int(wait) + 1)})
                return await resp(scope, receive, send)
        path = scope["path"]
        sql = path.startswith("/v1/sql/")
        if principal is None or (not principal.admin and not sql):
            resp = error_response(AuthError(
                "missing or wrong credentials" if sql else "missing or wrong admin token",
                hint=("send HTTP Basic credentials of a user in [users], or the admin token" if sql else
                      "send 'Authorization: Bearer <token>' with the token from the daemon's data_dir")),
                headers={"WWW-Authenticate": 'Basic realm="bastion"'} if sql else None)
            return await resp(scope, receive, send)
        if (self.node is not None and self.node.role != "active" and not path.startswith("/v1/cluster/")
                and path != "/metrics"):      # a passive node is scraped too (its role, lease, lag)
            resp = error_response(NotActive(
                f"node {self.node.name} is {self.node.role}, not active", details={"role": self.node.role},
                # people get the active node's name (a lease read, off the loop); drivers move on at once
                hint="drivers retry on the active node on their own" if sql else
                     await run_in_threadpool(self.node.active_hint)))
            return await resp(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, receive, send)


class _App(FastAPI):
    """FastAPI, except that the SQL requests (POST /v1/sql/...) go straight to a stack of their
    own, plain ASGI (metrics, body limit, auth, bastion.sql.routes.SQLRoutes): a point query
    costs less than FastAPI's per-request machinery. Everything else is FastAPI's."""

    sql_stack: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from ..sql.routes import error_body, is_sql_route
        if self.sql_stack is None or scope["type"] != "http" or scope["method"] != "POST" \
                or not is_sql_route(scope["path"]):
            return await super().__call__(scope, receive, send)
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)
        try:
            await self.sql_stack(scope, receive, sending)
        except Exception as exc:        # as FastAPI's handlers would answer, in Bastion's format
            if started:
                raise
            status, body = error_body(exc, scope["path"])
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})


def create_app(daemon: Daemon, node: Any = None) -> FastAPI:
    auth = Authenticator(daemon.token, daemon.config.users)
    sql_settings = daemon.config.sql

    app = _App(title="Bastion", version=__version__,
                  description="Data protection for SQLite: continuous operations and freeze/thaw. "
                              "Every request needs `Authorization: Bearer <token>` (the token file in data_dir).")

    app.add_middleware(AuthMiddleware, auth=auth, node=node, peer=lambda h: _peer_allowed(daemon, h))
    app.add_middleware(SQLBodyLimit, limit=sql_settings.max_request_bytes)
    from ..metrics import CONTENT_TYPE, Metrics, SQLMetricsMiddleware
    metrics = Metrics(daemon, node)
    app.add_middleware(SQLMetricsMiddleware, metrics=metrics)   # outside auth: refused requests count too
    # the SQL requests' own stack: the same middlewares around bastion.sql.routes.SQLRoutes
    from ..sql.routes import SQLRoutes
    app.sql_stack = SQLMetricsMiddleware(SQLBodyLimit(AuthMiddleware(
        SQLRoutes(None, service=lambda: daemon.sql, threads=sql_settings.threads),
        auth=auth, node=node, peer=None), limit=sql_settings.max_request_bytes), metrics=metrics)

    @app.exception_handler(BastionError)
    async def bastion_error(_: Request, exc: BastionError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body is not Bastion's error format: the CLI would show a raw dict
        # and exit 2. A request the daemon cannot take is a usage error (exit 3).
        parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        err = UsageError("invalid request: " + "; ".join(parts), hint="see GET /openapi.json for the request format")
        return error_response(err, status=422)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        # a file-system refusal (disk full, permission, read-only, I/O error) that no library call
        # put in words: still a Bastion error with the path and a hint, not "internal error"
        err = from_os_error(exc, f"{request.method} {request.url.path}")
        log.warning("%s (%s)", err.message, type(exc).__name__)
        return error_response(err)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(internal_error(exc))

    @app.get("/metrics", summary="Prometheus metrics (text format; needs the admin token)")
    def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # response_model: the typed dict goes out as is (a TypedDict model would have pydantic re-check it)
    @app.get("/v1/status", response_model=dict[str, Any],
             summary="Protected databases and files, continuous operations and freezes")
    def status() -> DaemonStatus:
        return daemon.status()

    @app.post("/v1/protect", summary="Protect files now: switch them to WAL mode and keep them open")
    def protect(req: TargetRequest) -> dict[str, Any]:
        return daemon.protect(req.targets, req.all)

    # response_model=dict on the routes below: their TypedDicts go out as they are, as /v1/status
    @app.post("/v1/contops/start", response_model=dict[str, Any],
              summary="startbu: put files into continuous operations at one instant")
    def startbu(req: StartRequest) -> StartResult:
        return daemon.startbu(req.targets, req.all, req.max_duration)

    @app.post("/v1/contops/end", response_model=dict[str, Any],
              summary="endbu: end continuous operations and roll the delta in")
    def endbu(req: EndRequest) -> EndResult:
        return daemon.endbu(req.targets, req.all, req.wait)

    @app.post("/v1/recover", response_model=dict[str, Any],
              summary="After an interrupted session: roll in, or discard changes since startbu")
    def recover(req: RecoverRequest) -> RecoverResult:
        return daemon.recover(req.targets, req.all, req.discard_changes)

    @app.post("/v1/backups", response_model=dict[str, Any],
              summary="Take a backup through continuous operations (applications keep writing)")
    def backup(req: BackupRequest) -> BackupResult | BackupBatch:
        return daemon.backup(req.targets, req.all, req.to)

    @app.get("/v1/backups/running", summary="Progress of backups under way")
    def backups_running() -> dict[str, Any]:
        return {"running": list(daemon.backups.running.values())}

    @app.post("/v1/restore/replace", summary="Put a backup back in place of the files it came from")
    def restore_replace(req: ReplaceRequest) -> dict[str, Any]:
        return daemon.restore_in_place(req.backup, req.repository)

    @app.post("/v1/drill", summary="Recovery drill: restore the newest backup into scratch, verify, check, RTO/RPO")
    def drill(req: DrillRequest) -> dict[str, Any]:
        return daemon.drill(req.database, req.repository)

    @app.get("/v1/drills", summary="Recent recovery drills, newest first")
    def drills(database: str | None = None, limit: int = 10) -> dict[str, Any]:
        return {"drills": daemon.state_store().drills(database, max(1, min(limit, 100)))}

    @app.post("/v1/freeze", response_model=dict[str, Any], summary="Freeze: hold every writer until thaw or timeout")
    def freeze(req: FreezeRequest) -> FreezeResult:
        return daemon.freeze(req.targets, req.all, req.timeout)

    @app.post("/v1/thaw", response_model=dict[str, Any], summary="Thaw: let writers go on; reports the hold time")
    def thaw(req: TargetRequest) -> ThawResult:
        return daemon.thaw(req.targets, req.all)

    def role() -> dict[str, Any]:
        if node is None:
            return {"role": "active", "writable": True, "node": None, "lag_seconds": 0.0}
        # replicated mode: lag as the active sees its standby, or the standby's last apply
        return {"role": node.role, "writable": node.may_write(), "node": node.name, **node.lag()}

    @app.get("/v1/health", summary="For load balancers and drivers: this node's role (no credentials needed)")
    def health() -> dict[str, Any]:
        return {**role(), "version": __version__}

    @app.get("/v1/health/active", summary="200 if this node is active (accepts writes), else 503")
    def health_active() -> JSONResponse:
        r = role()
        return JSONResponse(status_code=200 if r["writable"] else 503, content=r)

    @app.get("/v1/health/standby", summary="200 if this node is a standby (passive), else 503")
    def health_standby() -> JSONResponse:
        r = role()
        ready = r["role"] == "passive" and (node is None or node.replicated is None or node.standby is not None)
        return JSONResponse(status_code=200 if ready else 503, content=r)

    @app.get("/v1/cluster/status", summary="This node's role, the lease and recent events")
    def cluster_status() -> dict[str, Any]:
        return control.node_status(node)

    @app.post("/v1/cluster/switchover", summary="Planned switchover: the active node hands the lease over")
    def cluster_switchover(req: SwitchoverRequest) -> dict[str, Any]:
        if node is None:
            raise UsageError("this daemon is not part of a cluster (no [cluster] section in its config)")
        # "exit_code" stays in the answer for clients written against earlier versions
        return {**control.handover(node, req.to).to_dict(), "exit_code": 0}

    # The SQL routes are served by app.sql_stack (bastion.sql.routes.SQLRoutes, on the SQL
    # service's own threads) before FastAPI sees the request; they are declared here too, with
    # the same models, for the OpenAPI description.
    def served_by_sql_routes() -> dict[str, Any]:
        raise AssertionError("POST /v1/sql/... is answered by bastion.sql.routes.SQLRoutes")

    @app.post("/v1/sql/{database}", summary="Run statements as one atomic batch")
    def sql_batch(database: str, req: SQLRequest) -> dict[str, Any]:
        return served_by_sql_routes()

    @app.post("/v1/sql/{database}/transactions", summary="Begin an interactive transaction")
    def sql_begin(database: str, req: BeginRequest) -> dict[str, Any]:
        return served_by_sql_routes()

    @app.post("/v1/sql/{database}/transactions/{tid}", summary="Run statements inside an open transaction")
    def sql_work(database: str, tid: str, req: WorkRequest) -> dict[str, Any]:
        return served_by_sql_routes()

    @app.post("/v1/sql/{database}/transactions/{tid}/commit", summary="Commit (returns once durable)")
    def sql_commit(database: str, tid: str) -> dict[str, Any]:
        return served_by_sql_routes()

    @app.post("/v1/sql/{database}/transactions/{tid}/rollback", summary="Roll back")
    def sql_rollback(database: str, tid: str) -> dict[str, Any]:
        return served_by_sql_routes()

    _replication_routes(app, daemon, node)
    _conflict_routes(app, daemon)
    _sync_routes(app, daemon)
    from ..dashboard import mount
    app.state.lag_history = mount(app, daemon, auth, node)
    return app


class SyncRunRequest(BaseModel):
    database: str
    timeout: float = Field(300.0, gt=0, le=86400)


class SyncPeerRequest(BaseModel):
    database: str
    group: str
    site: str
    file: int
    files: int


def _sync_routes(app: FastAPI, daemon: Any) -> None:
    """Multi-site sync (issue 5): admin routes under /v1/sync/, peer routes under /v1/peer/sync/."""
    import os

    import msgpack
    from starlette.background import BackgroundTask
    from starlette.responses import FileResponse

    @app.get("/v1/sync/status", summary="Sync: per database, group, neighbours, vectors, lag, last error")
    def sync_status(database: str | None = None) -> dict[str, Any]:
        return daemon.sync.status(database)

    @app.post("/v1/sync/run", summary="Exchange every pending change of a synced database now")
    def sync_run(req: SyncRunRequest) -> dict[str, Any]:
        return daemon.sync.get(req.database).run_now(req.timeout)

    @app.get("/v1/sync/check", summary="Sync: do all sites hold the same rows, and do the group's invariants hold")
    def sync_check(database: str) -> dict[str, Any]:
        return daemon.sync.get(database).check()

    @app.post("/v1/peer/sync/check", summary="Peer: this site's vectors, row digests and invariant values")
    def peer_sync_check(req: SyncPeerRequest) -> dict[str, Any]:
        s = daemon.sync.get(req.database)
        s._file(req.model_dump())
        return s.check_report()

    @app.post("/v1/peer/sync/vector", summary="Peer: which changes this site holds, per origin")
    def peer_sync_vector(req: SyncPeerRequest) -> dict[str, Any]:
        return daemon.sync.get(req.database).vector(req.model_dump())

    @app.post("/v1/peer/sync/apply", summary="Peer: apply one batch of changes (msgpack) with the group's policy")
    async def peer_sync_apply(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type") != "application/msgpack":
            raise UsageError("send the batch as application/msgpack")
        try:
            d = msgpack.unpackb(await request.body(), raw=False)
            batch = d.pop("batch")
            s = daemon.sync.get(str(d["database"]))
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise UsageError(f"bad sync batch: {type(exc).__name__}: {exc}") from None
        return await run_in_threadpool(s.apply, d, batch)

    @app.post("/v1/peer/sync/snapshot", summary="Peer: a consistent copy of one file, for a joining site",
              response_model=None, response_class=FileResponse)
    def peer_sync_snapshot(req: SyncPeerRequest) -> FileResponse:
        path = daemon.sync.snapshot(req.model_dump())
        return FileResponse(path, media_type="application/octet-stream",
                            background=BackgroundTask(os.remove, path))


class ResolveRequest(BaseModel):
    action: str = Field(pattern="^(reapply|dismiss)$")
    version: str | None = Field(None, pattern="^(local|remote)$")
    file: int = Field(0, ge=0)


def _conflict_routes(app: FastAPI, daemon: Any) -> None:
    """The conflict log of sync and of replicated failover (bastion.sync.conflicts)."""
    import os

    from ..sync import conflict_log as conflicts

    def files_of(name: str) -> tuple[str, ...]:
        db = daemon.config.databases.get(name)
        if db is None:
            raise UnknownTarget(f"no database {name!r} in this daemon's config",
                                hint="databases: " + ", ".join(sorted(daemon.config.databases)))
        return db.files

    @app.get("/v1/conflicts", summary="Recorded conflicts (unresolved, or all), per database and file")
    def conflicts_list(database: str | None = None, all: bool = False) -> dict[str, Any]:
        names = [database] if database else sorted(daemon.config.databases)
        found = []
        for name in names:
            for i, path in enumerate(files_of(name)):
                if os.path.exists(path):
                    found += [{**conflicts.for_json(c), "database": name, "file": i}
                              for c in conflicts.listing(path, unresolved=not all)]
        return {"conflicts": found}

    @app.get("/v1/conflicts/{database}/{cid}", summary="One conflict with both versions")
    def conflicts_show(database: str, cid: int, file: int = 0) -> dict[str, Any]:
        files = files_of(database)
        if not 0 <= file < len(files):
            raise UsageError(f"database {database} has {len(files)} file(s): --file {file} is out of range")
        return {**conflicts.for_json(conflicts.get(files[file], cid)), "database": database, "file": file}

    @app.post("/v1/conflicts/{database}/{cid}/resolve", summary="Dismiss a conflict, or re-apply its loser")
    def conflicts_resolve(database: str, cid: int, req: ResolveRequest) -> dict[str, Any]:
        files = files_of(database)
        if not 0 <= req.file < len(files):
            raise UsageError(f"database {database} has {len(files)} file(s): --file {req.file} is out of range")
        res = conflicts.resolve(files[req.file], cid, req.action, by="admin", version=req.version)
        return {**conflicts.for_json(res), "database": database, "file": req.file}


def _peer_allowed(daemon: Any, header: str | None) -> bool | None:
    """True/False: the peer token is right or wrong; None: this node has nothing open that
    takes peer requests now (a cluster node between roles), so it cannot tell."""
    try:
        return daemon.replication.peer_allowed(header)
    except BastionError:
        return None


class PeerRequest(BaseModel):
    database: str
    origin: str
    files: int = Field(..., ge=1)


class SeedCommitRequest(PeerRequest):
    seed: str
    positions: list[dict[str, int]]


class TakeoverRequest(BaseModel):
    database: str


def _replicated_active(node: Any) -> Any:
    if node is None or node.replicated is None:
        raise UsageError("this daemon is not a node of a replicated cluster")
    if node.role != "active":
        raise NotActive(f"node {node.name} is {node.role}: ask the active node")
    return node


class ReplicateRequest(BaseModel):
    database: str
    timeout: float = Field(300.0, gt=0, le=86400)


def _replication_routes(app: FastAPI, daemon: Daemon, node: Any = None) -> None:
    """Real-time backup (issue 4): admin routes under /v1/replication/, peer routes under /v1/peer/."""
    import os

    import msgpack

    from .. import capture

    def rep() -> Any:
        return daemon.replication    # looked up per request: a cluster node opens its Daemon later

    @app.get("/v1/replication/status", summary="Replication: positions shipped and applied, lag, last error")
    def replication_status(database: str | None = None) -> dict[str, Any]:
        return rep().status(database)

    @app.post("/v1/replication/run", summary="Ship every pending change of a database now")
    def replication_run(req: ReplicateRequest) -> dict[str, Any]:
        return rep().run(req.database, req.timeout)

    @app.post("/v1/replication/promote", summary="On the backup daemon: make a replica a normal writable database")
    def replication_promote(req: ReplicateRequest) -> dict[str, Any]:
        return rep().promote(req.database)

    @app.post("/v1/peer/positions", summary="Peer: the positions this replica holds")
    def peer_positions(req: PeerRequest) -> dict[str, Any]:
        return rep().receiver.positions(req.database, req.origin, req.files)

    @app.post("/v1/peer/apply", summary="Peer: one chunk (msgpack) of a cut; the final chunk applies the cut")
    async def peer_apply(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type") != "application/msgpack":
            raise UsageError("send the batch as application/msgpack")
        try:
            d = msgpack.unpackb(await request.body(), raw=False)
            args = (d["database"], d["origin"], int(d["files"]), str(d["cut"]), int(d["chunk"]),
                    bool(d["final"]), int(d["file"]), d["batch"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise UsageError(f"bad batch: {type(exc).__name__}: {exc}") from None
        return await run_in_threadpool(rep().receiver.apply, *args)

    @app.post("/v1/peer/seed/upload", summary="Peer: upload one file of a seed (octet-stream)")
    async def peer_seed_upload(request: Request, database: str, files: int, file: int, seed: str) -> dict[str, Any]:
        path = await run_in_threadpool(rep().receiver.seed_file_path, database, files, file, seed)
        part = path + ".part"
        size = 0
        with open(part, "wb") as fh:      # a staged name no SQLite connection ever opens
            async for chunk in request.stream():
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
        return {"path": path, "bytes": size}

    @app.post("/v1/peer/takeover", summary="Peer: what this node holds of the primary it took over from")
    def peer_takeover(req: TakeoverRequest) -> dict[str, Any]:
        n = _replicated_active(node)
        if req.database not in daemon.config.databases:
            raise UnknownTarget(f"no database {req.database!r} here")
        return n.replicated.takeover_record(req.database)

    @app.post("/v1/peer/reconcile", summary="Peer: an old primary's changes that never reached this node")
    async def peer_reconcile(request: Request) -> dict[str, Any]:
        from ..cluster.standby import reconcile_record
        _replicated_active(node)
        try:
            d = msgpack.unpackb(await request.body(), raw=False)
            name, origin, who, i = d["database"], d["origin"], d["node"], int(d["file"])
            files = daemon.config.databases[name].files
            path = files[i]
            changes = capture.from_wire(d["batch"]) if "batch" in d else None
            conflicts = d.get("conflicts")
        except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException) as exc:
            raise UsageError(f"bad reconcile request: {type(exc).__name__}: {exc}") from None
        n = await run_in_threadpool(reconcile_record, path, origin, who, changes, conflicts)
        return {"database": name, "file": i, "recorded": n}

    @app.post("/v1/peer/seed/commit", summary="Peer: every seed file is uploaded; swap them in")
    def peer_seed_commit(req: SeedCommitRequest) -> dict[str, Any]:
        return rep().receiver.seed_commit(req.database, req.origin, req.seed, req.positions)
