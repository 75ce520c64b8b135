"""Triton's own HTTP client against the predictor's Open Inference Protocol v2 endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


# --- Triton's names and extensions ----------------------------------------------------------


@pytest.fixture(scope="module")
def image_rows(published_model: PublishedModel) -> np.ndarray:
    """The held-out PNGs as a BYTES ``[N, 1]`` tensor, what Triton's ensemble takes."""
    return np.array([[data] for data in published_model.images], dtype=np.object_)


def _image_input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", list(rows.shape), "BYTES")
    tensor.set_data_from_numpy(rows, binary_data=True)
    return tensor


def test_server_metadata_lists_the_extensions_implemented(
    client: triton.InferenceServerClient,
) -> None:
    assert set(client.get_server_metadata()["extensions"]) == {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "parameters",
        "statistics",
    }


def test_model_configs_have_tritons_names_and_shape(
    client: triton.InferenceServerClient, published_model: PublishedModel
) -> None:
    classes = len(published_model.manifest.labels)
    serving = published_model.manifest.serving
    config = client.get_model_config("classifier")
    assert config["name"] == "classifier"
    assert config["max_batch_size"] == max(serving.max_batch_size, serving.max_images_per_request)
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input", "TYPE_FP32", [3, 32, 32])
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", [classes])
    ]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == round(
        serving.max_batch_delay_ms * 1000
    )
    ensemble = client.get_model_config("classifier_ensemble", str(published_model.version))
    assert ensemble["max_batch_size"] == config["max_batch_size"]
    assert [(i["name"], i["data_type"], i["dims"]) for i in ensemble["input"]] == [
        ("IMAGE", "TYPE_STRING", [1])
    ]
    assert [(o["name"], o["dims"]) for o in ensemble["output"]] == [("LOGITS", [classes])]
    meta = client.get_model_metadata("classifier_ensemble")
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["outputs"] == [{"name": "LOGITS", "datatype": "FP32", "shape": [-1, classes]}]


def test_repository_index_lists_both_models_ready(
    client: triton.InferenceServerClient, published_model: PublishedModel
) -> None:
    version = str(published_model.version)
    assert client.get_model_repository_index() == [
        {"name": "classifier", "version": version, "state": "READY"},
        {"name": "classifier_ensemble", "version": version, "state": "READY"},
    ]
    assert client.is_model_ready("classifier_ensemble", version)


def test_encoded_images_give_the_eager_answer_and_count_in_the_statistics(
    client: triton.InferenceServerClient, image_rows: np.ndarray, published_model: PublishedModel
) -> None:
    def stats() -> dict[str, Any]:
        (entry,) = client.get_inference_statistics("classifier_ensemble")["model_stats"]
        assert entry["version"] == str(published_model.version)
        return dict(entry)

    before = stats()
    result = client.infer("classifier_ensemble", [_image_input(image_rows)], request_id="img")
    logits = result.as_numpy("LOGITS")
    assert logits is not None
    assert logits.shape == (len(image_rows), len(published_model.manifest.labels))
    assert logits.argmax(axis=1).tolist() == published_model.expected_top1
    assert result.get_response()["id"] == "img"
    after = stats()
    assert after["inference_count"] == before["inference_count"] + len(image_rows)
    success, queue = after["inference_stats"]["success"], after["inference_stats"]["queue"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert queue["count"] == success["count"]
    compute = after["inference_stats"]["compute_infer"]
    assert compute["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    everything = client.get_inference_statistics()["model_stats"]
    assert [entry["name"] for entry in everything] == ["classifier", "classifier_ensemble"]


@pytest.mark.parametrize("binary", [True, False])
def test_class_count_gives_tritons_classification_strings(
    client: triton.InferenceServerClient,
    image_rows: np.ndarray,
    published_model: PublishedModel,
    binary: bool,
) -> None:
    rows = image_rows[:8]
    raw = client.infer("classifier_ensemble", [_image_input(rows)]).as_numpy("LOGITS")
    assert raw is not None
    output = triton.InferRequestedOutput("LOGITS", binary_data=binary, class_count=3)
    result = client.infer("classifier_ensemble", [_image_input(rows)], outputs=[output])
    strings = result.as_numpy("LOGITS")
    assert strings is not None and strings.shape == (8, 3)
    labels = published_model.manifest.labels
    for row, expected_top1, logits in zip(
        strings, published_model.expected_top1, raw, strict=False
    ):
        # tritonclient hands JSON strings back as str, binary ones as bytes
        parsed = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices[0] == expected_top1
        assert indices == np.argsort(-logits, kind="stable")[:3].tolist()
        assert [label for _, _, label in parsed] == [labels[i] for i in indices]
        assert [float(score) for score, _, _ in parsed] == pytest.approx(
            logits[indices].tolist(), abs=1e-5
        )


def test_a_kserve_style_body_with_model_name_and_parameters_is_accepted(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    version = str(published_model.version)
    body = {
        "id": "kserve-1",
        "model_name": "classifier",
        "model_version": version,
        "parameters": {"custom": "ignored"},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "parameters": {},
                "data": [0.0] * 3072,
            }
        ],
        "outputs": [{"name": "logits", "parameters": {}}],
    }
    url = f"{predictor.url}/v2/models/classifier/versions/{version}/infer"
    response = httpx.post(url, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["id"], answer["model_name"], answer["model_version"]) == (
        "kserve-1",
        "classifier",
        version,
    )
    assert answer["outputs"][0]["shape"] == [1, len(published_model.manifest.labels)]
    mismatch = httpx.post(url, json=body | {"model_name": "classifier_ensemble"})
    assert mismatch.status_code == 400
    assert mismatch.json()["code"] == "model_mismatch"
