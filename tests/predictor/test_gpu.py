"""CUDA checks of the engines (``make gpu-check``; skipped where there is no CUDA device).

Imports no web stack on purpose: the GPU machine may have only torch and onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.common.imaging import decode_and_preprocess
from services.common.runtime import EngineKind, load_model
from tests.conftest import PublishedModel

pytestmark = pytest.mark.gpu


def _batch(published: PublishedModel) -> np.ndarray:
    spec = published.manifest.input_spec
    return np.stack([decode_and_preprocess(data, spec) for data in published.images])


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_fp32_on_cuda_gives_the_eager_top1(
    published_model: PublishedModel, kind: EngineKind
) -> None:
    model = load_model(
        published_model.repo,
        published_model.model,
        None,
        kind,
        "cuda:0",
        serving_overrides={"max_batch_size": 64},
    )
    assert model.engine.device == "cuda:0"
    logits = model.engine.infer(_batch(published_model))
    assert logits.argmax(axis=1).tolist() == published_model.expected_top1


def test_fp16_channels_last_agrees_with_fp32(published_model: PublishedModel) -> None:
    """Half precision may flip a near-tie, never more than a few of 64 images."""
    batch = _batch(published_model)
    common = {"serving_overrides": {"max_batch_size": 64}}
    fp32 = load_model(
        published_model.repo, published_model.model, None, "torchscript", "cuda:0", **common
    )
    fp16 = load_model(
        published_model.repo, published_model.model, None, "torchscript", "cuda:0",
        fp16=True, channels_last=True, **common,
    )  # fmt: skip
    top_fp32 = fp32.engine.infer(batch).argmax(axis=1)
    logits16 = fp16.engine.infer(batch)
    assert logits16.dtype == np.float32  # results come back as fp32 for the response
    agreement = float((logits16.argmax(axis=1) == top_fp32).mean())
    assert agreement >= 0.95
