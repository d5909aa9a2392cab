"""The HTTP API: thin routes over Daemon methods. Every endpoint needs the admin token."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import BastionError, UsageError
from .auth import token_matches
from .core import Daemon

log = logging.getLogger("bastion.api")


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


class FreezeRequest(TargetRequest):
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds before an automatic thaw")


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="Bastion", version=__version__,
                  description="Data protection for SQLite: continuous operations and freeze/thaw. "
                              "Every request needs `Authorization: Bearer <token>` (the token file in data_dir).")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # type: ignore[no-untyped-def]
        if not token_matches(daemon.token, request.headers.get("authorization")):
            return JSONResponse(status_code=401, content={"error": {
                "type": "AuthError", "message": "missing or wrong admin token", "exit_code": 2,
                "hint": "send 'Authorization: Bearer <token>' with the token from the daemon's data_dir",
                "path": None, "details": {}}})
        return await call_next(request)

    @app.exception_handler(BastionError)
    async def bastion_error(_: Request, exc: BastionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body is not Bastion's error format: the CLI would show a raw dict
        # and exit 2. A request the daemon cannot take is a usage error (exit 3).
        parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        err = UsageError("invalid request: " + "; ".join(parts), hint="see GET /openapi.json for the request format")
        return JSONResponse(status_code=422, content={"error": err.to_dict()})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"error": {
            "type": "BastionError", "message": f"internal error in the daemon: {type(exc).__name__}: {exc}",
            "hint": "see the daemon's log; please report this", "exit_code": 2, "path": None, "details": {}}})

    @app.get("/v1/status", summary="Protected databases and files, continuous operations and freezes")
    def status() -> dict[str, Any]:
        return daemon.status()

    @app.post("/v1/protect", summary="Protect files now: switch them to WAL mode and keep them open")
    def protect(req: TargetRequest) -> dict[str, Any]:
        return daemon.protect(req.targets, req.all)

    @app.post("/v1/contops/start", summary="startbu: put files into continuous operations at one instant")
    def startbu(req: StartRequest) -> dict[str, Any]:
        return daemon.startbu(req.targets, req.all, req.max_duration)

    @app.post("/v1/contops/end", summary="endbu: end continuous operations and roll the delta in")
    def endbu(req: EndRequest) -> dict[str, Any]:
        return daemon.endbu(req.targets, req.all, req.wait)

    @app.post("/v1/recover", summary="After an interrupted session: roll in, or discard changes since startbu")
    def recover(req: RecoverRequest) -> dict[str, Any]:
        return daemon.recover(req.targets, req.all, req.discard_changes)

    @app.post("/v1/backups", summary="Take a backup through continuous operations (applications keep writing)")
    def backup(req: BackupRequest) -> dict[str, Any]:
        return daemon.backup(req.targets, req.all, req.to)

    @app.get("/v1/backups/running", summary="Progress of backups under way")
    def backups_running() -> dict[str, Any]:
        return {"running": list(daemon.backups.running.values())}

    @app.post("/v1/restore/replace", summary="Put a backup back in place of the files it came from")
    def restore_replace(req: ReplaceRequest) -> dict[str, Any]:
        return daemon.restore_in_place(req.backup, req.repository)

    @app.post("/v1/freeze", summary="Freeze: hold every writer until thaw or timeout")
    def freeze(req: FreezeRequest) -> dict[str, Any]:
        return daemon.freeze(req.targets, req.all, req.timeout)

    @app.post("/v1/thaw", summary="Thaw: let writers go on; reports the hold time")
    def thaw(req: TargetRequest) -> dict[str, Any]:
        return daemon.thaw(req.targets, req.all)

    return app
