"""The int8 variant end to end: published behind its accuracy gate, verified at load, and
served by the predictor and by the real tritonserver with the answers the int8 model gives."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

import training.publish
from services.common.imaging import decode_and_preprocess
from services.common.publishing import staging_prefix
from services.common.repository import (
    INT8_ARTIFACT,
    IntegrityError,
    list_versions,
    load_version,
    read_manifest,
)
from services.common.runtime import EngineError, load_model
from services.predictor.settings import PredictorSettings
from services.triton.launcher import LocalTriton
from services.triton.settings import TritonSettings
from tests.conftest import PublishedModel
from tests.predictor.conftest import start_predictor
from tests.processes import free_ports
from training import cli, quantize
from training.digits import held_out_digits
from training.publish import publish_checkpoint

#: Held-out digits sent to the engines; the int8 model must get nearly all of them right.
DIGITS = 64
LEAST_ACCURACY = 0.9


@dataclass
class Int8Model:
    repo: Path
    version: int
    pngs: list[bytes]
    labels: list[int]
    #: The int8 model's own top-1 on each PNG, run here in ONNX Runtime: what engines must give.
    expected_top1: list[int]


@pytest.fixture(scope="module")
def int8_model(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Int8Model:
    repo = tmp_path_factory.mktemp("int8") / "model_repository"
    version = publish_checkpoint(published_model.checkpoint, repo, int8=quantize.GateOptions())
    manifest = read_manifest(repo, "classifier", version)
    digits = held_out_digits(DIGITS)
    pngs = [digit.png for digit in digits]
    batch = np.stack([decode_and_preprocess(png, manifest.input_spec) for png in pngs])
    session = ort.InferenceSession(
        str(repo / manifest.artifacts[INT8_ARTIFACT].path), providers=["CPUExecutionProvider"]
    )
    top1 = session.run(None, {"input": batch})[0].argmax(axis=1)
    return Int8Model(repo, version, pngs, [d.label for d in digits], [int(i) for i in top1])


def test_publish_records_both_accuracies_and_the_int8_file(int8_model: Int8Model) -> None:
    manifest = read_manifest(int8_model.repo, "classifier", int8_model.version)
    assert manifest.int8 is not None
    record = manifest.int8
    assert record.accuracy_fp32 == pytest.approx(manifest.metrics["test_accuracy"])
    assert 100 * (record.accuracy_fp32 - record.accuracy_int8) <= record.margin_pp == 0.5
    assert record.top1_agreement >= record.min_agreement == 0.99
    assert record.calibration_images == quantize.CALIBRATION_IMAGES
    artifact = manifest.artifacts[INT8_ARTIFACT]
    assert artifact.path == f"classifier_int8/{int8_model.version}/model.onnx"
    assert (int8_model.repo / "classifier_int8" / "config.pbtxt").is_file()
    assert (int8_model.repo / "classifier_int8_ensemble" / "config.pbtxt").is_file()
    assert load_version(int8_model.repo, "classifier").onnx_int8_path == (
        int8_model.repo / artifact.path
    )
    assert sum(
        p == t for p, t in zip(int8_model.expected_top1, int8_model.labels, strict=True)
    ) >= (LEAST_ACCURACY * DIGITS)


def test_cli_defaults_are_the_gate_defaults() -> None:
    args = cli.build_parser().parse_args(["publish", "--int8"])
    assert (args.int8_margin, args.int8_min_agreement) == (
        quantize.DEFAULT_MARGIN_PP,
        quantize.DEFAULT_MIN_AGREEMENT,
    )


def test_a_broken_calibration_fails_the_gate_and_publishes_nothing(
    published_model: PublishedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = published_model.copy_repository(tmp_path)

    def contents() -> list[Path]:  # the lock file publish takes is not the repository's content
        return sorted(p.relative_to(repo) for p in repo.rglob("*") if p.name != ".publish.lock")

    before = contents()

    def constant_images(train: object, count: int = 0, seed: int = 0) -> quantize.Images:
        return np.zeros((32, 3, 32, 32), dtype=np.float32)  # one flat image: no real ranges

    monkeypatch.setattr(training.publish, "calibration_images", constant_images)
    argv = ["publish", "--checkpoint", str(published_model.checkpoint), "--repo", str(repo)]
    assert cli.main([*argv, "--int8"]) == cli.EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: int8 gate failed"), error
    assert list_versions(repo, "classifier") == [published_model.version]
    assert contents() == before
    assert not list(repo.parent.glob(staging_prefix(repo) + "*"))
    load_model(repo, "classifier", None, "onnx", "cpu")  # the previous version still serves


def test_the_int8_file_is_verified_at_load(int8_model: Int8Model, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(int8_model.repo, repo)
    path = repo / "classifier_int8" / str(int8_model.version) / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="onnx_int8"):
        load_version(repo, "classifier")


def test_int8_needs_the_onnx_engine_and_an_int8_model(
    int8_model: Int8Model, published_model: PublishedModel
) -> None:
    with pytest.raises(EngineError, match="onnx"):
        load_model(int8_model.repo, "classifier", None, "torchscript", "cpu", precision="int8")
    with pytest.raises(Exception, match="--int8"):
        load_model(published_model.repo, "classifier", None, "onnx", "cpu", precision="int8")
    with pytest.raises(ValueError, match="PREDICTOR_ENGINE=onnx"):
        PredictorSettings(precision="int8")


@pytest.fixture
def predictor_url(int8_model: Int8Model, tmp_path: Path) -> Iterator[str]:
    server = start_predictor(
        int8_model.repo, tmp_path / "predictor.log", engine="onnx", precision="int8"
    )
    try:
        yield server.url
    finally:
        server.stop()


def test_the_predictor_serves_int8(predictor_url: str, int8_model: Int8Model) -> None:
    with urllib.request.urlopen(predictor_url + "/readyz", timeout=5) as response:
        ready = json.loads(response.read())
    assert (ready["engine"], ready["precision"]) == ("onnx", "int8")
    body = {"images": [base64.b64encode(png).decode() for png in int8_model.pngs], "top_k": 1}
    request = urllib.request.Request(
        predictor_url + "/predict",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    served = [image[0]["class_id"] for image in answer["predictions"]]
    assert served == int8_model.expected_top1


def test_triton_serves_the_int8_ensemble(int8_model: Int8Model, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    settings = TritonSettings(
        repository=int8_model.repo,
        run_dir=tmp_path / "triton-run",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    launcher = LocalTriton(settings)
    launcher.start()
    try:
        launcher.wait_ready()
        client = httpclient.InferenceServerClient(settings.http_url)
        tensor = httpclient.InferInput("IMAGE", [DIGITS, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[png] for png in int8_model.pngs], dtype=np.object_))
        result = client.infer("classifier_int8_ensemble", [tensor])
        served = result.as_numpy("LOGITS").argmax(axis=1).tolist()
        config = client.get_model_config("classifier_int8")
        client.close()
    finally:
        launcher.stop()
    assert served == int8_model.expected_top1
    assert config["name"] == "classifier_int8"
