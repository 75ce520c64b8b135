"""The int8 variant end to end: published behind its accuracy gate, verified at load, and
served by the predictor and by the real tritonserver with the answers the int8 model gives,
directly and through the gateway's ``?precision=int8``."""

from __future__ import annotations

import base64
import json
import shutil
import time
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
from tests.gateway.conftest import gateway_app, isolated_settings
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
    # A real predictor polling the repository: it must keep serving the previous version.
    server = start_predictor(repo, tmp_path / "predictor.log", engine="onnx", poll_interval_s=0.2)

    def constant_images(train: object, count: int = 0, seed: int = 0) -> quantize.Images:
        return np.zeros((32, 3, 32, 32), dtype=np.float32)  # one flat image: no real ranges

    monkeypatch.setattr(training.publish, "calibration_images", constant_images)
    argv = ["publish", "--checkpoint", str(published_model.checkpoint), "--repo", str(repo)]
    try:
        assert cli.main([*argv, "--int8"]) == cli.EXIT_USER_ERROR
        time.sleep(1.0)  # five polls of the repository
        with urllib.request.urlopen(server.url + "/readyz", timeout=5) as response:
            ready = json.loads(response.read())
        assert ready["version"] == published_model.version and not ready["refused"], ready
        body = {"image": _b64([held_out_digits(1)[0].png])[0]}
        request = urllib.request.Request(
            server.url + "/predict",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["version"] == str(published_model.version)
    finally:
        server.stop()
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
    with pytest.raises(
        IntegrityError, match=f"^classifier_int8/{int8_model.version}/model.onnx: sha256 mismatch"
    ):
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


def _b64(pngs: list[bytes]) -> list[str]:
    return [base64.b64encode(png).decode() for png in pngs]


async def test_the_gateway_routes_int8_to_each_engine_that_serves_it(
    int8_model: Int8Model, tmp_path: Path
) -> None:
    """A real gateway (in process) in front of a real int8 predictor, a real fp32 predictor and
    a real tritonserver: ``?precision=int8`` reaches each engine's int8 model and gives the
    int8 model's top-1 on held-out digits (nearly all of them the true digit); engines that
    cannot serve int8 answer 409, an unknown precision 400, and compare mode lists both."""
    http, grpc, metrics, dead = free_ports(4)
    triton_settings = TritonSettings(
        repository=int8_model.repo,
        run_dir=tmp_path / "triton-run",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    triton = LocalTriton(triton_settings)
    triton.start()
    int8 = start_predictor(int8_model.repo, tmp_path / "p8.log", engine="onnx", precision="int8")
    fp32 = start_predictor(int8_model.repo, tmp_path / "p32.log", engine="onnx")
    try:
        triton.wait_ready()
        common = {
            "triton_url": f"http://{triton_settings.http_url}",
            "torchserve_url": f"http://127.0.0.1:{dead}",  # never called at int8
            "torchserve_management_url": None,
            "health_interval_s": 0.2,
            "backends": ["predictor", "torchserve", "triton"],
        }
        body = {"images": _b64(int8_model.pngs), "top_k": 1}
        async with gateway_app(isolated_settings(predictor_url=int8.url, **common)) as (client, _):
            for backend in ("predictor", "triton"):
                reply = await client.post(f"/predict?backend={backend}&precision=int8", json=body)
                assert reply.status_code == 200, reply.text
                answer = reply.json()
                assert (answer["backend"], answer["precision"]) == (backend, "int8")
                served = [image[0]["class_id"] for image in answer["predictions"]]
                assert served == int8_model.expected_top1, backend
                right = sum(s == t for s, t in zip(served, int8_model.labels, strict=True))
                assert right >= LEAST_ACCURACY * DIGITS
            # Unnamed engine: the default one (the predictor) serves int8.
            reply = await client.post("/predict?precision=int8", json=body)
            assert reply.status_code == 200 and reply.json()["backend"] == "predictor"
            reply = await client.post("/predict?backend=torchserve&precision=int8", json=body)
            assert reply.status_code == 409, reply.text
            assert reply.json()["code"] == "precision_unavailable"
            assert "torchserve does not serve int8" in reply.json()["error"]
            for bad in ("fp16", "both", "INT8"):
                reply = await client.post(f"/predict?precision={bad}", json=body)
                assert reply.status_code == 400, (bad, reply.text)
                assert reply.json()["code"] == "unknown_precision"
            reply = await client.post("/predict?backend=all&precision=both", json=body)
            assert reply.status_code == 200, reply.text
            compare = reply.json()
            rows = {(r["backend"], r["precision"]): r for r in compare["results"]}
            assert set(rows) == {
                (b, p) for b in ("predictor", "torchserve", "triton") for p in ("fp32", "int8")
            }
            assert rows["torchserve", "int8"]["code"] == "precision_unavailable"
            assert rows["triton", "int8"]["top1"] == rows["predictor", "int8"]["top1"]
            # The int8 predictor serves int8 under both names; Triton's fp32 is fp32, and the
            # share of digits where its int8 agrees with it is what the gate measured.
            assert compare["precision_agreement"]["predictor"] == 1.0
            assert compare["precision_agreement"]["triton"] >= 0.9
        async with gateway_app(isolated_settings(predictor_url=fp32.url, **common)) as (client, _):
            reply = await client.post("/predict?backend=predictor&precision=int8", json=body)
            assert reply.status_code == 409, reply.text
            assert reply.json()["code"] == "precision_unavailable"
            assert "predictor does not serve int8" in reply.json()["error"]
            reply = await client.post("/predict?backend=predictor", json=body)
            assert reply.status_code == 200 and "precision" not in reply.json()
    finally:
        for server in (int8, fp32):
            server.stop()
        triton.stop()
