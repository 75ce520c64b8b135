"""The predictor bench's own parts (the benchmark is a command; its figures are not tested)."""

from __future__ import annotations

import math
import os

import pytest

from loadtests.predictor_bench import model_only_ms_per_image
from tests.conftest import PublishedModel


@pytest.mark.parametrize("engine", ["torchscript", "onnx"])
def test_model_only_cost_is_measured_and_the_affinity_restored(
    published_model: PublishedModel, engine: str
) -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    ms = model_only_ms_per_image(published_model.repo, engine, cpu, batch=4, seconds=0.2)
    assert math.isfinite(ms) and ms > 0
    assert os.sched_getaffinity(0) == before
