"""The real tritonserver serving the published model: answers, batching, errors, readiness."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from loadtests.triton_bench import batching_counters
from services.common.imaging import decode_and_preprocess
from services.triton.protocol import parse_error
from tests.conftest import PublishedModel
from tests.triton.conftest import RunningTriton

pytestmark = pytest.mark.slow

ENSEMBLE = "classifier_ensemble"


def image_input(module: Any, images: list[bytes]) -> Any:
    tensor = module.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image] for image in images], dtype=np.object_))
    return tensor


def http_logits(url: str, images: list[bytes]) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    try:
        result = client.infer(ENSEMBLE, [image_input(httpclient, images)])
        return result.as_numpy("LOGITS")
    finally:
        client.close()


def assert_ready(triton: RunningTriton) -> None:
    ready = httpx.get(f"{triton.http_base}/v2/models/{ENSEMBLE}/ready", timeout=5)
    assert ready.status_code == 200
    assert httpx.get(f"{triton.http_base}/v2/health/ready", timeout=5).status_code == 200


def test_http_ensemble_top1_matches_eager_model(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    logits = http_logits(triton.http_url, published_model.images)  # all 64 in one request
    assert logits.shape == (len(published_model.images), len(published_model.manifest.labels))
    assert logits.argmax(axis=1).tolist() == published_model.expected_top1


def test_grpc_ensemble_top1_matches_eager_model(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        top1 = []
        for image in published_model.images:  # one request per image
            result = client.infer(ENSEMBLE, [image_input(grpcclient, [image])])
            top1.append(int(result.as_numpy("LOGITS").argmax(axis=1)[0]))
            assert result.get_response().model_version == str(published_model.version)
    finally:
        client.close()
    assert top1 == published_model.expected_top1


def test_classification_extension_names_the_label(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        images = published_model.images[:4]
        result = client.infer(
            ENSEMBLE,
            [image_input(httpclient, images)],
            outputs=[httpclient.InferRequestedOutput("LOGITS", class_count=2)],
        )
    finally:
        client.close()
    labels = published_model.manifest.labels
    for row, expected in zip(
        result.as_numpy("LOGITS"), published_model.expected_top1[:4], strict=True
    ):
        score, index, label = row[0].decode().split(":")
        float(score)
        assert (int(index), label) == (expected, labels[expected])


def test_metadata_names_inputs_outputs_and_version(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    metadata = httpx.get(f"{triton.http_base}/v2/models/{ENSEMBLE}", timeout=5).json()
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
    classes = len(published_model.manifest.labels)
    assert metadata["outputs"] == [{"name": "LOGITS", "datatype": "FP32", "shape": [-1, classes]}]
    served = httpx.get(f"{triton.http_base}/v2/models/classifier", timeout=5).json()
    assert served["versions"] == [str(published_model.version)]


def test_onnx_and_torchscript_twins_agree_under_native_names(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    spec = published_model.manifest.input_spec
    batch = np.stack([decode_and_preprocess(data, spec) for data in published_model.images[:16]])
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        outputs = {}
        for model, input_name, output_name in (
            ("classifier", "input", "logits"),
            ("classifier_torchscript", "INPUT__0", "OUTPUT__0"),
        ):
            tensor = httpclient.InferInput(input_name, list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            outputs[model] = client.infer(model, [tensor]).as_numpy(output_name)
    finally:
        client.close()
    onnx_logits, ts_logits = outputs["classifier"], outputs["classifier_torchscript"]
    assert np.allclose(onnx_logits, ts_logits, atol=1e-4)
    assert onnx_logits.argmax(axis=1).tolist() == published_model.expected_top1[:16]


def read_counters(triton: RunningTriton, model: str) -> tuple[float, float]:
    """(inferences, executions) of ``model`` so far, as the Triton bench reads them."""
    counters = batching_counters(triton.settings)
    assert model in counters, f"nv_inference counters for {model} missing from /metrics"
    return counters[model]


def test_dynamic_batching_under_concurrent_load(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    before = {m: read_counters(triton, m) for m in ("classifier", "preprocess")}
    images = published_model.images

    def client_loop(worker: int) -> list[tuple[int, int]]:
        answers = []
        client = httpclient.InferenceServerClient(triton.http_url)
        try:
            for i in range(8):
                index = (worker * 8 + i) % len(images)
                result = client.infer(ENSEMBLE, [image_input(httpclient, [images[index]])])
                answers.append((index, int(result.as_numpy("LOGITS").argmax(axis=1)[0])))
        finally:
            client.close()
        return answers

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = [a for answers in pool.map(client_loop, range(16)) for a in answers]
    assert len(results) == 128
    assert all(top1 == published_model.expected_top1[index] for index, top1 in results)
    for model in ("classifier", "preprocess"):
        count, executions = (
            after - start
            for after, start in zip(read_counters(triton, model), before[model], strict=True)
        )
        assert count == 128, model
        # 128 single-image requests ran in fewer executions: the dynamic batcher merged them.
        # (and more than none: a missing execution counter reads as 0)
        assert 0 < executions < count, f"{model}: {executions} executions for {count} inferences"


def http_error(url: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(url, json=body, timeout=10)
    # Triton answers errors as a JSON object, though labelled text/plain.
    assert set(response.json()) == {"error"}
    return response


def test_undecodable_image_is_a_400_over_http(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    url = f"{triton.http_base}/v2/models/{ENSEMBLE}/infer"
    for data, code in ((b"not an image at all", "not_an_image"), (b"", "empty_image")):
        body = {
            "inputs": [
                {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": [data.decode()]}
            ]
        }
        response = http_error(url, body)
        assert response.status_code == 400
        parsed = parse_error(response.json()["error"])
        assert parsed is not None and parsed[0] == code, response.json()
        assert_ready(triton)
    truncated = published_model.images[0][:40]  # a PNG header, then nothing
    with pytest.raises(InferenceServerException) as info:
        http_logits(triton.http_url, [published_model.images[1], truncated])
    assert info.value.status() == "400"
    assert "image 1" in info.value.message()
    assert_ready(triton)


def test_undecodable_image_is_invalid_argument_over_grpc(triton: RunningTriton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(ENSEMBLE, [image_input(grpcclient, [b"\x89PNG garbage"])])
    finally:
        client.close()
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert parse_error(info.value.message()) == (
        "not_an_image",
        "data is not a recognised image format",
    )
    assert_ready(triton)


def test_a_bad_image_fails_only_its_own_request(
    triton: RunningTriton, published_model: PublishedModel
) -> None:
    good = published_model.images[:15]

    def send(payload: bytes) -> Callable[[], Any]:
        def call() -> Any:
            try:
                return int(http_logits(triton.http_url, [payload]).argmax(axis=1)[0])
            except InferenceServerException as exc:
                return exc

        return call

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(send(image)) for image in good]
        bad = pool.submit(send(b"garbage"))
        answers = [future.result() for future in futures]
    assert answers == published_model.expected_top1[:15]
    error = bad.result()
    assert isinstance(error, InferenceServerException) and error.status() == "400"
    assert_ready(triton)


@pytest.mark.parametrize(
    ("model", "tensor", "status", "message"),
    [
        # wrong shape: one image per row is dims [1]; [1, 2] is two per row
        (ENSEMBLE, {"name": "IMAGE", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
         400, "unexpected shape"),
        ("classifier", {"name": "input", "shape": [1, 3, 30, 32], "datatype": "FP32",
                        "data": [0.0] * (3 * 30 * 32)}, 400, "unexpected shape"),
        # wrong dtype
        (ENSEMBLE, {"name": "IMAGE", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
         400, "data-type"),
        ("classifier", {"name": "input", "shape": [1, 3, 32, 32], "datatype": "INT32",
                        "data": [0] * (3 * 32 * 32)}, 400, "data-type"),
        # unknown model
        ("no_such_model", {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
         404, "unknown model"),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_errors_and_the_server_stays_ready(
    triton: RunningTriton, model: str, tensor: dict[str, Any], status: int, message: str
) -> None:
    response = http_error(f"{triton.http_base}/v2/models/{model}/infer", {"inputs": [tensor]})
    assert response.status_code == status
    assert message in response.json()["error"].lower()
    assert parse_error(response.json()["error"]) is None  # Triton's own, not a model's tag
    assert_ready(triton)


def test_unknown_model_over_grpc(triton: RunningTriton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("no_such_model", [image_input(grpcclient, [b"x"])])
        assert client.is_server_ready()
    finally:
        client.close()
    assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)
