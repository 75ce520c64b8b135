"""Triton's own HTTP client against the predictor's Open Inference Protocol v2 endpoints."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from services.common.imaging import decode_and_preprocess
from tests.conftest import PublishedModel
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(predictor: PredictorProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=predictor.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def batch(published_model: PublishedModel) -> np.ndarray:
    spec = published_model.manifest.input_spec
    return np.stack([decode_and_preprocess(data, spec) for data in published_model.images])


def _infer(
    client: triton.InferenceServerClient, batch: np.ndarray, binary: bool, version: str = ""
) -> np.ndarray:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer(
        "classifier", [tensor], model_version=version, outputs=[output], request_id="r-1"
    )
    assert result.get_response()["id"] == "r-1"
    logits = result.as_numpy("logits")
    assert logits is not None
    return np.asarray(logits)


def test_server_and_model_ready(
    client: triton.InferenceServerClient, published_model: PublishedModel
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    assert client.is_model_ready("classifier", str(published_model.version))
    assert not client.is_model_ready("classifier", "999")
    assert not client.is_model_ready("no_such_model")
    assert client.get_server_metadata()["name"] == "predictor"


def test_model_metadata(
    client: triton.InferenceServerClient, published_model: PublishedModel
) -> None:
    meta = client.get_model_metadata("classifier")
    assert meta["name"] == "classifier"
    assert meta["versions"] == [str(published_model.version)]
    assert meta["platform"] == "pytorch_torchscript"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    classes = len(published_model.manifest.labels)
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]}]
    same = client.get_model_metadata("classifier", str(published_model.version))
    assert same == meta


def test_infer_binary_and_json_give_the_eager_answer(
    client: triton.InferenceServerClient, batch: np.ndarray, published_model: PublishedModel
) -> None:
    binary = _infer(client, batch, binary=True)
    as_json = _infer(client, batch, binary=False, version=str(published_model.version))
    assert binary.shape == (len(batch), len(published_model.manifest.labels))
    assert binary.dtype == np.float32
    assert np.allclose(binary, as_json, atol=1e-5)
    assert binary.argmax(axis=1).tolist() == published_model.expected_top1


def test_infer_with_default_outputs_uses_binary(
    client: triton.InferenceServerClient, batch: np.ndarray, published_model: PublishedModel
) -> None:
    tensor = triton.InferInput("input", [4, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(batch[:4])
    result = client.infer("classifier", [tensor])  # tritonclient asks for binary outputs
    logits = result.as_numpy("logits")
    assert logits is not None
    assert logits.argmax(axis=1).tolist() == published_model.expected_top1[:4]


@pytest.mark.parametrize(
    ("shape", "datatype", "model", "version", "status"),
    [
        ([1, 3, 28, 28], "FP32", "classifier", "", "400"),  # wrong image size
        ([3, 32, 32], "FP32", "classifier", "", "400"),  # no batch axis
        ([1, 3, 32, 32], "FP64", "classifier", "", "400"),  # wrong datatype
        ([1, 3, 32, 32], "FP32", "no_such_model", "", "404"),
        ([1, 3, 32, 32], "FP32", "classifier", "999", "404"),  # version not loaded
        ([65, 3, 32, 32], "FP32", "classifier", "", "413"),  # more than max_images
    ],
)
def test_infer_errors_reach_the_client(
    client: triton.InferenceServerClient,
    shape: list[int],
    datatype: str,
    model: str,
    version: str,
    status: str,
) -> None:
    dtype = np.float64 if datatype == "FP64" else np.float32
    tensor = triton.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [tensor], model_version=version)
    assert raised.value.status() == status
    assert raised.value.message()  # the server's "error" text, not a parsing failure
    assert "exception occurred in the client" not in raised.value.message()


_BINARY_HEADER = (
    b'{"inputs": [{"name": "input", "shape": [1,3,32,32], "datatype": "FP32", '
    b'"parameters": {"binary_data_size": 12288}}]}'
)


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b"{nope", {}, "invalid_json"),
        (b'{"inputs": []}', {}, "invalid_request"),
        (b'{"inputs": [{"name": "input", "shape": [1,3,32,32], "datatype": "FP32"}]}', {},
         "missing_data"),
        (b'{"inputs": [{"name": "x", "shape": [1,3,32,32], "datatype": "FP32", "data": [1]}]}', {},
         "unknown_input"),
        (b'{"inputs": [{"name": "input", "shape": [1,3,32,32], "datatype": "FP32", '
         b'"data": [1, 2]}]}', {}, "invalid_data"),
        (b'{"inputs": [{"name": "input", "shape": [1,3,32,32], "datatype": "FP32", '
         b'"data": ["a"]}]}', {}, "invalid_data"),
        (_BINARY_HEADER, {"Inference-Header-Content-Length": "9999"}, "invalid_header"),
        (_BINARY_HEADER, {"Inference-Header-Content-Length": "-1"}, "invalid_header"),
        (_BINARY_HEADER + b"1234", {"Inference-Header-Content-Length": str(len(_BINARY_HEADER))},
         "invalid_binary_size"),
    ],
)  # fmt: skip
def test_raw_bad_infer_bodies_are_400_json(
    predictor: PredictorProcess, body: bytes, headers: dict[str, str], code: str
) -> None:
    url = predictor.url + "/v2/models/classifier/infer"
    response = httpx.post(url, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert response.json()["error"]


def test_unknown_output_is_400(predictor: PredictorProcess) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
        ],
        "outputs": [{"name": "probs"}],
    }
    response = httpx.post(predictor.url + "/v2/models/classifier/infer", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "unknown_output"
