"""ASGI pieces every FastAPI service puts in front of its routes.

:func:`install_error_handlers` makes every FastAPI service answer ``{"error", "code"}`` for a
:class:`~services.common.errors.ServiceError`, for request validation failures and for anything
unexpected (an opaque 500 that is logged with the request id, never a traceback to the caller).
:class:`BodySizeLimit` refuses oversized request bodies with 413 in that error shape.
It checks the declared ``Content-Length`` first (no byte read) and then counts the bytes that
really arrive, because a chunked upload has no Content-Length and a client can lie in it. The
body is buffered (at most the limit) and handed to the app in one message; the services parse
whole JSON documents anyway, so nothing streams past this point.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import REQUEST_ID_HEADER, ServiceError, describe_validation
from services.common.metrics import RequestMetrics

logger = logging.getLogger(__name__)

#: Default body limit: a few large photos in base64 fit, an accidental upload of a video does not.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024

#: ``FastAPI(telemetry=...)`` for every service: FastAPI's built-in OpenTelemetry hooks look up
#: the global providers on every request, and the services report through Prometheus
#: (``/metrics``) instead.
NO_FASTAPI_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def install_service_middleware(
    app: FastAPI, *, max_body_bytes: int, duration: Histogram, in_flight: Gauge
) -> None:
    """What every service puts in front of its routes: the error bodies, the body limit
    (413) and the request-duration and in-flight metrics of :func:`~services.common.metrics.
    http_metrics` (outermost, so a refused body is timed too)."""
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
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


class BodySizeLimit:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send, declared_bytes=declared)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-upload: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, declared_bytes=None)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body only http.disconnect can come

        await self.app(scope, replay, send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, declared_bytes: int | None
    ) -> None:
        size = f" of {declared_bytes} bytes" if declared_bytes is not None else ""
        response = error_response(
            413,
            f"request body{size} is over the limit of {self.max_body_bytes} bytes",
            "payload_too_large",
        )
        # No "Connection: close": uvicorn then reads and drops the rest of the upload after
        # this answer, so a client still sending gets the 413 instead of a connection reset.
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed header before we see it
    return None
