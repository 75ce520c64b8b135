"""A version's serving config is what every engine reports and applies.

One version is published with serving values that differ from every default
(:data:`SERVING`); each real server is started on it, with no override set, and asked what it
runs with through its own API: Triton's model configuration (``/v2/models/<m>/config``),
TorchServe's describe-model answer, the predictor's ``/readyz``. "Applies" is checked beside
"reports": Triton refuses a request larger than the batch size and runs one python stub per
instance; TorchServe runs as many READY workers as instances and hands the handler no batch
above the batch size; the predictor refuses a request over its image limit and forms no batch
above the batch size.
"""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from services.common.repository import read_manifest
from services.common.serving import ServingConfig
from services.torchserve.launcher import describe, down, status, up
from services.triton.launcher import LocalTriton
from tests.conftest import PublishedModel, eager_top1, held_out_digit_pngs
from tests.metrics import metric_samples, sample_sum
from tests.predictor.conftest import start_predictor
from tests.processes import processes_naming
from tests.torchserve.conftest import torchserve_settings
from tests.torchserve.test_server import batches_by_size
from tests.triton.conftest import triton_settings
from training.publish import publish_checkpoint

pytestmark = pytest.mark.slow

#: Every field but the pixel limit differs from its default (the limit is kept: the images
#: are small, and the handler's and preprocess's own tests check it).
SERVING = ServingConfig(
    max_batch_size=16,
    max_batch_delay_ms=3.0,
    preferred_batch_sizes=(4, 8),
    max_images_per_request=16,
    instance_count=2,
)


@pytest.fixture(scope="module")
def serving_model(
    trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> PublishedModel:
    """The session's checkpoint published, through the real publish path, with SERVING."""
    assert ServingConfig() != SERVING
    repo = tmp_path_factory.mktemp("serving-config") / "model_repository"
    version = publish_checkpoint(trained_checkpoint, repo, serving=SERVING)
    manifest = read_manifest(repo, "classifier", version)
    assert manifest.serving == SERVING
    on_disk = json.loads((repo / "classifier" / str(version) / "manifest.json").read_text())
    assert on_disk["serving"]["preferred_batch_sizes"] == [4, 8]
    images = held_out_digit_pngs(32)
    return PublishedModel(
        repo=repo,
        model="classifier",
        version=version,
        manifest=manifest,
        checkpoint=trained_checkpoint,
        images=images,
        expected_top1=eager_top1(trained_checkpoint, manifest, images),
    )


@pytest.fixture
def no_engine_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's TRITON_* / TORCHSERVE_* / PREDICTOR_* must not override what is tested."""
    for name in list(os.environ):
        if name.startswith(("TRITON_", "TORCHSERVE_", "PREDICTOR_")):
            monkeypatch.delenv(name)


# --- Triton ---------------------------------------------------------------------------------


def ensemble_request(images: list[bytes]) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image] for image in images], dtype=np.object_))
    return [tensor]


@pytest.mark.usefixtures("no_engine_overrides")
def test_triton_reports_and_applies_the_serving_config(
    serving_model: PublishedModel, tmp_path: Path
) -> None:
    run_dir = tmp_path / "triton-run"
    # The ONNX twin is the one under test; the TorchScript twin would add two torch stubs.
    settings = triton_settings(serving_model, run_dir).model_copy(
        update={"torchscript_twin": False}
    )
    assert settings.overrides(SERVING) == []
    launcher = LocalTriton(settings)
    launcher.start()
    try:
        launcher.wait_ready()
        base = f"http://{settings.http_url}"
        configs = {
            name: httpx.get(f"{base}/v2/models/{name}/config", timeout=10).json()
            for name in ("classifier", "preprocess", "classifier_ensemble")
        }
        classifier = configs["classifier"]
        assert classifier["max_batch_size"] == 16
        batching = classifier["dynamic_batching"]
        assert batching["preferred_batch_size"] == [4, 8]
        assert int(batching["max_queue_delay_microseconds"]) == 3000
        assert [group["count"] for group in classifier["instance_group"]] == [2]
        assert configs["preprocess"]["max_batch_size"] == 16
        assert configs["preprocess"]["dynamic_batching"]["preferred_batch_size"] == [4, 8]
        assert configs["classifier_ensemble"]["max_batch_size"] == 16

        # Applied: one python stub per classifier instance ...
        stubs = sorted(  # a stub's command line ends with its instance name and "DEFAULT"
            line.split()[-2]
            for line in processes_naming(run_dir)
            if "triton_python_backend_stub" in line and "/classifier/" in line
        )
        assert stubs == ["classifier_0_0", "classifier_0_1"]
        # ... a request over max_batch_size is refused by Triton itself, one at it is served ...
        images = serving_model.images
        client = httpclient.InferenceServerClient(settings.http_url)
        try:
            with pytest.raises(InferenceServerException, match="batch"):
                client.infer("classifier_ensemble", ensemble_request((images * 2)[:17]))
            logits = client.infer("classifier_ensemble", ensemble_request(images[:16]))
            top1 = logits.as_numpy("LOGITS").argmax(axis=1).tolist()
            assert top1 == serving_model.expected_top1[:16]
        finally:
            client.close()

        # ... and concurrent single images are merged into batches no larger than it.
        def one(i: int) -> int:
            own = httpclient.InferenceServerClient(settings.http_url)  # one per request
            try:
                result = own.infer("classifier_ensemble", ensemble_request([images[i % 32]]))
            finally:
                own.close()
            return int(result.as_numpy("LOGITS").argmax(axis=1)[0])

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(one, range(64)))
        assert answers == [serving_model.expected_top1[i % 32] for i in range(64)]
        stats = httpx.get(f"{base}/v2/models/classifier/stats", timeout=10).json()
        sizes = [int(b["batch_size"]) for b in stats["model_stats"][0]["batch_stats"]]
        assert sizes and max(sizes) <= 16, sizes
    finally:
        launcher.stop()
    assert not processes_naming(run_dir), "tritonserver processes left behind"


