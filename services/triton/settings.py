"""Settings of the Triton engine: ports, repositories and batching (env prefix ``TRITON_``).

Used twice: by :func:`services.triton.model_configs.write_triton_models` (what publish writes
into the model repository) and by the local launcher (``python -m services.triton``).
Every value can be set in the environment, e.g. ``TRITON_HTTP_PORT=8300``; list values are
JSON (``TRITON_PREFERRED_BATCH_SIZES='[4, 8]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.imaging import DEFAULT_MAX_PIXELS


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

    instance_count: int = Field(default=1, ge=1, le=64)
    """Instances of the classifier (native configs and the local python twins)."""
    preprocess_instance_count: int = Field(default=1, ge=1, le=64)
    """Instances of the python ``preprocess`` model (image decoding is CPU-bound)."""
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Largest batch Triton's dynamic batcher forms (and the largest batch a request may carry)."""
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32])
    """Batch sizes the dynamic batcher tries to form before the queue delay runs out (the
    defaults larger than ``max_batch_size`` are dropped; values set explicitly must fit)."""
    max_queue_delay_microseconds: int = Field(default=500, ge=0, le=10_000_000)
    """How long a request may wait in the classifier's queue for others to batch with."""
    preprocess_queue_delay_microseconds: int = Field(default=100, ge=0, le=10_000_000)
    """Queue delay of the ``preprocess`` model."""
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    """Images with more pixels are refused by ``preprocess`` before decoding (bombs)."""
    torchscript_twin: bool = True
    """Also serve ``<model>_torchscript`` locally (its python twin imports torch: ~0.6 GB)."""

    tritonserver: Path | None = None
    """The tritonserver binary; default: the one the ``nvidia-pytriton`` wheel ships."""
    ready_timeout_s: float = Field(default=180.0, gt=0)
    """How long ``up`` waits for the server and the ensemble to be ready before giving up."""
    stop_timeout_s: float = Field(default=20.0, gt=0)
    """How long ``down`` waits after SIGTERM before it kills the process group."""
    log_verbose: int = Field(default=0, ge=0, le=3)
    """tritonserver ``--log-verbose`` level."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        ports = {self.http_port, self.grpc_port, self.metrics_port}
        if len(ports) != 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if bad and "preferred_batch_sizes" in self.model_fields_set:
            raise ValueError(
                f"preferred_batch_sizes {bad} are outside 1..max_batch_size ({self.max_batch_size})"
            )
        if bad:  # the defaults, with a smaller max_batch_size: keep the ones that fit
            fitting = [size for size in self.preferred_batch_sizes if size not in bad]
            object.__setattr__(self, "preferred_batch_sizes", fitting or [self.max_batch_size])
        return self

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
