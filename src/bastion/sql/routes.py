"""The SQL routes (POST /v1/sql/...) as plain ASGI, on the SQL service's own worker threads.

Every point read pays the request path, so this one skips what the admin API may spend:
FastAPI's routing, pydantic models and anyio's thread hop cost more than the query itself.
The body is read and checked here (the same fields and error format as the models the
FastAPI app declares for these paths, which stay there for the OpenAPI description), the
call runs on a worker thread of ours, which also encodes the answer, and the event loop
only moves bytes. Credentials and the body limit are checked by the middlewares outside
this one, which stay in force.

A request whose client goes away is cancelled: not started if it still waits for a worker
thread, stopped while it waits for the write lock (service.py), interrupted while its
statement runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..errors import BastionError, UsageError, from_os_error, internal_error

log = logging.getLogger("bastion.sql")


# what pydantic's bool takes (True == 1, False == 0)
_TRUE = frozenset({True, "1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({False, "0", "false", "f", "no", "n", "off"})


def _json(content: Any) -> bytes:
    # as Starlette's JSONResponse renders it (the admin API's answers look the same)
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def error_body(exc: BaseException, where: str) -> tuple[int, bytes]:
    """Bastion's error format ({"error": ...} under the error's status) for any exception."""
    if isinstance(exc, OSError):
        exc = from_os_error(exc, where)
    if not isinstance(exc, BastionError):
        log.error("unexpected error in %s", where, exc_info=exc)
        exc = internal_error(exc)
    return exc.http_status, _json({"error": exc.to_dict()})


class Workers:
    """The SQL service's threads: a job waits in a queue for a free one (the admin API runs on
    other threads, so queued SQL never holds it up). Each thread also encodes its answer."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: dict[asyncio.AbstractEventLoop, _Answers] = {}
        self._threads = [threading.Thread(target=self._serve, name=f"bastion-sql-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[list[Any]], Any]) -> asyncio.Future[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        answers = self._answers.get(loop)
        if answers is None:
            answers = self._answers[loop] = _Answers(loop)
        self._jobs.put((answers, fut, fn))
        return fut

    def _serve(self) -> None:
        while True:
            answers, fut, fn = self._jobs.get()
            acks: list[Any] = []        # a durable commit: its answer leaves once its fsync is done
            try:
                answer = 200, _json(fn(acks))       # the service drops a request whose client has gone
            except BaseException as exc:  # every failure is an answer; the thread goes on
                answer = error_body(exc, "SQL request")
            if acks:    # this thread goes on to the next request meanwhile (committer.py)
                _when_durable(acks[0], answers, fut, answer)
            else:
                answers.put(fut, answer)


class _Answers:
    """Answers handed to the event loop by other threads: one wake-up of the loop for all
    those ready at once (group commit makes several durable together)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[tuple[int, bytes]], tuple[int, bytes]]] = []

    def put(self, fut: asyncio.Future[tuple[int, bytes]], answer: tuple[int, bytes]) -> None:
        with self._lock:
            self._ready.append((fut, answer))
            if len(self._ready) > 1:
                return          # a flush is already on its way
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for fut, answer in ready:
            if not fut.done():
                fut.set_result(answer)


def _when_durable(ack: Any, answers: _Answers, fut: asyncio.Future[tuple[int, bytes]],
                  answer: tuple[int, bytes]) -> None:
    """Answer once the commit is durable (or with the reason it cannot be)."""
    committer, ticket = ack

    def done(err: str | None) -> None:
        answers.put(fut, answer if err is None else error_body(committer.failure(err), "SQL commit"))
    committer.when_durable(ticket, done)


def _flag(body: dict[str, Any], name: str, errors: list[str]) -> bool:
    v = body.get(name, False)
    if isinstance(v, str):
        v = v.lower()
    elif not isinstance(v, int):        # bool is an int; floats, lists, objects are not flags
        v = None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    errors.append(f"{name}: Input should be a valid boolean")
    return False


def _statements(body: dict[str, Any], required: bool, errors: list[str]) -> list[Any]:
    if "statements" not in body:
        if required:
            errors.append("statements: Field required")
        return []
    st = body["statements"]
    if not isinstance(st, list):
        errors.append("statements: Input should be a valid list")
        return []
    if required and not st:
        errors.append("statements: List should have at least 1 item after validation, not 0")
    return st


def is_sql_route(path: str) -> bool:
    """/v1/sql/{database}[/transactions[/{tid}[/commit|/rollback]]]"""
    if not path.startswith("/v1/sql/"):
        return False
    parts = path[8:].split("/")
    n = len(parts)
    return n <= 4 and all(parts) and (n == 1 or parts[1] == "transactions") and \
        (n < 4 or parts[3] in ("commit", "rollback"))


class SQLRoutes:
    """ASGI middleware answering POST /v1/sql/{database}[/transactions[/{tid}[/commit|/rollback]]];
    anything else goes on to the app (so other methods get the framework's 405, unknown paths 404).
    ``service`` returns the SQL service (on a cluster node: the active daemon's, or raises NotActive)."""

    def __init__(self, app: Any, service: Callable[[], Any], threads: int) -> None:
        self.app, self.service = app, service
        self.workers = Workers(threads)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope["method"] != "POST" or not is_sql_route(path):
            return await self.app(scope, receive, send)
        parts = path[8:].split("/")
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        cancel = threading.Event()
        try:
            call = self._call(parts, b"".join(chunks), scope["state"]["principal"], cancel)
        except BastionError as exc:
            status, body = error_body(exc, path)
        else:
            status, body = await self._run(call, cancel, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def _run(self, call: Callable[[list[Any]], Any], cancel: threading.Event, receive: Any) -> tuple[int, bytes]:
        fut = self.workers.submit(call)
        # the body is read: the next message is the client hanging up (or our answer sent)
        gone = asyncio.ensure_future(receive())

        def hung_up(_: Any) -> None:
            cancel.set()
        gone.add_done_callback(hung_up)
        try:
            return await fut
        finally:
            gone.remove_done_callback(hung_up)
            gone.cancel()

    def _call(self, parts: list[str], raw: bytes, principal: Any,
              cancel: threading.Event) -> Callable[[list[Any]], Any]:
        """The service call for this path and body; a body that does not fit is a UsageError (422)."""
        db, n = parts[0], len(parts)
        if n == 4:                      # commit / rollback: no body
            commit = parts[3] == "commit"
            return lambda acks: self.service().finish(principal, parts[2], commit, acks=acks)
        errors: list[str] = []
        body: Any = {}
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append(f"body: JSON decode error: {exc}")
        elif n != 2:
            errors.append("body: Field required")
        if not errors and not isinstance(body, dict):
            errors.append("body: Input should be a valid dictionary or object to extract fields from")
        if not errors:
            statements = _statements(body, n != 2, errors)
            readonly = _flag(body, "readonly", errors) if n <= 2 else False
            write = _flag(body, "write", errors) if n == 2 else False
        if errors:
            err = UsageError("invalid request: " + "; ".join(errors),
                             hint="see GET /openapi.json for the request format")
            err.http_status = 422       # as the app's other invalid requests
            raise err
        if n == 1:
            return lambda acks: self.service().execute(principal, db, statements, readonly, cancel=cancel,
                                                       acks=acks)
        if n == 2:
            return lambda _: self.service().begin(principal, db, statements, write, readonly, cancel=cancel)
        return lambda _: self.service().run_in(principal, parts[2], statements, db, cancel=cancel)
