"""The public API contract (DESIGN.md "Gateway API"), shared by the predictor and the gateway."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Default number of classes returned per image.
DEFAULT_TOP_K = 5


class PredictRequest(BaseModel):
    """``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``, optional ``top_k``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = None
    images: list[str] | None = None
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, le=1000)


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
