"""The public API contract, shared by the predictor and the gateway (docs/architecture.md
"Gateway API").

The JSON schemas here are what both services publish in their OpenAPI documents, so they say
everything about a body's shape that the services check: exactly one of ``image`` or
``images``, no empty string or list, no ``null``. What a schema cannot say (that the text is
an image in base64, or that there are no more images than the served model allows) is
answered 400 or 413. :func:`parse_predict_request` is the one place a ``/predict`` body is
parsed, so both services answer the same status and code for the same bytes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from services.common.errors import (
    BadRequest,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
    describe_validation,
)

#: Default number of classes returned per image.
DEFAULT_TOP_K = 5
#: The most classes a caller may ask for.
MAX_TOP_K = 1000


_BASE64_IMAGE = {
    "type": "string",
    "minLength": 1,
    "contentEncoding": "base64",
    "description": "An encoded image (PNG, JPEG, ...) in base64; a `data:image/...;base64,` "
    "prefix is allowed.",
}


def _integral_float(value: object) -> object:
    """JSON has one number type, and JSON Schema's ``integer`` includes ``3.0``: take it as 3
    (strict validation would refuse it); ``2.5``, ``"3"`` and ``true`` are still refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class PredictRequest(BaseModel):
    """``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``, optional ``top_k``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["image"]}, {"required": ["images"]}]},
    )

    # The documented schemas leave out `null`, which image_texts refuses when it is sent
    # (pydantic still needs None as the default of the field that is absent).
    image: Annotated[str | None, WithJsonSchema(_BASE64_IMAGE)] = None
    images: Annotated[
        list[str] | None,
        WithJsonSchema({"type": "array", "items": _BASE64_IMAGE, "minItems": 1}),
    ] = None
    top_k: Annotated[int, BeforeValidator(_integral_float)] = Field(
        default=DEFAULT_TOP_K, ge=1, le=MAX_TOP_K
    )

    def image_texts(self, max_images: int) -> list[str]:
        """The base64 texts to classify; a 422 or 413 when the request's shape is wrong."""
        sent = self.model_fields_set
        for name in ("image", "images"):
            if name in sent and getattr(self, name) is None:
                # The documented schema has no null: an explicit one is refused, not ignored.
                raise Unprocessable(f"'{name}' must not be null", "invalid_request")
        if (self.image is None) == (self.images is None):
            raise Unprocessable("send exactly one of 'image' or 'images'", "invalid_request")
        texts = [self.image] if self.image is not None else self.images or []
        if not texts:
            raise Unprocessable("'images' is empty", "empty_images")
        if len(texts) > max_images:
            raise PayloadTooLarge(
                f"{len(texts)} images is over the limit of {max_images} per request",
                "too_many_images",
            )
        return texts


def parse_predict_request(body: bytes, content_type: str) -> PredictRequest:
    """A ``/predict`` body as a :class:`PredictRequest`, parsed by pydantic-core straight from
    the bytes (no Python objects in between). 415 for another content type, 400
    ``invalid_json`` for bytes that are not JSON or nest deeper than the parser's limit (a
    document we cannot read), 422 ``invalid_request`` for JSON of the wrong shape."""
    require_json(content_type)
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        unreadable = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if unreadable is not None:
            reason = str(unreadable.get("msg", "")).removeprefix("Invalid JSON: ")
            raise BadRequest(
                f"request body is not valid JSON ({reason})"
                if reason
                else "request body is not valid JSON",
                "invalid_json",
            ) from None
        raise Unprocessable(describe_validation(errors), "invalid_request") from None


def require_json(content_type: str) -> None:
    """415 unless the body is declared as JSON (``application/json`` or any ``+json`` type)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the body as application/json, not {content_type or 'no content type'!r}"
        )


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class PredictResponse(BaseModel):
    """``predictions`` is a list for ``image`` and a list of lists for ``images``."""

    model: str
    version: str
    backend: str
    predictions: list[Prediction] | list[list[Prediction]]


class ErrorResponse(BaseModel):
    error: str
    code: str
