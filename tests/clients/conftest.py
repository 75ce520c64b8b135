"""The two engines every client test runs against, and the clients' own tooling.

``engine`` is parametrised: the real local tritonserver (the project's Triton launcher) and the
real predictor (``python -m services.predictor``), each started once per module on free ports
with the session's published model and stopped at teardown, leaving no process behind. The
same test code then talks to both through the field's own clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from loadtests import perf_analyzer
from services.common.imaging import decode_and_preprocess
from services.triton.launcher import LocalTriton
from tests.clients import kserve_venv
from tests.conftest import PublishedModel
from tests.predictor.conftest import start_predictor
from tests.processes import free_ports, processes_naming
from tests.triton.conftest import triton_settings

#: The engines every client test runs against.
ENGINES = ["triton", "predictor"]


@dataclass(frozen=True)
class Engine:
    """A running engine's v2 endpoints: ``host:port`` for REST and for gRPC."""

    name: str
    http: str
    grpc: str
    repository_headers: dict[str, str] = field(default_factory=dict)
    """What the repository API needs: the local Triton opens it only to a per-start key."""

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"


@pytest.fixture(scope="module", params=ENGINES)
def engine(
    request: pytest.FixtureRequest,
    published_model: PublishedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engine]:
    name: str = request.param
    if name == "triton":
        run_dir = tmp_path_factory.mktemp("clients-triton")
        settings = triton_settings(published_model, run_dir)
        launcher = LocalTriton(settings)
        launcher.start()
        try:
            launcher.wait_ready()
            yield Engine(name, settings.http_url, settings.grpc_url, launcher.admin_headers())
        finally:
            launcher.stop()
        left = processes_naming(run_dir)
        assert not left, f"processes left after stopping tritonserver: {left}"
        return
    http_port, grpc_port = free_ports(2)
    log = tmp_path_factory.mktemp("clients-predictor") / "predictor.log"
    server = start_predictor(
        published_model.repo,
        log,
        port=http_port,
        engine="torchscript",
        poll_interval_s=0,
        grpc_port=grpc_port,
    )
    try:
        yield Engine(name, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        server.stop()
    assert not server.alive


@pytest.fixture(scope="session")
def fp32_images(published_model: PublishedModel) -> np.ndarray:
    """The held-out digits decoded and normalised by the shared imaging code: [N, 3, 32, 32]."""
    spec = published_model.manifest.input_spec
    return np.stack([decode_and_preprocess(data, spec) for data in published_model.images])


@pytest.fixture(scope="session")
def perf_analyzer_tool() -> perf_analyzer.PerfAnalyzer:
    """perf_analyzer, set up in the checkout's .cache the first time (see loadtests)."""
    return perf_analyzer.install()


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """The KServe SDK's own interpreter (its pins conflict with ours)."""
    return kserve_venv.kserve_python()