# --- TorchServe -----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_engine_overrides")
def test_torchserve_reports_and_applies_the_serving_config(
    serving_model: PublishedModel, tmp_path: Path
) -> None:
    settings = torchserve_settings(
        serving_model.copy_repository(tmp_path), serving_model.model, tmp_path / "run"
    )
    instance = up(settings)
    try:
        assert instance.registration.overrides == {}
        (entry,) = describe(settings, instance.keys, instance.version)
        assert entry["batchSize"] == 16
        assert entry["maxBatchDelay"] == 3
        assert (entry["minWorkers"], entry["maxWorkers"]) == (2, 2)
        # Applied: two worker processes, both READY ...
        workers = entry["workers"]
        assert [w["status"] for w in workers] == ["READY", "READY"]
        assert len({w["pid"] for w in workers}) == 2

        # ... and no batch the handler got is larger than the batch size.
        before = batches_by_size(instance)
        url = instance.predictions_url()
        images = serving_model.images
        with httpx.Client(headers=instance.inference_headers, timeout=30) as client:

            def one(i: int) -> int:
                response = client.post(url, content=images[i % len(images)])
                assert response.status_code == 200, response.text
                return int(response.json()["predictions"][0]["class_id"])

            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(one, range(48)))
        assert answers == [serving_model.expected_top1[i % len(images)] for i in range(48)]
        grown = {size: n - before.get(size, 0.0) for size, n in batches_by_size(instance).items()}
        used = [size for size, n in grown.items() if n > 0]
        assert used and max(used) <= 16, grown

        # `status` says what each version was registered with, and that nothing overrode it.
        report = status(settings)
        assert report["ready"], report
        registered = report["registration"][str(instance.version)]
        assert (registered["batch_size"], registered["workers"]) == (16, 2)
        assert registered["overrides"] == {}
    finally:
        down(settings)
    assert not processes_naming(settings.run_path), "TorchServe processes left behind"


# --- predictor ------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_engine_overrides")
def test_predictor_reports_and_applies_the_serving_config(
    serving_model: PublishedModel, tmp_path: Path
) -> None:
    server = start_predictor(serving_model.repo, tmp_path / "predictor.log", poll_interval_s=0)
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
        assert ready["serving"] == SERVING.model_dump(mode="json")
        assert ready["serving_overrides"] == {}
        assert "max batch 16, delay 3ms, 2 instance(s)" in server.log()

        # Applied: a request over max_images_per_request is refused, one at it is served ...
        texts = [base64.b64encode(image).decode() for image in serving_model.images]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            over = client.post("/predict", json={"images": (texts * 2)[:17]})
            assert over.status_code == 413, over.text
            assert over.json()["code"] == "too_many_images"
            at = client.post("/predict", json={"images": texts[:16]})
            assert at.status_code == 200, at.text
            top1 = [row[0]["class_id"] for row in at.json()["predictions"]]
            assert top1 == serving_model.expected_top1[:16]

            # ... and concurrent single images are merged into batches no larger than it.
            def one(i: int) -> int:
                response = client.post("/predict", json={"image": texts[i % len(texts)]})
                assert response.status_code == 200, response.text
                return int(response.json()["predictions"][0]["class_id"])

            with ThreadPoolExecutor(max_workers=24) as pool:
                answers = list(pool.map(one, range(96)))
            samples = metric_samples(client.get("/metrics").text)
        assert answers == [serving_model.expected_top1[i % len(texts)] for i in range(96)]
        batches = sample_sum(samples, "predictor_batch_size_count")
        at_most_16 = sample_sum(samples, "predictor_batch_size_bucket", le="16.0")
        assert batches > 0 and at_most_16 == batches
    finally:
        server.stop()
