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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings

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
    """Most pixels an image may decode into (a JPEG at the reduced size libjpeg decodes it
    at), checked from the header before any pixel is decoded; its decoded bytes may be at most
    3 per allowed pixel (8-bit RGB), so RGBA or 32-bit images get fewer. Larger ones are 413."""
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


# --- a server's overrides, reported ---------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """One server setting in effect over a field of the model's serving config."""

    variable: str
    """The environment variable, e.g. ``TRITON_MAX_BATCH_SIZE``."""
    value: Any
    """Its value, in the setting's own unit."""
    field: str
    """The serving config field it replaces."""
    model_value: Any
    """The model's value of that field, in the setting's unit."""

    def describe(self) -> str:
        return (
            f"{self.variable}={self.value} overrides the model's {self.field} ({self.model_value})"
        )


def find_overrides(
    settings: BaseSettings, model_values: Mapping[str, tuple[str, Any]]
) -> list[Override]:
    """The overrides a server's settings set (not None). ``model_values`` maps each overriding
    setting to the serving field it stands for and the model's value in the setting's unit."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    return [
        Override(prefix + name.upper(), getattr(settings, name), field, model_value)
        for name, (field, model_value) in model_values.items()
        if getattr(settings, name) is not None
    ]


def published_serving(
    repo: Path, model: str, version: int | None = None
) -> tuple[ServingConfig, str]:
    """The serving config of ``version`` (None: the newest) and what it came from, or the
    defaults when nothing is published yet: what a server's overrides are compared with."""
    from services.common.repository import RepositoryError, newest_version, read_manifest

    try:
        number = version or newest_version(repo, model)
        return read_manifest(repo, model, number).serving, f"{model} v{number}"
    except RepositoryError:
        return ServingConfig(), "the serving defaults: no version published yet"


def overrides_report(overrides: Sequence[Override], source: str) -> str:
    """What ``--settings`` prints under the table: every override in effect, or that none is."""
    if not overrides:
        return "no override in effect: the model's serving config applies"
    lines = [f"  {override.describe()} [{source}]" for override in overrides]
    return "\n".join(["overrides in effect:", *lines])
