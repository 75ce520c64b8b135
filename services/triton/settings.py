"""Settings of the local Triton server (env prefix ``TRITON_``): ports, folders, timeouts.

Read by the local launcher (``python -m services.triton``) only. How the model batches is not
here: it is the version's ``serving`` block (:class:`~services.common.serving.ServingConfig`),
which publish writes and :mod:`services.triton.model_configs` turns into every config.pbtxt.
The batching fields below are optional **overrides** of that block for this one server (None,
the default, keeps the model's value); the launcher applies them to the configs it generates
(:meth:`TritonSettings.serving_for`), logs each one in effect at start, and
``python -m services.triton --settings`` lists them against the model's values.
The configs publish writes for the containers never see them.

Every value can be set in the environment, e.g. ``TRITON_HTTP_PORT=8300``; list values are
JSON (``TRITON_PREFERRED_BATCH_SIZES='[4, 8]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.serving import (
    Override,
    ServingConfig,
    ServingConfigError,
    find_overrides,
    with_overrides,
)


class TritonSettings(BaseSettings):
    """Everything the Triton engine reads from its environment."""

    # use_attribute_docstrings: the docstring under each field is its description, so
    # services.common.settings.settings_table prints the README's table from this class.
    model_config = SettingsConfigDict(
        env_prefix="TRITON_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_ignore_empty=True,
        use_attribute_docstrings=True,
    )

    host: str = "127.0.0.1"
    """Address the local tritonserver binds its HTTP, gRPC and metrics endpoints to."""
    http_port: int = Field(default=8200, ge=1, le=65535)
    """HTTP/REST (KServe v2) port."""
    grpc_port: int = Field(default=8201, ge=1, le=65535)
    """gRPC (KServe v2) port."""
    metrics_port: int = Field(default=8202, ge=1, le=65535)
    """Prometheus metrics port (``/metrics``)."""

    repository: Path = Path("model_repository")
    """The published model repository (what ``python -m training publish`` writes)."""
    model: str = Field(default="classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the published model to serve."""
    run_dir: Path = Path("runs/triton")
    """Folder the local launcher generates its python-backend repository, log and pid file in."""

    preprocess_instance_count: int = Field(default=1, ge=1, le=64)
    """Instances of the python ``preprocess`` model the local server runs (image decoding is
    this server's CPU work; the configs publish writes use 1)."""
    preprocess_queue_delay_microseconds: int = Field(default=100, ge=0, le=10_000_000)
    """Queue delay of the local ``preprocess`` model (the configs publish writes use 100)."""

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    """Override of the model's serving ``max_batch_size`` (the largest batch the dynamic batcher
    forms) for the local server; unset keeps the model's. The model's preferred sizes that no
    longer fit are dropped. Triton's own max_batch_size is the larger of this and the model's
    ``max_images_per_request``: a request is a batch Triton never splits."""
    preferred_batch_sizes: list[int] | None = None
    """Override of the model's ``preferred_batch_sizes`` (JSON list) for the local server;
    unset keeps the model's."""
    max_queue_delay_microseconds: int | None = Field(default=None, ge=0, le=1_000_000)
    """Override of the model's ``max_batch_delay_ms`` (in microseconds, Triton's unit) for the
    local server; unset keeps the model's."""
    instance_count: int | None = Field(default=None, ge=1, le=64)
    """Override of the model's ``instance_count`` (classifier instances) for the local server;
    unset keeps the model's."""
    max_image_pixels: int | None = Field(default=None, ge=1)
    """Override of the model's ``max_pixels`` (larger images are refused by ``preprocess``
    before decoding) for the local server; unset keeps the model's."""

    torchscript_twin: bool = True
    """Also serve ``<model>_torchscript`` locally (its python twin imports torch: ~0.6 GB)."""

    tritonserver: Path | None = None
    """The tritonserver binary; default: the one the ``nvidia-pytriton`` wheel ships."""
    ready_timeout_s: float = Field(default=180.0, gt=0)
    """How long ``up`` waits for the server and the ensemble to be ready before giving up."""
    stop_timeout_s: float = Field(default=20.0, gt=0)
    """How long ``down`` waits after SIGTERM before it kills the process group."""
    reload_drain_s: float = Field(default=2.0, ge=0)
    """How long ``reload`` keeps the old version loaded beside the new one, once the new one
    serves, for the requests that started on the old one to finish."""
    log_verbose: int = Field(default=0, ge=0, le=3)
    """tritonserver ``--log-verbose`` level."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        ports = {self.http_port, self.grpc_port, self.metrics_port}
        if len(ports) != 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        if self.preferred_batch_sizes is not None:
            limit = self.max_batch_size or 4096
            bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= limit]
            if bad:
                raise ValueError(
                    f"preferred_batch_sizes {bad} are outside 1..max_batch_size ({limit})"
                )
        return self

    def overrides(self, model: ServingConfig) -> list[Override]:
        """The overrides set (not None), each with the model's value it replaces."""
        return find_overrides(
            self,
            {  # setting -> (the model's field, its value in the setting's unit)
                "max_batch_size": ("max_batch_size", model.max_batch_size),
                "preferred_batch_sizes": (
                    "preferred_batch_sizes",
                    list(model.preferred_batch_sizes),
                ),
                "max_queue_delay_microseconds": ("max_batch_delay_us", model.max_batch_delay_us),
                "instance_count": ("instance_count", model.instance_count),
                "max_image_pixels": ("max_pixels", model.max_pixels),
            },
        )

    def serving_for(self, model: ServingConfig) -> ServingConfig:
        """The model's serving config with these overrides applied (a
        :class:`~services.common.serving.ServingConfigError`, a ValueError, if they clash).

        A ``max_batch_size`` override without ``preferred_batch_sizes`` keeps the model's
        preferred sizes that still fit."""
        update: dict[str, Any] = {}
        if self.max_batch_size is not None:
            update["max_batch_size"] = self.max_batch_size
            if self.preferred_batch_sizes is None:
                update["preferred_batch_sizes"] = tuple(
                    size for size in model.preferred_batch_sizes if size <= self.max_batch_size
                )
        if self.preferred_batch_sizes is not None:
            update["preferred_batch_sizes"] = tuple(self.preferred_batch_sizes)
        if self.max_queue_delay_microseconds is not None:
            update["max_batch_delay_ms"] = self.max_queue_delay_microseconds / 1000
        if self.instance_count is not None:
            update["instance_count"] = self.instance_count
        if self.max_image_pixels is not None:
            update["max_pixels"] = self.max_image_pixels
        try:
            return with_overrides(model, update)
        except ServingConfigError as exc:
            raise ServingConfigError(f"TRITON_* overrides: {exc}") from None

    @property
    def ensemble(self) -> str:
        return f"{self.model}_ensemble"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Triton's Prometheus endpoint (a full URL, unlike the client addresses above)."""
        return f"http://{self.host}:{self.metrics_port}/metrics"
