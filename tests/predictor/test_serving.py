"""The predictor as a user meets it: real uvicorn processes, real published model, real answers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from services.common.imaging import decode_and_preprocess
from tests.conftest import PublishedModel
from tests.images import LOSSLESS, b64, odd_variants
from tests.predictor.conftest import PredictorProcess, start_predictor

pytestmark = pytest.mark.slow


async def _predict_each(url: str, images: list[bytes]) -> list[httpx.Response]:
    """One request per image, all in flight together (so the batcher has work to batch)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/predict", json={"image": b64(data)}) for data in images)
        )


def _check_predictions(predictions: list[dict[str, Any]], top_k: int, labels: list[str]) -> None:
    assert len(predictions) == top_k
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < sum(scores) <= 1.0 + 1e-9
    for p in predictions:
        assert labels[p["class_id"]] == p["label"]


@pytest.mark.parametrize("server", ["predictor", "onnx_predictor"])
def test_top1_equals_eager_model_one_image_per_request(
    server: str, request: pytest.FixtureRequest, published_model: PublishedModel
) -> None:
    predictor: PredictorProcess = request.getfixturevalue(server)
    responses = asyncio.run(_predict_each(predictor.url, published_model.images))
    labels = published_model.manifest.labels
    top1 = []
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.headers["x-backend"] == "predictor"
        body = response.json()
        assert body["model"] == "classifier"
        assert body["version"] == str(published_model.version)
        assert body["backend"] == "predictor"
        _check_predictions(body["predictions"], 5, labels)
        top1.append(body["predictions"][0]["class_id"])
    assert top1 == published_model.expected_top1


