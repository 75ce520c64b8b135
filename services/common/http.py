"""ASGI pieces every FastAPI service puts in front of its routes.

:func:`install_error_handlers` makes every FastAPI service answer ``{"error", "code"}`` for a
:class:`~services.common.errors.ServiceError`, for request validation failures and for anything
unexpected (an opaque 500 that is logged with the request id, never a traceback to the caller).
:class:`BodySizeLimit` refuses oversized request bodies with 413 in that error shape.
It checks the declared ``Content-Length`` first (no byte read) and then counts the bytes that
really arrive, because a chunked upload has no Content-Length and a client can lie in it. The
body is buffered (at most the limit) and handed to the app in one message; the services parse
whole JSON documents anyway, so nothing streams past this point. Two more checks come before
any body byte is read: a service's own header check (the gateway's API key: 401), and the
process-wide :class:`BodyBudget` (503 with ``Retry-After`` when the bodies buffered at once,
across every connection, would pass ``max_buffered_bytes``). What a burst of large bodies
left in the C heap is given back to the system once they are freed
(:func:`services.common.heap.release_free_memory`). The HTTP protocol in front of all this
(header limits, read timeouts, lingering close) is :mod:`services.common.limits`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import (
    REQUEST_ID_HEADER,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    describe_validation,
)
from services.common.heap import release_free_memory
from services.common.metrics import RequestMetrics

logger = logging.getLogger(__name__)

#: Default body limit: a few large photos in base64 fit, an accidental upload of a video does not.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
#: Default for the request-body bytes one process buffers at once, across all its requests.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
#: A check of a request's head that may refuse it before any byte of its body is read.
HeadCheck = Callable[[Scope], ServiceError | None]

#: ``FastAPI(telemetry=...)`` for every service: FastAPI's built-in OpenTelemetry hooks look up
#: the global providers on every request, and the services report through Prometheus
#: (``/metrics``) instead.
NO_FASTAPI_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


class FastRoute(Route):
    """A plain Starlette route for a hot endpoint, put in front of FastAPI's route for the same
    path (``app.router.routes.insert(0, ...)``), which stays for the OpenAPI document. It skips
    FastAPI's per-request machinery (dependency resolution, endpoint wrapping), a noticeable
    share of the CPU a small request costs; like FastAPI's, it records itself in the scope, so
    the request metrics label its requests with the route template. Errors still reach the
    app's exception handlers."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def install_service_middleware(
    app: FastAPI,
    *,
    max_body_bytes: int,
    duration: Histogram,
    in_flight: Gauge,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    check_head: HeadCheck | None = None,
) -> None:
    """What every service puts in front of its routes: the error bodies, the body limits (413,
    503 beyond the process's buffer budget, ``check_head``'s refusal before the body is read)
    and the request-duration and in-flight metrics of :func:`~services.common.metrics.
    http_metrics` (outermost, so a refused body is timed too)."""
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_body_bytes=max_body_bytes,
        budget=BodyBudget(max_buffered_bytes),
        check_head=check_head,
    )
    app.add_middleware(RequestMetrics, duration=duration, in_flight=in_flight)


def error_response(
    status_code: int, message: str, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "code": code}, status_code=status_code, headers=dict(headers or {})
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with ``{"error": message, "code": code}`` and its status."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, describe_validation(exc.errors()), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers from outside every middleware: the id the gateway's RequestId
        # middleware chose (and validated) is in the scope's state, its header set here.
        chosen: str | None = getattr(request.state, "request_id", None)
        request_id = chosen or request.headers.get(REQUEST_ID_HEADER, "-")
        logger.exception("unhandled error (request id %s)", request_id)
        return error_response(
            500,
            f"internal error (request id {request_id})",
            "internal_error",
            {REQUEST_ID_HEADER: chosen} if chosen else None,
        )


class BodyBudget:
    """The request-body bytes one process holds at once, across all its connections.

    A request takes its declared ``Content-Length`` before reading (or, chunked, each chunk as
    it comes) and gives it back once the app is done with it. Once the bytes given back since
    the last trim pass ``trim_after_bytes`` (or ``idle_trim_bytes`` when nothing is buffered
    any more: the end of a burst), the C heap's free pages are returned to the system, at most
    once per ``trim_interval_s`` (a burst of releases is trimmed once, soon after).
    """

    def __init__(
        self,
        limit_bytes: int,
        trim_after_bytes: int = 32 * 1024 * 1024,
        idle_trim_bytes: int = 4 * 1024 * 1024,
        trim_interval_s: float = 1.0,
    ) -> None:
        if limit_bytes < 1:
            raise ValueError("limit_bytes must be >= 1")
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.trim_after_bytes = trim_after_bytes
        self.idle_trim_bytes = idle_trim_bytes
        self.trim_interval_s = trim_interval_s
        self._untrimmed = 0
        self._last_trim = 0.0
        self._trim_pending: asyncio.TimerHandle | None = None

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when that would pass the limit."""
        if self.used_bytes + size > self.limit_bytes:
            return False
        self.used_bytes += size
        return True

    def give_back(self, size: int) -> None:
        self.used_bytes -= size
        self._untrimmed += size
        threshold = self.idle_trim_bytes if self.used_bytes == 0 else self.trim_after_bytes
        if self._untrimmed >= threshold and self._trim_pending is None:
            wait = max(0.0, self._last_trim + self.trim_interval_s - time.monotonic())
            self._trim_pending = asyncio.get_running_loop().call_later(wait, self._trim)

    def _trim(self) -> None:
        self._trim_pending = None
        self._untrimmed = 0
        self._last_trim = time.monotonic()
        release_free_memory()


class BodySizeLimit:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        budget: BodyBudget | None = None,
        check_head: HeadCheck | None = None,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget or BodyBudget(DEFAULT_MAX_BUFFERED_BYTES)
        self.check_head = check_head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check_head is not None:
            refusal = self.check_head(scope)
            if refusal is not None:
                await self._answer(scope, receive, send, refusal)
                return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse_size(scope, receive, send, f" of {declared} bytes")
            return
        reserved = 0
        try:
            if declared and not self.budget.take(declared):
                await self._answer(scope, receive, send, self._overloaded())
                return
            reserved = declared or 0
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away mid-upload: nobody to answer
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._refuse_size(scope, receive, send, "")
                    return
                if size > reserved:  # chunked, or more than declared (the server refuses that)
                    if not self.budget.take(size - reserved):
                        await self._answer(scope, receive, send, self._overloaded())
                        return
                    reserved = size
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break

            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()  # the joined body is the only copy from here
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body only http.disconnect can come

            await self.app(scope, replay, send)
        finally:
            if reserved:
                self.budget.give_back(reserved)

    def _overloaded(self) -> ServiceError:
        return Overloaded(
            "the server holds as many request bodies as it may; retry shortly",
            headers={"Retry-After": "1"},
        )

    async def _refuse_size(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        message = f"request body{size} is over the limit of {self.max_body_bytes} bytes"
        await self._answer(scope, receive, send, PayloadTooLarge(message))

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, error: ServiceError
    ) -> None:
        # Answered before the body is complete: the HTTP protocol (services.common.limits)
        # then closes the connection after draining what the client still sends, so a client
        # still uploading reads this answer instead of a connection reset.
        response = error_response(error.status_code, error.message, error.code, error.headers)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed header before we see it
    return None
