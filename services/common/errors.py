"""Errors are types: each carries its HTTP status and a machine-readable code.

Every error a service answers on purpose is a :class:`ServiceError`: the image decoder's
(:class:`services.common.imaging.ImageDecodeError`), the model runtime's
(:class:`services.common.runtime.EngineError`), the repository's and the HTTP services' own.
A status is decided here, by the class (for an image, by its code), and nowhere else: the
predictor, the TorchServe handler and the gateway all read ``status_code`` from the error.

This module needs only the standard library, so it travels with the decoding and runtime code
into TorchServe's archive and Triton's python models. The FastAPI handlers that turn these
errors into ``{"error", "code"}`` answers live in :mod:`services.common.http`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The header naming a request in answers and logs (the gateway sets one on every answer).
REQUEST_ID_HEADER = "X-Request-ID"

#: The code of an image with more pixels than allowed: the one image error that is a 413.
IMAGE_TOO_LARGE = "image_too_large"
#: The code of an image field that is not a string at all: a malformed request (422).
INVALID_TYPE = "invalid_type"


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


def image_error_status(code: str) -> int:
    """The HTTP status of an unusable image the caller sent: 413 when it has too many pixels,
    422 when the image field is not a string, 400 for everything else (not an image, corrupt,
    bad base64, ...). The gateway uses it for the codes an engine answered with; everything
    else reads an error's ``status_code``."""
    if code == IMAGE_TOO_LARGE:
        return 413
    return 422 if code == INVALID_TYPE else 400


def describe_validation(errors: Sequence[Any]) -> str:
    """The first few of pydantic's (or FastAPI's) validation errors as ``where: what; ...``."""
    parts = []
    for err in errors[:5]:
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class RepositoryError(ServiceError):
    """The repository holds no usable version (missing, unreadable or failing verification)."""

    status_code = 503
    code = "model_unavailable"


class IntegrityError(RepositoryError):
    """An artifact's bytes do not match the sha256 its manifest recorded."""

    code = "integrity_error"
