"""Inference statistics per model and version, in the shape Triton's statistics extension uses.

``GET /v2/models/stats`` (REST) and ``ModelStatistics`` (gRPC) answer from one
:class:`InferenceStatistics`, so tools written for Triton (``perf_analyzer``'s server-side
figures, ``tritonclient``'s ``get_inference_statistics``) read the predictor the same way.
Every Open Inference Protocol inference request counts, over either protocol: a success adds
its images to ``inference_count`` and its durations (queue, decoding as ``compute_input``,
inference as ``compute_infer``, building the answer as ``compute_output``) to the cumulative
figures; a failure, the caller's or the server's, adds its duration to ``fail``. Durations are
nanoseconds, cumulative since start. Only the event loop touches these figures, so no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.predictor.batcher import RequestTiming

_NS = 1_000_000_000


@dataclass(slots=True)
class Duration:
    """How many times something happened, and how long it took altogether."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * _NS)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class ModelStatistics:
    """One model version's figures (Triton's ``ModelStatistics``)."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def as_dict(self) -> dict[str, Any]:
        """Triton's JSON shape (``/v2/models/{model}/stats``, one entry of ``model_stats``)."""
        empty = Duration().as_dict()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": empty,
                "cache_miss": empty,
            },
            "batch_stats": [],
        }


class InferenceStatistics:
    """Every model version's figures, created on first use."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelStatistics] = {}

    def model(self, name: str, version: str) -> ModelStatistics:
        key = (name, version)
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = ModelStatistics(name, version)
        return stats

    def success(
        self,
        name: str,
        version: str,
        images: int,
        total_s: float,
        timing: RequestTiming,
        output_s: float,
    ) -> None:
        stats = self.model(name, version)
        stats.last_inference_ms = int(time.time() * 1000)
        stats.inference_count += images
        stats.execution_count += 1
        stats.success.add(total_s)
        stats.queue.add(timing.queue_s)
        stats.compute_input.add(timing.decode_s)
        stats.compute_infer.add(timing.infer_s)
        stats.compute_output.add(output_s)

    def failure(self, name: str, version: str, total_s: float) -> None:
        self.model(name, version).fail.add(total_s)

    def select(self, names: list[str], version: str) -> list[dict[str, Any]]:
        """``model_stats`` for ``names`` at ``version`` (zeros where nothing ran yet)."""
        return [self.model(name, version).as_dict() for name in names]
