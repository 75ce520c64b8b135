"""The CLI a person (and the Makefile) uses: up, status, reload to a new version, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from services.torchserve.config import TorchServeSettings, read_keys
from tests.conftest import PublishedModel
from tests.processes import processes_naming
from tests.torchserve.conftest import torchserve_settings
from training.publish import publish_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def cli(
    settings: TorchServeSettings, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHSERVE_")}
    env.update(
        {
            "TORCHSERVE_REPOSITORY": str(settings.repository),
            "TORCHSERVE_MODEL": settings.model,
            "TORCHSERVE_RUN_DIR": str(settings.run_dir),
            "TORCHSERVE_INFERENCE_PORT": str(settings.inference_port),
            "TORCHSERVE_MANAGEMENT_PORT": str(settings.management_port),
            "TORCHSERVE_METRICS_PORT": str(settings.metrics_port),
            "TORCHSERVE_GRPC_INFERENCE_PORT": str(settings.grpc_inference_port),
            "TORCHSERVE_GRPC_MANAGEMENT_PORT": str(settings.grpc_management_port),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "services.torchserve", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reload_under_traffic(
    settings: TorchServeSettings, url: str, token: str, image: bytes
) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, str, int]]]:
    """Run `reload` while a client keeps sending requests; return its result and the answers
    as (status, version, top-1 class); a request without an answer is (0, error, -1)."""
    answers: list[tuple[int, str, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            while not stop.is_set():
                try:
                    response = client.post(url, content=image, timeout=30)
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    answers.append((0, repr(exc), -1))
                    continue
                top1 = body.get("predictions", [{}])[0].get("class_id", -1)
                answers.append((response.status_code, body.get("version", ""), top1))

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        result = cli(settings, "reload")
    finally:
        stop.set()
        sender.join(timeout=60)
    assert not sender.is_alive()
    return result, answers


def served(settings: TorchServeSettings) -> tuple[int, dict[str, list[str]]]:
    report = json.loads(cli(settings, "status").stdout)
    return report["default_version"], {v["version"]: v["workers"] for v in report["versions"]}


def test_up_reload_down_serves_new_versions_without_dropping_requests(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    repo = published_model.copy_repository(tmp_path)
    settings = torchserve_settings(repo, published_model.model, tmp_path / "run")
    first = published_model.version
    try:
        started = cli(settings, "up")
        assert started.returncode == 0, started.stderr
        state = cli(settings, "status")
        assert state.returncode == 0, state.stderr
        assert json.loads(state.stdout)["running"] and json.loads(state.stdout)["ready"]
        assert served(settings) == (first, {str(first): ["READY"]})

        token = read_keys(settings.key_file).inference
        url = f"{settings.inference_url}/predictions/{settings.model}"
        image, expected = published_model.images[0], published_model.expected_top1[0]
        for step in (1, 2):
            new = publish_checkpoint(published_model.checkpoint, repo, published_model.model)
            assert new == first + step
            result, answers = reload_under_traffic(settings, url, token, image)
            assert result.returncode == 0, result.stderr
            assert answers, "no request was sent during the reload"
            failed = [a for a in answers if a[0] != 200 or a[2] != expected]
            assert not failed, failed
            assert {version for _, version, _ in answers} <= {str(new - 1), str(new)}
            response = httpx.post(url, content=image, headers={"Authorization": f"Bearer {token}"})
            assert response.json()["version"] == str(new)
            # The replaced version stays registered (TorchServe would drop its queued
            # requests); the one replaced before it is unregistered.
            assert served(settings) == (new, {str(new): ["READY"], str(new - 1): ["READY"]})
    finally:
        stopped = cli(settings, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert processes_naming(settings.run_path) == []
    assert cli(settings, "status").returncode == 3  # not running
    assert not settings.key_file.exists()


def test_up_refuses_a_damaged_version_in_one_line(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    repo = published_model.copy_repository(tmp_path)
    model_pt = repo / published_model.manifest.artifacts["torchscript"].path
    damaged = bytearray(model_pt.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one bit pattern off: a sha256 mismatch
    model_pt.write_bytes(bytes(damaged))
    settings = torchserve_settings(repo, published_model.model, tmp_path / "run")
    try:
        result = cli(settings, "up", timeout=60)
    finally:
        cli(settings, "down")  # in case it did start
    assert result.returncode == 1, result.stderr
    assert "sha256 mismatch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not processes_naming(settings.run_path)
