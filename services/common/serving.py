"""How one published version is served: batching and limits, written beside the model.

Triton keeps these values in a model's ``config.pbtxt`` and MLServer in its
``model-settings.json``; here they live in the ``serving`` block of each version's
``manifest.json``. ``python -m training publish`` writes the block from its flags (defaults
below), and all three engines read it: the predictor's batcher and request limits, TorchServe's
registration (``batch_size``, ``max_batch_delay``, workers) and the handler's limits, and the
Triton configs generated for the version. So the three engines batch the same way by default
and a comparison between them is fair.

An engine setting may still override a value for one server (``PREDICTOR_MAX_BATCH_SIZE``, say);
the engine then says so in its ``--settings`` output and its readiness answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.imaging import DEFAULT_MAX_PIXELS

#: The defaults, in one place: the README's "Serving config" table is checked against them.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_DELAY_MS = 1.0
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
DEFAULT_INSTANCE_COUNT = 1


class ServingConfig(BaseModel):
    """The serving block of a manifest. Unknown keys are refused: a typo must not pass."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)
    """Most images in one inference call (the predictor's batcher, TorchServe's batch_size,
    Triton's preferred batch when none is given); 1 turns dynamic batching off."""
    max_batch_delay_ms: float = Field(default=DEFAULT_MAX_BATCH_DELAY_MS, ge=0.0, le=1000.0)
    """How long the oldest queued image may wait for a batch to fill (Triton's
    max_queue_delay_microseconds; TorchServe's max_batch_delay, rounded up to whole ms)."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes Triton's dynamic batcher aims for before the delay runs out; empty: the
    largest batch it can form. The predictor and TorchServe form batches of any size."""
    max_images_per_request: int = Field(default=DEFAULT_MAX_IMAGES_PER_REQUEST, ge=1, le=4096)
    """Most images in one request (an ``images`` list, or the batch axis of a v2 tensor).
    Triton's config.pbtxt ``max_batch_size`` is the larger of this and ``max_batch_size``: for
    Triton one number caps both."""
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    """Largest image (width x height) an engine decodes, checked from the header first."""
    instance_count: int = Field(default=DEFAULT_INSTANCE_COUNT, ge=1, le=64)
    """Model instances per engine: Triton's instance_group count, TorchServe's workers, the
    predictor's inference threads."""

    @model_validator(mode="after")
    def _preferred_fit(self) -> Self:
        bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {list(bad)} are outside 1..max_batch_size "
                f"({self.max_batch_size})"
            )
        return self

    @property
    def max_batch_delay_us(self) -> int:
        """The delay in whole microseconds (Triton's unit)."""
        return round(self.max_batch_delay_ms * 1000)


class ServingConfigError(ValueError):
    """A server's overrides do not fit a version's serving config."""


def with_overrides(serving: ServingConfig, overrides: Mapping[str, Any]) -> ServingConfig:
    """``serving`` with a server's overrides applied, validated as a whole (a smaller
    max_batch_size must still hold the preferred sizes)."""
    if not overrides:
        return serving
    try:
        return ServingConfig.model_validate(serving.model_dump() | dict(overrides))
    except ValidationError as exc:
        raise ServingConfigError(
            f"the overrides {dict(overrides)} do not fit the serving config "
            f"{serving.model_dump()}: {exc.errors()[0]['msg']}"
        ) from None
