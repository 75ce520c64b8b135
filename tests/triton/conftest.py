"""A real tritonserver (the nvidia-pytriton wheel's binary) serving the session's published model.

Started once per module on free ports from a temporary run folder, waited on through Triton's
own readiness endpoints, and stopped (whole process group) at teardown, which also checks that
no tritonserver or python stub from that run folder is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.triton.launcher import LocalTriton
from services.triton.settings import TritonSettings
from tests.conftest import PublishedModel
from tests.processes import free_ports, processes_naming


def triton_settings(published_model: PublishedModel, run_dir: Path) -> TritonSettings:
    http, grpc, metrics = free_ports(3)
    return TritonSettings(
        repository=published_model.repo,
        model=published_model.model,
        run_dir=run_dir,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )


@dataclass
class RunningTriton:
    settings: TritonSettings
    launcher: LocalTriton
    startup_s: float

    @property
    def http_url(self) -> str:
        return self.settings.http_url

    @property
    def http_base(self) -> str:
        return f"http://{self.settings.http_url}"

    @property
    def grpc_url(self) -> str:
        return self.settings.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.settings.metrics_url


@pytest.fixture(scope="module")
def triton(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningTriton]:
    run_dir = tmp_path_factory.mktemp("triton-run")
    settings = triton_settings(published_model, run_dir)
    launcher = LocalTriton(settings)
    launcher.start()
    try:
        startup_s = launcher.wait_ready()
        yield RunningTriton(settings, launcher, startup_s)
    finally:
        launcher.stop()
    left = processes_naming(run_dir)
    assert not left, f"processes left after stopping tritonserver: {left}"
