"""The public API contract, shared by the predictor and the gateway (docs/architecture.md
"Gateway API")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType

#: Default number of classes returned per image.
DEFAULT_TOP_K = 5
#: The most classes a caller may ask for.
MAX_TOP_K = 1000


class PredictRequest(BaseModel):
    """``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``, optional ``top_k``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = None
    images: list[str] | None = None
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)

    def image_texts(self, max_images: int) -> list[str]:
        """The base64 texts to classify; a 422 or 413 when the request's shape is wrong."""
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
