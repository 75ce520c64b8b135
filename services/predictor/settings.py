"""The predictor's one settings class; every field is an environment variable ``PREDICTOR_*``.

``python -m services.predictor --settings`` prints the table the README shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.imaging import DEFAULT_MAX_PIXELS
from services.common.settings import ServiceSettings

EngineName = Literal["torchscript", "onnx"]


class PredictorSettings(ServiceSettings):
    """FastAPI predictor: model, engine, batching, limits."""

    model_config = SettingsConfigDict(env_prefix="PREDICTOR_")

    port: int = Field(default=8100, ge=1, le=65535)
    """TCP port to listen on."""

    repository: Path = Path("model_repository")
    """Model repository written by `python -m training publish` (Triton layout)."""
    model: str = Field(default="classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    """Model name inside the repository; also the name under /v2/models."""
    version: int | None = Field(default=None, ge=1)
    """Serve exactly this version (no hot reload); unset serves the newest and follows new ones."""
    engine: EngineName = "torchscript"
    """Inference engine: `torchscript` (torch) or `onnx` (ONNX Runtime)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    fp16: bool = False
    """Run the TorchScript model in half precision (CUDA only; ignored on CPU)."""
    channels_last: bool = False
    """Feed the TorchScript model channels-last tensors (CUDA only; ignored on CPU)."""
    jit_optimize: bool = True
    """Freeze the TorchScript module and apply torch.jit.optimize_for_inference on CPU (oneDNN
    prepacked convolutions: about 3x faster here; results equal to ~1e-6)."""
    intra_op_threads: int = Field(default=1, ge=0)
    """Threads inside one CPU inference; 0 = every CPU this process may use. One is fastest for
    the small models here: a second thread competes with request handling for the CPU."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Most images in one inference call; 1 turns dynamic batching off."""
    max_delay_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    """How long the oldest queued image may wait for a batch to fill before it runs anyway
    (not applied to a lone image when the previous batch was a single image too, nor while an
    `images` request, such as the gateway's calls, or a v2 tensor of several images is
    queued: its caller formed that batch)."""
    queue_size: int = Field(default=1024, ge=1)
    """Images waiting for inference before new requests get 503 with Retry-After."""
    retry_after_s: int = Field(default=1, ge=0)
    """Retry-After header value (seconds) sent with 503 when the queue is full."""
    decode_threads: int = Field(default=2, ge=1, le=64)
    """Threads decoding the images of a batch (split between them); the event loop never
    decodes."""

    max_images: int = Field(default=64, ge=1)
    """Most images in one request (`images` list or the batch axis of a v2 tensor)."""
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    """Largest decoded image (width x height), checked from the header before decoding."""
    request_timeout_s: float = Field(default=10.0, gt=0.0)
    """A request not answered in this time gets 504."""

    poll_interval_s: float = Field(default=5.0, ge=0.0)
    """How often the repository is checked for a newer version; 0 turns hot reload off."""
    warmup_runs: int = Field(default=2, ge=1, le=100)
    """Inference runs per warm-up batch size before a version is called ready."""

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (
            value.startswith("cuda:") and value.removeprefix("cuda:").isdigit()
        ):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> PredictorSettings:
        if self.queue_size < self.max_batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_batch_size "
                f"({self.max_batch_size})"
            )
        if self.queue_size < self.max_images:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_images ({self.max_images}), "
                "or a request with the most images could never be queued"
            )
        return self

    def cpu_threads(self) -> int:
        """``intra_op_threads`` with 0 resolved to the CPUs this process may run on."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return len(os.sched_getaffinity(0))
