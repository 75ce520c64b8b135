"""Starting the real process with something wrong stops it with a clear reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PublishedModel
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow


def test_no_model_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    server = PredictorProcess(tmp_path / "empty_repo", tmp_path / "predictor.log")
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()
    log = server.log()
    assert "predictor cannot start: no published version of 'classifier'" in log
    assert "Application startup failed" in log


def test_corrupted_only_version_stops_the_service(repo_copy: Path, tmp_path: Path) -> None:
    """No fallback to serving unverified bytes: a bad newest version at start-up is fatal."""
    model_file = next((repo_copy / "classifier_torchscript").glob("*/model.pt"))
    model_file.write_bytes(model_file.read_bytes()[:-10])
    server = PredictorProcess(repo_copy, tmp_path / "predictor.log")
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()
    assert "sha256 mismatch" in server.log()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_batch_size": "0"}, "max_batch_size"),
        ({"engine": "tensorrt"}, "engine"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        (
            {"queue_size": "4", "max_batch_size": "8"},
            "queue_size (4) must be at least max_batch_size",
        ),
    ],
)
def test_bad_settings_stop_the_service_naming_the_setting(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    server = PredictorProcess(tmp_path, tmp_path / "predictor.log", **settings)
    try:
        assert server.wait_exit() == 2
    finally:
        server.stop()
    assert "invalid settings" in server.log()
    assert named in server.log()


def test_a_serving_config_the_queue_cannot_hold_stops_the_service(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """The model asks for batches of 32 (its serving config); a queue of 4 could never hold one."""
    assert published_model.manifest.serving.max_batch_size > 4
    server = PredictorProcess(published_model.repo, tmp_path / "predictor.log", queue_size="4")
    try:
        assert server.wait_exit() != 0
    finally:
        server.stop()
    assert "more than PREDICTOR_QUEUE_SIZE (4) can hold" in server.log()
