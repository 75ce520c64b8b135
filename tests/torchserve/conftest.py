"""A real TorchServe serving the session's published model, on free loopback ports.

The instance gets its own copy of the repository (tests here publish into theirs), its own
run folder (TMPDIR, logs, model store, key file) and is started with the launcher the Makefile
uses, which waits until the management API reports the model's worker READY. Teardown stops
the process group and checks /proc: no wrapper, JVM or worker of that run folder may remain.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from services.torchserve.config import TorchServeSettings
from services.torchserve.launcher import Instance, down, up
from tests.conftest import PublishedModel
from tests.processes import free_ports, processes_naming


def torchserve_settings(
    repo: Path, model: str, run_dir: Path, **overrides: Any
) -> TorchServeSettings:
    """Settings for a test instance, blind to any TORCHSERVE_* variable of the developer."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHSERVE_")}
    with mock.patch.dict(os.environ, clean_env, clear=True):
        return TorchServeSettings(
            repository=repo,
            model=model,
            run_dir=run_dir,
            inference_port=inference,
            management_port=management,
            metrics_port=metrics,
            grpc_inference_port=grpc_inference,
            grpc_management_port=grpc_management,
            start_timeout_s=120,
            **overrides,
        )


@pytest.fixture(scope="session")
def torchserve(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Instance]:
    base = tmp_path_factory.mktemp("torchserve")
    settings = torchserve_settings(
        published_model.copy_repository(base), published_model.model, base / "run"
    )
    instance = up(settings)
    try:
        yield instance
    finally:
        down(settings)
        left = processes_naming(settings.run_path)
        assert not left, f"TorchServe processes survived teardown: {left}"