@pytest.mark.parametrize("server", ["predictor", "onnx_predictor"])
def test_top1_equals_eager_model_all_images_in_one_request(
    server: str, request: pytest.FixtureRequest, published_model: PublishedModel
) -> None:
    predictor: PredictorProcess = request.getfixturevalue(server)
    body = {"images": [b64(data) for data in published_model.images], "top_k": 2}
    response = httpx.post(predictor.url + "/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    per_image = response.json()["predictions"]
    assert len(per_image) == len(published_model.images)
    for predictions in per_image:
        _check_predictions(predictions, 2, published_model.manifest.labels)
    assert [p[0]["class_id"] for p in per_image] == published_model.expected_top1


def test_data_url_prefix_and_top_k_beyond_classes(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    image = "data:image/png;base64," + b64(published_model.images[0])
    response = httpx.post(predictor.url + "/predict", json={"image": image, "top_k": 50})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(published_model.manifest.labels)  # capped at the classes
    assert predictions[0]["class_id"] == published_model.expected_top1[0]


def test_odd_but_valid_images_are_served(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    """Every variant is answered, with the class the model gives the decoder's own tensor for
    those bytes (checked through v2 infer, which skips decoding): /predict really decodes them
    with the shared decoder rather than failing or guessing."""
    variants = odd_variants(published_model.images[3])
    names = list(variants)
    body = {"images": [b64(variants[name]) for name in names], "top_k": 1}
    response = httpx.post(predictor.url + "/predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    served = {name: p[0]["class_id"] for name, p in zip(names, answers, strict=True)}

    spec = published_model.manifest.input_spec
    batch = np.stack([decode_and_preprocess(variants[name], spec) for name in names])
    infer = {
        "inputs": [
            {"name": "input", "shape": list(batch.shape), "datatype": "FP32",
             "data": batch.ravel().tolist()}
        ]
    }  # fmt: skip
    v2 = httpx.post(predictor.url + "/v2/models/classifier/infer", json=infer, timeout=60)
    assert v2.status_code == 200, v2.text
    logits = np.asarray(v2.json()["outputs"][0]["data"]).reshape(len(names), -1)
    assert served == dict(zip(names, logits.argmax(axis=1).tolist(), strict=True))
    # Lossless conversions carry the very same pixels: the eager model's answer.
    expected = published_model.expected_top1[3]
    assert {name: served[name] for name in LOSSLESS} == dict.fromkeys(LOSSLESS, expected)


def test_health_docs_and_noop(predictor: PredictorProcess, published_model: PublishedModel) -> None:
    with httpx.Client(base_url=predictor.url) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz").json()
        assert ready["ready"] is True
        assert ready["version"] == published_model.version
        assert ready["engine"] == "torchscript"
        assert ready["device"] == "cpu"
        # The model's own serving config, no PREDICTOR_* override in effect.
        assert ready["serving"] == published_model.manifest.serving.model_dump(mode="json")
        assert ready["serving_overrides"] == {}
        assert client.post("/noop", content=b"ignored").json() == {"ok": True}
        assert "swagger" in client.get("/docs").text.lower()
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/predict", "/v2/models/{model_name}/infer", "/readyz", "/metrics"):
            assert path in paths
        for path, field in (("/v2/models/{model_name}/infer", "inputs"), ("/predict", "image")):
            body = paths[path]["post"]["requestBody"]["content"]["application/json"]
            assert field in body["schema"]["properties"]


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_histograms_see_batches(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    # 64 images in one request are queued at once: the batcher must form full batches of 32.
    # The session's server has served other tests: only what this request adds counts.
    before = httpx.get(predictor.url + "/metrics").text
    body = {"images": [b64(data) for data in published_model.images]}
    assert httpx.post(predictor.url + "/predict", json=body, timeout=30).status_code == 200
    text = httpx.get(predictor.url + "/metrics").text

    def added(name: str, labels: str = "") -> float:
        return _metric(text, name, labels) - _metric(before, name, labels)

    assert len(published_model.images) == 64
    assert added("predictor_batch_size_count") == 2
    assert added("predictor_batch_size_sum") == 64
    assert added("predictor_batch_size_bucket", '{le="16.0"}') == 0  # both full: 32 each
    assert added("predictor_queue_time_seconds_count") == 64
    assert added("predictor_inference_time_seconds_count") == 2
    route = '{method="POST",route="/predict",status="200"}'
    assert added("predictor_http_request_duration_seconds_count", route) == 1
    assert _metric(text, "predictor_model_version") == published_model.version


def test_a_bad_image_fails_only_its_own_request(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    """Good and broken images from concurrent requests share batches; only the broken ones
    fail (400), every good one gets its eager answer."""
    good = published_model.images[:24]
    broken = [data[:50] for data in published_model.images[24:30]]
    mixed = [*good[:12], *broken, *good[12:]]
    responses = asyncio.run(_predict_each(predictor.url, mixed))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 12 + [400] * len(broken) + [200] * 12
    top1 = [r.json()["predictions"][0]["class_id"] for r in responses if r.status_code == 200]
    assert top1 == published_model.expected_top1[:24]
    assert {r.json()["code"] for r in responses if r.status_code == 400} == {"corrupt_image"}


def test_images_requests_are_batches_that_never_wait_for_the_delay(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """With a one-second batching delay, `images` requests (how the gateway calls) are answered
    at once, one image or several, even right after a batch of several: their caller formed the
    batch. (Only concurrent `image` requests are worth waiting for.)"""
    server = start_predictor(
        published_model.repo, tmp_path / "predictor.log", max_delay_ms=1000, poll_interval_s=0
    )
    try:
        with httpx.Client(base_url=server.url, timeout=20) as client:
            encoded = [b64(data) for data in published_model.images[:3]]
            requests = (encoded, encoded[:1], encoded[:2], encoded[:1])
            for images in requests:
                response = client.post("/predict", json={"images": images})
                assert response.status_code == 200, response.text
                assert len(response.json()["predictions"]) == len(images)
            text = client.get("/metrics").text
    finally:
        server.stop()
    # Measured by the server, from queueing to the batch's start: a held-back image waits the
    # whole second; one that runs at once waits for nothing (half the delay is a wide margin).
    images = sum(len(images) for images in requests)
    assert _metric(text, "predictor_queue_time_seconds_count") == images
    assert _metric(text, "predictor_queue_time_seconds_bucket", '{le="0.5"}') == images
