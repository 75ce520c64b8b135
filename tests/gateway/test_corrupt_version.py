"""A newest version whose bytes went bad after publishing is no outage: every engine starts on
the version before it and says which version it refused, and so does the gateway.

The three real engines start (predictor process, TorchServe's launcher, Triton's launcher) on a
repository whose newest version has one flipped byte in ``model.pt`` (``corrupt_newest``), the
way they start after any restart of the stack; a real gateway routes to them. A killed
predictor is started again on the same repository, as supervisord would, while a client keeps
sending requests through the gateway: none of them fails.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.torchserve.config import REFUSED_FILE_NAME
from services.torchserve.launcher import Instance, down, status, up
from tests.conftest import CorruptNewest
from tests.gateway.conftest import (
    HEALTH_INTERVAL_S,
    GatewayProcess,
    RestartablePredictor,
    _start_triton,
)
from tests.metrics import metric_samples, sample_sum
from tests.processes import processes_naming, wait_for
from tests.torchserve.conftest import torchserve_settings
from tests.triton.conftest import RunningTriton

pytestmark = pytest.mark.slow

BACKENDS = ("predictor", "torchserve", "triton")


@dataclass
class EnginesOnCorrupt:
    corrupt: CorruptNewest
    predictor: RestartablePredictor
    torchserve: Instance
    triton: RunningTriton
    gateway: GatewayProcess


@pytest.fixture(scope="module")
def stack(
    corrupt_newest: CorruptNewest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnginesOnCorrupt]:
    base = tmp_path_factory.mktemp("corrupt-engines")
    published = corrupt_newest.published
    predictor = RestartablePredictor(corrupt_newest.repo, base)
    ts_settings = torchserve_settings(corrupt_newest.repo, published.model, base / "ts")
    triton_run = base / "triton"
    triton_run.mkdir()
    triton_started: Future[RunningTriton] | None = None
    gateway: GatewayProcess | None = None
    try:
        with ThreadPoolExecutor(3) as pool:
            predictor_started = pool.submit(predictor.start)
            torchserve_started = pool.submit(up, ts_settings)
            triton_started = pool.submit(_start_triton, published, triton_run)
        predictor_started.result()
        torchserve, triton = torchserve_started.result(), triton_started.result()
        ts = torchserve.settings
        env = {
            "GATEWAY_MODEL": published.model,
            "GATEWAY_PREDICTOR_URL": predictor.url,
            "GATEWAY_TORCHSERVE_URL": ts.inference_url,
            "GATEWAY_TORCHSERVE_MANAGEMENT_URL": ts.management_url,
            "GATEWAY_TORCHSERVE_KEY_FILE": str(ts.key_file),
            "GATEWAY_TRITON_URL": triton.http_base,
            "GATEWAY_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
            "GATEWAY_LOG_LEVEL": "info",
        }
        gateway = GatewayProcess(env, base / "gateway.log")
        gateway.wait_all_ready()
        yield EnginesOnCorrupt(corrupt_newest, predictor, torchserve, triton, gateway)
    finally:
        with contextlib.ExitStack() as stops:
            if gateway is not None:
                stops.callback(gateway.stop)
            stops.callback(predictor.stop)
            stops.callback(down, ts_settings)
            if triton_started is not None and triton_started.exception() is None:
                stops.callback(triton_started.result().launcher.stop)
    left = processes_naming(ts_settings.run_path) + processes_naming(triton_run)
    assert not left, f"engine processes survived teardown: {left}"


def _assert_refused_bad(refused: Any, bad: int) -> None:
    """One refusal, of ``bad``, naming the artifact relative to the repository (no path of the
    server's file system: the reason is shown in /readyz)."""
    assert isinstance(refused, list) and len(refused) == 1, refused
    assert refused[0]["version"] == bad
    reason = refused[0]["reason"]
    assert reason.startswith(f"classifier_torchscript/{bad}/model.pt: sha256 mismatch"), reason


def predict(gateway: GatewayProcess, image: bytes, backend: str) -> httpx.Response:
    body = {"image": base64.b64encode(image).decode()}
    return httpx.post(f"{gateway.url}/predict", params={"backend": backend}, json=body, timeout=30)


def test_every_engine_serves_the_previous_version_and_names_the_refused_one(
    stack: EnginesOnCorrupt, tmp_path_factory: pytest.TempPathFactory
) -> None:
    good, bad = stack.corrupt.good, stack.corrupt.bad
    answer = httpx.get(stack.gateway.url + "/readyz", timeout=5)
    # No path of the servers' file system (the repository, the run folders, the key file).
    assert str(tmp_path_factory.getbasetemp()) not in answer.text, answer.text
    assert '"/' not in answer.text, answer.text
    readyz = answer.json()
    assert readyz["ready"] is True
    for backend in BACKENDS:
        entry = readyz["backends"][backend]
        assert entry["ready"] is True, (backend, entry)
        _assert_refused_bad(entry["refused_versions"], bad)

    predictor = httpx.get(stack.predictor.url + "/readyz", timeout=5).json()
    assert predictor["version"] == good
    _assert_refused_bad(predictor["refused_versions"], bad)
    metrics = metric_samples(httpx.get(stack.predictor.url + "/metrics", timeout=5).text)
    assert sample_sum(metrics, "predictor_refused_versions") == 1

    assert stack.torchserve.version == good
    report = status(stack.torchserve.settings)
    assert report["default_version"] == good and report["ready"] is True
    _assert_refused_bad(report["refused_versions"], bad)
    assert (stack.torchserve.settings.run_path / REFUSED_FILE_NAME).is_file()

    served = httpx.get(f"{stack.triton.http_base}/v2/models/classifier", timeout=5).json()
    assert served["versions"] == [str(good)]


def test_every_backend_answers_from_the_previous_version_without_an_error(
    stack: EnginesOnCorrupt,
) -> None:
    published = stack.corrupt.published
    images = published.images[:8]
    for backend in BACKENDS:
        for image, expected in zip(images, published.expected_top1, strict=False):
            response = predict(stack.gateway, image, backend)
            assert response.status_code == 200, (backend, response.text)
            body = response.json()
            assert body["backend"] == backend
            assert body["version"] == str(stack.corrupt.good), (backend, body)
            assert body["predictions"][0]["class_id"] == expected, backend


def test_a_killed_predictor_starts_again_on_the_previous_version_with_zero_client_errors(
    stack: EnginesOnCorrupt, tmp_path: Path
) -> None:
    """kill -9, then the start supervisord would make: it walks past the bad version again."""
    published = stack.corrupt.published
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal answered
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                image = published.images[answered % len(published.images)]
                body = {"image": base64.b64encode(image).decode()}
                try:
                    response = client.post(f"{stack.gateway.url}/predict", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                answered += 1

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_for(lambda: answered >= 5, 60, "first answers")
        stack.predictor.kill()
        wait_for(lambda: not stack.predictor.alive, 30, "the predictor to die")
        before_restart = answered
        stack.predictor.start()
        wait_for(lambda: answered >= before_restart + 5, 60, "answers after the restart")
    finally:
        stop.set()
        sender.join(timeout=60)
    assert not sender.is_alive()
    assert failures == [], failures[:5]
    readyz = httpx.get(stack.predictor.url + "/readyz", timeout=5).json()
    assert readyz["version"] == stack.corrupt.good
    _assert_refused_bad(readyz["refused_versions"], stack.corrupt.bad)
