"""Bad Open Inference Protocol requests over REST and gRPC, sent with Triton's own clients to the
real server: each is a clear 4xx / INVALID_ARGUMENT / NOT_FOUND with the same message over both
protocols, the model's ``fail`` statistics count it, and the server stays ready (no 5xx, no
INTERNAL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import PublishedModel
from tests.metrics import metric_samples, sample_sum
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow

PROTOCOLS = ("http", "grpc")
#: What each protocol's client reports for a caller's mistake and an unknown model.
STATUS = {
    "http": {"invalid": ("400", "413"), "not_found": ("404",)},
    "grpc": {"invalid": ("StatusCode.INVALID_ARGUMENT",), "not_found": ("StatusCode.NOT_FOUND",)},
}
ELEVEN_MB_ROWS = 900  # FP32 [900, 3, 32, 32] is 11 MB, over the 10 MiB body limit


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "invalid" or "not_found"
    model: str
    input_name: str
    datatype: str
    array: np.ndarray
    version: str = ""
    message: str = ""  # a part of the error message, the same over both protocols
    counted: tuple[str, ...] = PROTOCOLS  # protocols whose fail count must move


def _cases(png: bytes) -> list[Case]:
    zeros = np.zeros((1, 3, 32, 32), dtype=np.float32)
    images = np.array([[png]], dtype=np.object_)
    return [
        Case("wrong dtype", "invalid", "classifier", "input", "FP64",
             zeros.astype(np.float64), message="datatype must be FP32, not FP64"),
        Case("wrong shape", "invalid", "classifier", "input", "FP32",
             np.zeros((1, 3, 28, 28), np.float32), message="input shape must be [-1, 3, 32, 32]"),
        Case("no batch axis", "invalid", "classifier", "input", "FP32",
             np.zeros((3, 32, 32), np.float32), message="input shape must be"),
        Case("NaN", "invalid", "classifier", "input", "FP32",
             np.full((1, 3, 32, 32), np.nan, np.float32), message="NaN or infinity"),
        Case("undecodable bytes", "invalid", "classifier_ensemble", "IMAGE", "BYTES",
             np.array([[b"this is not an image"]], dtype=np.object_),
             message="[not_an_image] data is not a recognised image format"),
        Case("truncated png in a batch", "invalid", "classifier_ensemble", "IMAGE", "BYTES",
             np.array([[png], [png[:60]]], dtype=np.object_),
             message="[corrupt_image] IMAGE[1]: image could not be decoded"),
        Case("images as FP32", "invalid", "classifier_ensemble", "IMAGE", "FP32",
             np.zeros((1, 1), np.float32), message="datatype must be BYTES"),
        Case("unknown input", "invalid", "classifier", "pixels", "FP32", zeros,
             message="unknown input 'pixels'"),
        Case("too many images", "invalid", "classifier_ensemble", "IMAGE", "BYTES",
             np.repeat(images, 65, axis=0), message="over the limit of 64 per request"),
        # Refused by the HTTP body limit before any model is looked at, so only gRPC counts it.
        Case("over the body limit", "invalid", "classifier", "input", "FP32",
             np.zeros((ELEVEN_MB_ROWS, 3, 32, 32), np.float32),
             message="bytes is over the limit of", counted=("grpc",)),
        Case("unknown model", "not_found", "no_such_model", "input", "FP32", zeros,
             message="unknown model 'no_such_model'", counted=()),
        Case("unknown version", "not_found", "classifier", "input", "FP32", zeros,
             version="99", message="version 99 is not loaded", counted=()),
    ]  # fmt: skip


_CASE_NAMES = [case.name for case in _cases(b"")]


@pytest.fixture(scope="module")
def cases(published_model: PublishedModel) -> dict[str, Case]:
    return {case.name: case for case in _cases(published_model.images[0])}


@pytest.fixture(scope="module")
def clients(predictor: PredictorProcess) -> Iterator[dict[str, Any]]:
    http = triton_http.InferenceServerClient(
        predictor.url.removeprefix("http://"), network_timeout=60.0
    )
    grpc = triton_grpc.InferenceServerClient(predictor.grpc_url)
    yield {"http": http, "grpc": grpc}
    http.close()
    grpc.close()


def _fail_counts(client: Any) -> dict[str, int]:
    """Each model's ``fail`` count (gRPC's JSON writes 64-bit numbers as strings, and leaves
    out a zero)."""
    grpc = isinstance(client, triton_grpc.InferenceServerClient)
    stats = (
        client.get_inference_statistics(as_json=True) if grpc else client.get_inference_statistics()
    )
    return {
        entry["name"]: int(entry["inference_stats"]["fail"].get("count", 0))
        for entry in stats["model_stats"]
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", _CASE_NAMES)
def test_bad_request_is_the_callers_error_and_counts_as_a_failure(
    name: str, protocol: str, cases: dict[str, Case], clients: dict[str, Any]
) -> None:
    case = cases[name]
    client = clients[protocol]
    module = triton_http if protocol == "http" else triton_grpc
    tensor = module.InferInput(case.input_name, list(case.array.shape), case.datatype)
    tensor.set_data_from_numpy(case.array)
    before = _fail_counts(client)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(case.model, [tensor], model_version=case.version)
    assert raised.value.status() in STATUS[protocol][case.kind], raised.value
    message = raised.value.message()
    assert case.message in message
    assert "Traceback" not in message and "exception occurred in the client" not in message
    after = _fail_counts(client)
    moved = {model for model in after if after[model] != before.get(model, 0)}
    assert moved == ({case.model} if protocol in case.counted else set())
    assert client.is_server_ready()
    assert client.is_model_ready("classifier") and client.is_model_ready("classifier_ensemble")


def test_no_server_error_after_the_battery(predictor: PredictorProcess) -> None:
    """Runs after the battery (file order): nothing was answered as a server fault over either
    protocol, and a good request over each still gets its answer."""
    samples = metric_samples(httpx.get(predictor.url + "/metrics").text)
    http_5xx = sum(
        value
        for name, labels, value in samples
        if name == "predictor_http_request_duration_seconds_count"
        and labels["status"].startswith("5")
    )
    assert http_5xx == 0
    grpc_calls = "predictor_grpc_request_duration_seconds_count"
    assert sample_sum(samples, grpc_calls, code="INTERNAL") == 0
    assert sample_sum(samples, grpc_calls, method="ModelInfer", code="INVALID_ARGUMENT") > 0
    assert sample_sum(samples, grpc_calls, method="ModelInfer", code="NOT_FOUND") > 0
