"""Triton's own gRPC client against the predictor's GRPCInferenceService: the same models,
answers and statistics as over REST, from the same batcher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from services.common.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    Unavailable,
    Unprocessable,
)
from services.common.imaging import ImageDecodeError, decode_and_preprocess
from services.predictor.grpc_api import status_code
from services.predictor.state import InferenceError
from tests.conftest import PublishedModel
from tests.metrics import metric_samples, sample_sum
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(predictor: PredictorProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(predictor.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image_rows(published_model: PublishedModel) -> np.ndarray:
    return np.array([[data] for data in published_model.images], dtype=np.object_)


def _images(rows: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("IMAGE", list(rows.shape), "BYTES")
    tensor.set_data_from_numpy(rows)
    return tensor


def test_health_metadata_and_readiness(
    client: triton_grpc.InferenceServerClient,
    published_model: PublishedModel,
    predictor: PredictorProcess,
) -> None:
    version = str(published_model.version)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier") and client.is_model_ready("classifier", version)
    assert client.is_model_ready("classifier_ensemble")
    assert not client.is_model_ready("classifier", "99")
    assert not client.is_model_ready("no_such_model")
    rest = triton_http.InferenceServerClient(predictor.url.removeprefix("http://"))
    try:
        server = client.get_server_metadata(as_json=True)
        assert server == rest.get_server_metadata()
        for name in ("classifier", "classifier_ensemble"):
            meta = client.get_model_metadata(name, as_json=True)
            # gRPC's JSON writes 64-bit integers as strings
            for tensor in meta["inputs"] + meta["outputs"]:
                tensor["shape"] = [int(d) for d in tensor["shape"]]
            assert meta == rest.get_model_metadata(name)
    finally:
        rest.close()
    assert httpx.get(predictor.url + "/readyz").json()["grpc_port"] == predictor.grpc_port


def test_config_index_and_statistics_match_rest(
    client: triton_grpc.InferenceServerClient,
    published_model: PublishedModel,
    predictor: PredictorProcess,
) -> None:
    rest = triton_http.InferenceServerClient(predictor.url.removeprefix("http://"))
    try:
        for name in ("classifier", "classifier_ensemble"):
            config = client.get_model_config(name, as_json=True)["config"]
            expected = rest.get_model_config(name)
            assert config["name"] == expected["name"] == name
            assert config["max_batch_size"] == expected["max_batch_size"]
            assert [
                (i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]
            ] == [(i["name"], i["data_type"], i["dims"]) for i in expected["input"]]
            assert [o["name"] for o in config["output"]] == [o["name"] for o in expected["output"]]
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index == rest.get_model_repository_index()
    finally:
        rest.close()


def test_fp32_and_encoded_images_give_the_eager_answer(
    client: triton_grpc.InferenceServerClient,
    image_rows: np.ndarray,
    published_model: PublishedModel,
) -> None:
    spec = published_model.manifest.input_spec
    batch = np.stack([decode_and_preprocess(data, spec) for data in published_model.images])
    tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = client.infer("classifier", [tensor], request_id="g-1")
    assert result.get_response().id == "g-1"
    logits = result.as_numpy("logits")
    assert logits is not None and logits.dtype == np.float32
    assert logits.argmax(axis=1).tolist() == published_model.expected_top1

    def ensemble_stats() -> dict[str, Any]:
        stats = client.get_inference_statistics("classifier_ensemble", as_json=True)
        (entry,) = stats["model_stats"]
        return dict(entry)

    before = ensemble_stats()
    images = client.infer("classifier_ensemble", [_images(image_rows)]).as_numpy("LOGITS")
    assert images is not None
    assert images.argmax(axis=1).tolist() == published_model.expected_top1
    assert np.allclose(images, logits, atol=1e-5)  # the same decoder, the same engine
    after = ensemble_stats()
    added = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert added == len(image_rows)
    success = int(after["inference_stats"]["success"]["count"])
    assert success == int(before["inference_stats"].get("success", {}).get("count", 0)) + 1


def test_batch_of_eight_with_class_count(
    client: triton_grpc.InferenceServerClient,
    image_rows: np.ndarray,
    published_model: PublishedModel,
) -> None:
    rows = image_rows[:8]
    output = triton_grpc.InferRequestedOutput("LOGITS", class_count=2)
    result = client.infer("classifier_ensemble", [_images(rows)], outputs=[output])
    strings = result.as_numpy("LOGITS")
    assert strings is not None and strings.shape == (8, 2)
    top1 = [int(row[0].decode().split(":")[1]) for row in strings]
    assert top1 == published_model.expected_top1[:8]
    labels = published_model.manifest.labels
    assert all(
        row[0].decode().split(":")[2] == labels[i] for row, i in zip(strings, top1, strict=True)
    )


def test_calls_are_counted_in_the_metrics(
    client: triton_grpc.InferenceServerClient, predictor: PredictorProcess
) -> None:
    assert client.is_server_live()
    samples = metric_samples(httpx.get(predictor.url + "/metrics").text)
    name = "predictor_grpc_request_duration_seconds_count"
    assert sample_sum(samples, name, method="ServerLive", code="OK") >= 1
    assert sample_sum(samples, "predictor_grpc_requests_in_flight") == 0


def test_a_taken_grpc_port_stops_the_start(
    predictor: PredictorProcess, published_model: PublishedModel, tmp_path: Path
) -> None:
    """Two servers never share a gRPC port (no SO_REUSEPORT): the second one says so and
    stops, as with any other start-up failure."""
    second = PredictorProcess(
        published_model.repo,
        tmp_path / "predictor.log",
        grpc_port=predictor.grpc_port,
        poll_interval_s=0,
    )
    try:
        assert second.wait_exit() == 3
    finally:
        second.stop()
    assert f"cannot listen for gRPC on 127.0.0.1:{predictor.grpc_port}" in second.log()


def test_errors_map_to_grpc_codes_by_their_status() -> None:
    """The mapping every RPC uses: a caller's mistake is never INTERNAL, a full queue is
    UNAVAILABLE (the client may retry), only a server fault is INTERNAL."""
    expected = {
        BadRequest("x"): grpc.StatusCode.INVALID_ARGUMENT,
        PayloadTooLarge("x"): grpc.StatusCode.INVALID_ARGUMENT,
        Unprocessable("x"): grpc.StatusCode.INVALID_ARGUMENT,
        ImageDecodeError("x", "not_an_image"): grpc.StatusCode.INVALID_ARGUMENT,
        ImageDecodeError("x", "image_too_large"): grpc.StatusCode.INVALID_ARGUMENT,
        NotFound("x"): grpc.StatusCode.NOT_FOUND,
        Overloaded("x"): grpc.StatusCode.UNAVAILABLE,
        Unavailable("x"): grpc.StatusCode.UNAVAILABLE,
        Timeout("x"): grpc.StatusCode.DEADLINE_EXCEEDED,
        InferenceError("x"): grpc.StatusCode.INTERNAL,
    }
    assert {type(e).__name__ + e.code: status_code(e) for e in expected} == {
        type(e).__name__ + e.code: code for e, code in expected.items()
    }
