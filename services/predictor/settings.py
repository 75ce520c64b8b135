"""The predictor's one settings class; every field is an environment variable ``PREDICTOR_*``.

``python -m services.predictor --settings`` prints the table the README shows. Batching and
request limits belong to the model (the ``serving`` block of its manifest, see
:mod:`services.common.serving`); the fields that can override them for this server are unset
by default, and :meth:`PredictorSettings.serving_overrides` names the ones that are set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.serving import find_overrides, overrides_report, published_serving
from services.common.settings import ServiceSettings

EngineName = Literal["torchscript", "onnx"]

#: Settings that override a field of the model's serving config: setting -> serving field.
SERVING_OVERRIDES = {
    "max_batch_size": "max_batch_size",
    "max_delay_ms": "max_batch_delay_ms",
    "instance_count": "instance_count",
    "max_images": "max_images_per_request",
    "max_pixels": "max_pixels",
}


class PredictorSettings(ServiceSettings):
    """FastAPI predictor: model, engine, queue, timeouts, overrides of the serving config."""

    model_config = SettingsConfigDict(env_prefix="PREDICTOR_")

    port: int = Field(default=8100, ge=1, le=65535)
    """TCP port to listen on."""
    grpc_port: int = Field(default=8101, ge=0, le=65535)
    """TCP port of the gRPC endpoint (the Open Inference Protocol's GRPCInferenceService, on
    the same interface as HTTP); 0 turns it off."""

    workers: int = Field(default=1, ge=1, le=64)
    """Server processes on the one port (HTTP and gRPC), each with its own model, batcher and
    inference threads, so that a many-core host is not held to one interpreter's GIL; a worker
    that dies is restarted. `/metrics` combines them all. 1 is best where the predictor shares
    a core or two with other services (a second process only competes for them); each worker
    follows new versions on its own poll, so for up to one poll interval they may differ."""

    repository: Path = Path("model_repository")
    """Model repository written by `python -m training publish` (Triton layout)."""
    model: str = Field(default="classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    """Model name inside the repository; also the name under /v2/models."""
    version: int | None = Field(default=None, ge=1)
    """Serve exactly this version (no hot reload); unset serves the newest and follows new ones."""
    engine: EngineName = "torchscript"
    """Inference engine: `torchscript` (torch) or `onnx` (ONNX Runtime)."""
    precision: Literal["fp32", "int8"] = "fp32"
    """`int8` serves the version's int8 model (published with `--int8`; ONNX engine only)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    fp16: bool = False
    """Run the TorchScript model in half precision (CUDA only; ignored on CPU)."""
    channels_last: bool = False
    """Feed the TorchScript model channels-last tensors (CUDA only; ignored on CPU)."""
    jit_optimize: bool = True
    """Freeze the TorchScript module and apply torch.jit.optimize_for_inference on CPU (oneDNN
    prepacked convolutions: several times faster for the CNNs here; results equal to ~1e-6)."""
    intra_op_threads: int = Field(default=1, ge=0)
    """Threads inside one CPU inference; 0 = every CPU this process may use. One is fastest for
    the small models here: a second thread competes with request handling for the CPU."""

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    """Overrides the model's serving config `max_batch_size` (most images in one inference
    call; 1 turns dynamic batching off). Unset: the model's value."""
    max_delay_ms: float | None = Field(default=None, ge=0.0, le=1000.0)
    """Overrides the model's serving config `max_batch_delay_ms`: how long the oldest queued
    image may wait for a batch to fill (not applied to a lone image when the previous batch was
    a single image too, nor while a request with a batch axis, a v2 tensor such as the gateway's
    calls or an `images` list, is queued: its caller formed that batch). Unset: the model's."""
    instance_count: int | None = Field(default=None, ge=1, le=64)
    """Overrides the model's serving config `instance_count`: inference threads, each running
    batches on the one engine (read at start). Unset: the model's value."""
    queue_size: int = Field(default=1024, ge=1)
    """Images waiting for inference before new requests get 503 with Retry-After."""
    retry_after_s: int = Field(default=1, ge=0)
    """Retry-After header value (seconds) sent with 503 when the queue is full."""
    decode_threads: int = Field(default=2, ge=1, le=64)
    """Threads decoding the images of a batch (split between them); the event loop never
    decodes."""

    max_images: int | None = Field(default=None, ge=1, le=4096)
    """Overrides the model's serving config `max_images_per_request` (`images` list or the
    batch axis of a v2 tensor). Unset: the model's value."""
    max_pixels: int | None = Field(default=None, ge=1)
    """Overrides the model's serving config `max_pixels` (largest image, width x height,
    checked from the header before decoding). Unset: the model's value."""
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
    def _int8_runs_on_onnx(self) -> PredictorSettings:
        if self.precision == "int8" and self.engine != "onnx":
            raise ValueError(
                "PREDICTOR_PRECISION=int8 needs PREDICTOR_ENGINE=onnx: the int8 model is ONNX"
            )
        return self

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> PredictorSettings:
        # The model's own values are checked when it loads (app.check_serving).
        if self.max_batch_size is not None and self.queue_size < self.max_batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_batch_size "
                f"({self.max_batch_size})"
            )
        if self.max_images is not None and self.queue_size < self.max_images:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_images ({self.max_images}), "
                "or a request with the most images could never be queued"
            )
        return self

    def serving_overrides(self) -> dict[str, Any]:
        """The serving-config fields this server's settings override, by their name there."""
        return {
            serving_field: getattr(self, name)
            for name, serving_field in SERVING_OVERRIDES.items()
            if getattr(self, name) is not None
        }

    def overrides_report(self) -> str:
        """The overrides in effect against the version this server would start on."""
        model, source = published_serving(self.repository, self.model, self.version)
        model_values = {
            name: (field, getattr(model, field)) for name, field in SERVING_OVERRIDES.items()
        }
        return overrides_report(find_overrides(self, model_values), source)

    def cpu_threads(self) -> int:
        """``intra_op_threads`` with 0 resolved to the CPUs this process may run on."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return len(os.sched_getaffinity(0))
