"""Errors are types (STYLE.md 6): each carries its HTTP status and a machine code.

:func:`install_error_handlers` makes every FastAPI service answer ``{"error", "code"}`` for
these, for request validation failures and for anything unexpected (an opaque 500 that is
logged with the request id, never a traceback to the caller).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error a service answers on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    status_code = 422
    code = "invalid_request"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class Timeout(ServiceError):
    status_code = 504
    code = "timeout"


#: The header naming a request in answers and logs (the gateway sets one on every answer).
REQUEST_ID_HEADER = "X-Request-ID"


def error_response(
    status_code: int, message: str, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "code": code}, status_code=status_code, headers=dict(headers or {})
    )


def describe_validation(errors: Sequence[Any]) -> str:
    """The first few of pydantic's (or FastAPI's) validation errors as ``where: what; ...``."""
    parts = []
    for err in errors[:5]:
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with the DESIGN.md JSON shape."""

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
