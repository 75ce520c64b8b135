"""The field's own Open Inference Protocol clients against both engines, with the same code.

Every test runs twice, against the real local tritonserver and against the real predictor
(``engine``, see conftest), through tritonclient's HTTP and gRPC clients, the KServe SDK's REST
and gRPC clients (in their own virtual environment) and perf_analyzer. Answers are checked
against the eager model's top-1 on real held-out digits. Where Triton itself does not do what
this project asks of the predictor, the test says so and checks what Triton really does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

from loadtests import perf_analyzer
from services.common.serving import ServingConfig
from services.triton.protocol import IMAGE_INPUT, LOGITS_OUTPUT
from tests.clients import kserve_venv
from tests.clients.conftest import Engine
from tests.conftest import PublishedModel

pytestmark = pytest.mark.slow

MODEL = "classifier"
ENSEMBLE = "classifier_ensemble"
#: The classifier's tensors (Triton's names: the manifest's input and output).
INPUT = "input"
OUTPUT = "logits"
BATCH = 8
PROTOCOLS = ["http", "grpc"]
STATS_SETTLE_S = 10.0
#: tritonclient's encodings: HTTP sends JSON or the binary tensor extension, gRPC protobuf.
ENCODINGS = [("http", "json"), ("http", "binary"), ("grpc", "protobuf")]


def _ints(values: Any) -> list[int]:
    """Shapes and dims as integers (gRPC's JSON writes int64 fields as strings)."""
    return [int(v) for v in values]


def _count(stat: dict[str, Any]) -> tuple[int, int]:
    """(count, ns) of one statistics entry (gRPC's JSON leaves zeros out)."""
    return int(stat.get("count", 0)), int(stat.get("ns", 0))


def _settled(read: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> Any:
    """Statistics once ``done`` holds for them: Triton records a request's figures after its
    answer has left, so a read right after the answer may not count it yet. The last read
    when it never holds (the assertion after it then says what is wrong)."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while True:
        stats = read()
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


class Failure(Exception):
    """An error answer: HTTP status (``"400"``) or gRPC code name (``"INVALID_ARGUMENT"``)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class V2Client:
    """tritonclient's HTTP or gRPC client, its answers in one shape (HTTP's JSON) for both."""

    def __init__(self, protocol: str, engine: Engine) -> None:
        self.protocol = protocol
        self.module: Any = httpclient if protocol == "http" else grpcclient
        url = engine.http if protocol == "http" else engine.grpc
        self.client: Any = self.module.InferenceServerClient(url=url)
        # Triton reads a restricted gRPC protocol's key from "triton-grpc-protocol-<header>".
        prefix = "triton-grpc-protocol-" if self.grpc else ""
        self.repository_headers = {prefix + k: v for k, v in engine.repository_headers.items()}

    @property
    def grpc(self) -> bool:
        return self.protocol == "grpc"

    def _json(self, method: str, *args: Any, **options: Any) -> Any:
        call = getattr(self.client, method)
        if self.grpc:
            options["as_json"] = True
        try:
            return call(*args, **options)
        except InferenceServerException as exc:
            raise _failure(exc) from None

    def server_metadata(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._json("get_server_metadata")
        return answer

    def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        answer: dict[str, Any] = self._json("get_model_metadata", model, version)
        for tensor in answer.get("inputs", []) + answer.get("outputs", []):
            tensor["shape"] = _ints(tensor["shape"])
        return answer

    def model_config(self, model: str) -> dict[str, Any]:
        answer = self._json("get_model_config", model)
        config: dict[str, Any] = answer["config"] if self.grpc else answer
        for tensor in config.get("input", []) + config.get("output", []):
            tensor["dims"] = _ints(tensor["dims"])
        return config

    def repository_index(self) -> list[dict[str, Any]]:
        answer = self._json("get_model_repository_index", headers=self.repository_headers)
        models: list[dict[str, Any]] = answer.get("models", []) if self.grpc else answer
        return models

    def statistics(self, model: str) -> dict[str, Any]:
        answer = self._json("get_inference_statistics", model)
        stats: dict[str, Any] = answer["model_stats"][0]
        return stats

    def infer(
        self,
        model: str,
        tensor_name: str,
        array: np.ndarray,
        datatype: str,
        *,
        output: str,
        binary: bool = True,
        class_count: int = 0,
        version: str = "",
        request_id: str = "",
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """One infer call; the output as numpy and the whole answer as JSON."""
        tensor = self.module.InferInput(tensor_name, list(array.shape), datatype)
        if self.grpc:
            tensor.set_data_from_numpy(array)
            requested = self.module.InferRequestedOutput(output, class_count=class_count)
        else:
            # An encoded image is not UTF-8 text: BYTES input travels binary, ``binary``
            # then choosing only how the output comes back.
            tensor.set_data_from_numpy(array, binary_data=binary or datatype == "BYTES")
            requested = self.module.InferRequestedOutput(
                output, binary_data=binary, class_count=class_count
            )
        try:
            result = self.client.infer(
                model, [tensor], model_version=version, outputs=[requested], request_id=request_id
            )
        except InferenceServerException as exc:
            raise _failure(exc) from None
        values = result.as_numpy(output)
        assert values is not None, f"no {output} in the answer"
        response = result.get_response()
        answer = (
            MessageToDict(response, preserving_proto_field_name=True) if self.grpc else response
        )
        return np.asarray(values), answer

    def close(self) -> None:
        self.client.close()


def _failure(exc: InferenceServerException) -> Failure:
    status = str(exc.status() or "")
    return Failure(status.removeprefix("StatusCode."), exc.message() or "")


@pytest.fixture(scope="module")
def clients(engine: Engine) -> Iterator[dict[str, V2Client]]:
    made = {protocol: V2Client(protocol, engine) for protocol in PROTOCOLS}
    yield made
    for client in made.values():
        client.close()


def _png_rows(images: list[bytes]) -> np.ndarray:
    """A BYTES tensor [N, 1]: one encoded image per row."""
    return np.array([[image] for image in images], dtype=np.object_)


def _batches(count: int) -> list[slice]:
    return [slice(start, start + BATCH) for start in range(0, count, BATCH)]


def _expected_max_batch(serving: ServingConfig) -> int:
    """Triton's max_batch_size: the larger of the batch and the per-request image limit."""
    return max(serving.max_batch_size, serving.max_images_per_request)


# --------------------------------------------------------------------------- health, metadata


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_live_and_ready(clients: dict[str, V2Client], protocol: str) -> None:
    client = clients[protocol].client
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(ENSEMBLE)
    assert not client.is_model_ready("no_such_model")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_metadata(clients: dict[str, V2Client], protocol: str) -> None:
    metadata = clients[protocol].server_metadata()
    assert metadata["name"] and metadata["version"]
    # What both engines implement and these tests use. Triton also lists model_repository
    # (index and load/unload); the predictor has the index only, so it does not claim it.
    used_here = {"classification", "binary_tensor_data", "model_configuration", "statistics"}
    assert used_here <= set(metadata["extensions"]), metadata["extensions"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_metadata(
    clients: dict[str, V2Client], protocol: str, published_model: PublishedModel
) -> None:
    manifest = published_model.manifest
    spec = manifest.input_spec
    classes = len(manifest.labels)
    client = clients[protocol]
    classifier = client.model_metadata(MODEL)
    assert classifier["name"] == MODEL
    assert str(published_model.version) in classifier["versions"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in classifier["inputs"]] == [
        (spec.name, "FP32", [-1, *spec.shape])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in classifier["outputs"]] == [
        (OUTPUT, "FP32", [-1, classes])
    ]
    assert client.model_metadata(MODEL, str(published_model.version))["name"] == MODEL
    ensemble = client.model_metadata(ENSEMBLE)
    assert [(t["name"], t["datatype"], t["shape"]) for t in ensemble["inputs"]] == [
        (IMAGE_INPUT, "BYTES", [-1, 1])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in ensemble["outputs"]] == [
        (LOGITS_OUTPUT, "FP32", [-1, classes])
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_config(
    clients: dict[str, V2Client], protocol: str, published_model: PublishedModel
) -> None:
    manifest = published_model.manifest
    spec = manifest.input_spec
    for model, tensor_in, tensor_out in (
        (MODEL, (spec.name, "TYPE_FP32", list(spec.shape)), (OUTPUT, "TYPE_FP32")),
        (ENSEMBLE, (IMAGE_INPUT, "TYPE_STRING", [1]), (LOGITS_OUTPUT, "TYPE_FP32")),
    ):
        config = clients[protocol].model_config(model)
        assert config["name"] == model
        assert config["max_batch_size"] == _expected_max_batch(manifest.serving)
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [tensor_in]
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
            (*tensor_out, [len(manifest.labels)])
        ]
    classifier = clients[protocol].model_config(MODEL)
    assert "dynamic_batching" in classifier, "the classifier batches dynamically"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_index(
    clients: dict[str, V2Client], protocol: str, published_model: PublishedModel
) -> None:
    """Triton differs here: the project's launcher opens Triton's repository API (index, load,
    unload) only to a per-start key (``triton-admin-key``), so the Triton client sends it;
    the predictor's index is read-only and open."""
    client = clients[protocol]
    if client.repository_headers:
        with pytest.raises(InferenceServerException):
            client.client.get_model_repository_index()  # without the key: refused
    index = {entry["name"]: entry for entry in client.repository_index()}
    for model in (MODEL, ENSEMBLE):
        assert index[model]["state"] == "READY", index[model]
        assert index[model]["version"] == str(published_model.version)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_count_what_ran(
    clients: dict[str, V2Client], protocol: str, fp32_images: np.ndarray
) -> None:
    client = clients[protocol]
    before = client.statistics(MODEL)
    client.infer(MODEL, INPUT, fp32_images[:BATCH], "FP32", output=OUTPUT)
    success_before = _count(before["inference_stats"]["success"])
    after = _settled(
        lambda: client.statistics(MODEL),
        lambda stats: _count(stats["inference_stats"]["success"])[0] > success_before[0],
    )
    assert after["name"] == MODEL
    success = _count(after["inference_stats"]["success"])
    assert success[0] == success_before[0] + 1
    assert success[1] > success_before[1], "the cumulative duration grows"
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + BATCH
    for phase in ("queue", "compute_infer"):
        assert _count(after["inference_stats"][phase]) > _count(before["inference_stats"][phase])


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize(("protocol", "encoding"), ENCODINGS)
def test_fp32_infer_gives_the_eager_top1(
    clients: dict[str, V2Client],
    protocol: str,
    encoding: str,
    fp32_images: np.ndarray,
    published_model: PublishedModel,
) -> None:
    """Every held-out digit, in requests of 8 (a batch each), JSON and binary."""
    client = clients[protocol]
    classes = len(published_model.manifest.labels)
    top1: list[int] = []
    for number, rows in enumerate(_batches(len(fp32_images))):
        logits, answer = client.infer(
            MODEL,
            published_model.manifest.input_spec.name,
            fp32_images[rows],
            "FP32",
            output=OUTPUT,
            binary=encoding == "binary",
            request_id=f"fp32-{number}",
        )
        assert logits.shape == (len(fp32_images[rows]), classes)
        assert logits.dtype == np.float32
        assert answer["id"] == f"fp32-{number}"
        assert answer["model_name"] == MODEL
        top1 += logits.argmax(axis=1).tolist()
    assert top1 == published_model.expected_top1


@pytest.mark.parametrize(("protocol", "encoding"), ENCODINGS)
def test_bytes_infer_gives_the_eager_top1(
    clients: dict[str, V2Client],
    protocol: str,
    encoding: str,
    published_model: PublishedModel,
) -> None:
    """The encoded PNG files as a BYTES tensor [8, 1] to the ensemble, decoded server-side."""
    client = clients[protocol]
    images = published_model.images
    top1: list[int] = []
    for rows in _batches(len(images)):
        logits, answer = client.infer(
            ENSEMBLE,
            IMAGE_INPUT,
            _png_rows(images[rows]),
            "BYTES",
            output=LOGITS_OUTPUT,
            binary=encoding == "binary",
        )
        assert logits.shape == (len(images[rows]), len(published_model.manifest.labels))
        assert answer["model_name"] == ENSEMBLE
        top1 += logits.argmax(axis=1).tolist()
    assert top1 == published_model.expected_top1


@pytest.mark.parametrize("model", [MODEL, ENSEMBLE])
@pytest.mark.parametrize(("protocol", "encoding"), ENCODINGS)
def test_class_count_gives_score_index_label(
    clients: dict[str, V2Client],
    protocol: str,
    encoding: str,
    model: str,
    fp32_images: np.ndarray,
    published_model: PublishedModel,
) -> None:
    """The classification extension: ``class_count=3`` gives Triton's "score:index:label"."""
    labels = published_model.manifest.labels
    if model == MODEL:
        name, array, datatype, output = INPUT, fp32_images[:BATCH], "FP32", OUTPUT
    else:
        name, datatype, output = IMAGE_INPUT, "BYTES", LOGITS_OUTPUT
        array = _png_rows(published_model.images[:BATCH])
    classes, _ = clients[protocol].infer(
        model, name, array, datatype, output=output, binary=encoding == "binary", class_count=3
    )
    assert classes.shape == (BATCH, 3)
    for row, expected in zip(classes, published_model.expected_top1[:BATCH], strict=True):
        # Binary output gives bytes, JSON output str.
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
        scores = [float(score) for score, _, _ in entries]
        assert scores == sorted(scores, reverse=True)
        _, best, best_label = entries[0]
        assert (int(best), best_label) == (expected, labels[expected])
        assert all(labels[int(index)] == label for _, index, label in entries)


# --------------------------------------------------------------------------- the KServe SDK


@pytest.fixture(scope="module")
def kserve_answers(
    engine: Engine,
    kserve_python: Path,
    fp32_images: np.ndarray,
    published_model: PublishedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], dict[str, Any]]:
    """The SDK's REST and gRPC clients, FP32 to the classifier and BYTES to the ensemble, all
    made in one run of the SDK's interpreter."""
    folder = tmp_path_factory.mktemp(f"kserve-{engine.name}")
    np.save(folder / "batch.npy", fp32_images[:BATCH])
    files = []
    for index, image in enumerate(published_model.images[:BATCH]):
        path = folder / f"digit-{index}.png"
        path.write_bytes(image)
        files.append(str(path))
    inputs = {
        "fp32": (MODEL, {"name": INPUT, "datatype": "FP32", "npy": str(folder / "batch.npy")}),
        "bytes": (
            ENSEMBLE,
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [BATCH, 1], "files": files},
        ),
    }
    keys = [(transport, kind) for transport in ("rest", "grpc") for kind in inputs]
    calls = [
        {
            "transport": transport,
            "url": engine.base_url if transport == "rest" else engine.grpc,
            "model": inputs[kind][0],
            "request_id": f"kserve-{transport}-{kind}",
            INPUT: inputs[kind][1],
        }
        for transport, kind in keys
    ]
    return dict(zip(keys, kserve_venv.run_calls(kserve_python, calls), strict=True))


@pytest.mark.parametrize("kind", ["fp32", "bytes"])
@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_kserve_sdk_gives_the_eager_top1(
    kserve_answers: dict[tuple[str, str], dict[str, Any]],
    transport: str,
    kind: str,
    published_model: PublishedModel,
) -> None:
    answer = kserve_answers[(transport, kind)]
    assert answer["ok"], answer
    assert answer["id"] == f"kserve-{transport}-{kind}"
    output = OUTPUT if kind == "fp32" else LOGITS_OUTPUT
    assert answer["model_name"] == (MODEL if kind == "fp32" else ENSEMBLE)
    assert answer["outputs"][output]["datatype"] == "FP32"
    assert answer["outputs"][output]["shape"] == [BATCH, len(published_model.manifest.labels)]
    assert answer["outputs"][output]["argmax"] == published_model.expected_top1[:BATCH]


# --------------------------------------------------------------------------- perf_analyzer


@pytest.mark.parametrize("model", [MODEL, ENSEMBLE])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_perf_analyzer_completes_without_errors(
    engine: Engine,
    clients: dict[str, V2Client],
    perf_analyzer_tool: perf_analyzer.PerfAnalyzer,
    protocol: str,
    model: str,
    fp32_images: np.ndarray,
    published_model: PublishedModel,
) -> None:
    """A short run; perf_analyzer stops at the first failed request, so completing is zero
    errors. The server's own statistics count every request it sent."""
    requests = 40
    if model == MODEL:
        rows = [image.astype("<f4").tobytes() for image in fp32_images[:16]]
        data = perf_analyzer.tensor_input_data(INPUT, rows)
    else:
        data = perf_analyzer.bytes_input_data(IMAGE_INPUT, published_model.images[:16])
    before = _count(clients["http"].statistics(model)["inference_stats"]["success"])[0]
    result = perf_analyzer.run(
        perf_analyzer_tool,
        url=engine.http if protocol == "http" else engine.grpc,
        model=model,
        input_data=data,
        protocol="http" if protocol == "http" else "grpc",
        concurrency=2,
        requests=requests,
    )
    assert result.requests >= requests
    assert result.throughput > 0
    stats = _settled(
        lambda: clients["http"].statistics(model),
        lambda stats: _count(stats["inference_stats"]["success"])[0] - before >= requests,
    )
    assert _count(stats["inference_stats"]["success"])[0] - before >= requests


# --------------------------------------------------------------------------- bad input


def _bad_input(case: str, fp32_images: np.ndarray) -> tuple[str, str, np.ndarray, str, str]:
    """(model, input name, tensor, datatype, version) of one bad request."""
    good = fp32_images[:2]
    if case == "wrong dtype":
        return MODEL, INPUT, good.astype(np.float64), "FP64", ""
    if case == "wrong shape":
        return MODEL, INPUT, np.ascontiguousarray(good[:, :, :16, :16]), "FP32", ""
    if case == "NaN":
        nan = good.copy()
        nan[0, 0, 0, 0] = np.nan
        return MODEL, INPUT, nan, "FP32", ""
    if case == "undecodable BYTES":
        return ENSEMBLE, IMAGE_INPUT, _png_rows([b"not an image"]), "BYTES", ""
    if case == "unknown model":
        return "no_such_model", INPUT, good, "FP32", ""
    if case == "unknown version":
        return MODEL, INPUT, good, "FP32", "999"
    assert case == "unknown input"
    return MODEL, "no_such_input", good, "FP32", ""


#: What each bad request gets, (HTTP status, gRPC code): what Triton 2.51 answers, NaN aside.
BAD_INPUT = {
    "wrong dtype": ("400", "INVALID_ARGUMENT"),
    "wrong shape": ("400", "INVALID_ARGUMENT"),
    "NaN": ("400", "INVALID_ARGUMENT"),
    "undecodable BYTES": ("400", "INVALID_ARGUMENT"),
    "unknown model": ("404", "NOT_FOUND"),
    "unknown version": ("404", "NOT_FOUND"),
    "unknown input": ("400", "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_the_callers_error(
    engine: Engine,
    clients: dict[str, V2Client],
    protocol: str,
    case: str,
    fp32_images: np.ndarray,
    published_model: PublishedModel,
) -> None:
    client = clients[protocol]
    model, name, array, datatype, version = _bad_input(case, fp32_images)
    output = LOGITS_OUTPUT if model == ENSEMBLE else OUTPUT
    fails_before = _count(clients["http"].statistics(ENSEMBLE)["inference_stats"]["fail"])[0]
    if case == "NaN" and engine.name == "triton":
        # Triton itself does not look at the values: it runs the model on a NaN input and
        # answers 200 with NaN logits. The predictor refuses it (see the else branch).
        logits, _ = client.infer(model, name, array, datatype, output=output)
        assert np.isnan(logits[0]).any()
    else:
        with pytest.raises(Failure) as caught:
            client.infer(model, name, array, datatype, output=output, version=version)
        http_status, grpc_code = BAD_INPUT[case]
        assert caught.value.status == (grpc_code if client.grpc else http_status), caught.value
        assert caught.value.message, "the answer says what was wrong"
    if case == "undecodable BYTES":
        # The shared decoder's verdict, in both (Triton also prefixes "[not_an_image]").
        assert "is not a recognised image format" in caught.value.message
        stats = _settled(
            lambda: clients["http"].statistics(ENSEMBLE),
            lambda stats: _count(stats["inference_stats"]["fail"])[0] > fails_before,
        )
        fails = _count(stats["inference_stats"]["fail"])[0]
        assert fails > fails_before, "the ensemble's fail count moves"
    # The service stays ready and answers the next good request.
    assert client.client.is_server_ready()
    logits, _ = client.infer(MODEL, INPUT, fp32_images[:1], "FP32", output=OUTPUT)
    assert int(logits.argmax()) == published_model.expected_top1[0]
