"""All three real engines and a real gateway, started once per session.

The engines are started with the launchers and helpers their own test suites use (the
predictor's ``PredictorProcess``, TorchServe's ``up``/``down``, Triton's ``LocalTriton``), in
parallel because each spends most of its start waiting. The predictor runs on a port chosen
here so that a test can kill it and start it again where the gateway expects it. The gateway
is ``python -m services.gateway`` (uvicorn) on a free port, configured only through
``GATEWAY_*`` variables, and waited on through ``/readyz`` until it sees every engine ready.
Teardown kills every process group; the engine helpers check that none is left.

``gateway_app`` builds an in-process gateway (lifespan on, ASGI transport) with settings of a
test's choosing, for the logic tests that need other settings than the shared process.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from services.gateway.app import GatewayState, create_app
from services.gateway.settings import GatewaySettings
from services.torchserve.launcher import Instance, down, up
from services.triton.launcher import LocalTriton
from tests.conftest import PublishedModel
from tests.metrics import metric_samples, sample_sum
from tests.predictor.conftest import PredictorProcess, get_json, start_predictor
from tests.processes import ServiceProcess, free_port, processes_naming, wait_for
from tests.torchserve.conftest import torchserve_settings
from tests.triton.conftest import RunningTriton, triton_settings

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
#: The shared gateway's readiness poll: short, so tests see an engine's death or return soon.
HEALTH_INTERVAL_S = 0.2


class RestartablePredictor:
    """The predictor on a fixed port: killed like a crash and started again on the same port."""

    def __init__(self, repo: Path, log_dir: Path) -> None:
        self.repo = repo
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.server: PredictorProcess | None = None

    def start(self) -> None:
        self.starts += 1
        self.server = start_predictor(
            self.repo,
            self.log_dir / f"predictor-{self.starts}.log",
            port=self.port,
            poll_interval_s=0,
        )

    def kill(self) -> None:
        """Crash it (see :meth:`ServiceProcess.kill`)."""
        assert self.server is not None
        self.server.kill()

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.alive

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def isolated_settings(**values: Any) -> GatewaySettings:
    """Gateway settings from ``values`` only, blind to any GATEWAY_* of the developer."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        return GatewaySettings(**values)


@dataclass
class Engines:
    predictor: RestartablePredictor
    torchserve: Instance
    triton: RunningTriton

    def gateway_env(self) -> dict[str, str]:
        ts = self.torchserve.settings
        return {
            "GATEWAY_MODEL": self.torchserve.settings.model,
            "GATEWAY_PREDICTOR_URL": self.predictor.url,
            "GATEWAY_TORCHSERVE_URL": ts.inference_url,
            "GATEWAY_TORCHSERVE_MANAGEMENT_URL": ts.management_url,
            "GATEWAY_TORCHSERVE_KEY_FILE": str(ts.key_file),
            "GATEWAY_TRITON_URL": self.triton.http_base,
        }

    def settings(self, **overrides: Any) -> GatewaySettings:
        """Gateway settings pointing at these engines, blind to the developer's GATEWAY_*."""
        values: dict[str, Any] = {
            key.removeprefix("GATEWAY_").lower(): value for key, value in self.gateway_env().items()
        }
        values.update(health_interval_s=HEALTH_INTERVAL_S)
        values.update(overrides)
        return isolated_settings(**values)

    def request_counts(self) -> dict[str, float]:
        """Inference requests each engine has seen, from the engines' own /metrics."""
        predictor = metric_samples(httpx.get(self.predictor.url + "/metrics", timeout=5).text)
        ts_metrics = self.torchserve.settings.metrics_url + "/metrics"
        torchserve = metric_samples(httpx.get(ts_metrics, timeout=5).text)
        triton = metric_samples(httpx.get(self.triton.metrics_url, timeout=5).text)
        ensemble = f"{self.torchserve.settings.model}_ensemble"
        return {
            "predictor": sample_sum(
                predictor,
                "predictor_http_request_duration_seconds_count",
                route="/v2/models/{model_name}/infer",
            ),
            "torchserve": sample_sum(torchserve, "ts_inference_requests_total")
            + sample_sum(torchserve, "Requests4XX")
            + sample_sum(torchserve, "Requests5XX"),
            "triton": sample_sum(triton, "nv_inference_request_success", model=ensemble)
            + sample_sum(triton, "nv_inference_request_failure", model=ensemble),
        }


def _start_triton(published_model: PublishedModel, run_dir: Path) -> RunningTriton:
    settings = triton_settings(published_model, run_dir)
    launcher = LocalTriton(settings)
    launcher.start()
    try:
        return RunningTriton(settings, launcher, launcher.wait_ready())
    except BaseException:
        launcher.stop()
        raise


@pytest.fixture(scope="session")
def engines(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engines]:
    base = tmp_path_factory.mktemp("gateway-engines")
    predictor = RestartablePredictor(published_model.repo, base)
    ts_settings = torchserve_settings(published_model.repo, published_model.model, base / "ts")
    triton_run = base / "triton"
    triton_run.mkdir()
    triton_started: Future[RunningTriton] | None = None
    try:
        # Inside the try: a timeout while they start (the executor waits for all three on the
        # way out) still reaches the stops below.
        with ThreadPoolExecutor(3) as pool:
            predictor_started = pool.submit(predictor.start)
            torchserve_started = pool.submit(up, ts_settings)
            triton_started = pool.submit(_start_triton, published_model, triton_run)
        predictor_started.result()
        yield Engines(predictor, torchserve_started.result(), triton_started.result())
    finally:
        # Stop whatever did start, even when another engine failed to start or to stop.
        with contextlib.ExitStack() as stops:
            stops.callback(predictor.stop)
            stops.callback(down, ts_settings)
            if triton_started is not None and triton_started.exception() is None:
                stops.callback(triton_started.result().launcher.stop)
    left = processes_naming(ts_settings.run_path) + processes_naming(triton_run)
    assert not left, f"engine processes survived teardown: {left}"


class GatewayProcess(ServiceProcess):
    """``python -m services.gateway``; ``env_settings`` are whole ``GATEWAY_*`` names."""

    def __init__(self, env_settings: dict[str, str], log_path: Path) -> None:
        super().__init__("gateway", env_settings, log_path)

    def readiness(self) -> dict[str, Any] | None:
        try:
            _, body = get_json(self.url + "/readyz", timeout=2.0)
        except (OSError, ValueError, http.client.HTTPException):
            return None  # not listening yet
        return body if isinstance(body, dict) else None

    def wait_all_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        def all_ready() -> bool:
            self.raise_if_exited()
            body = self.readiness()
            return body is not None and all(b["ready"] for b in body["backends"].values())

        wait_for(all_ready, timeout, "the gateway to see every engine ready")


@pytest.fixture(scope="session")
def gateway(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("gateway-logs") / "gateway.log"
    env = engines.gateway_env() | {
        "GATEWAY_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
        "GATEWAY_LOG_LEVEL": "info",
    }
    server = GatewayProcess(env, log)
    try:
        server.wait_all_ready()
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def gateway_app(
    settings: GatewaySettings,
) -> AsyncIterator[tuple[httpx.AsyncClient, GatewayState]]:
    """An in-process gateway with its lifespan running: a client talking ASGI to it, and the
    state its lifespan built (engine guards, router)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app.state.gateway


@dataclass
class StallingServer:
    """The one fake that fails on purpose: a "predictor" that is ready but never answers
    ``/predict`` until released (at teardown)."""

    release: threading.Event = field(default_factory=threading.Event)
    #: While set, ``/readyz`` answers only after ``probe_delay_s`` (an engine busy loading).
    slow_probes: threading.Event = field(default_factory=threading.Event)
    probe_delay_s: float = 1.0
    predict_calls: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StallingServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if fake.slow_probes.is_set():
                    fake.release.wait(timeout=fake.probe_delay_s)
                body = b'{"ready":true,"model":"classifier","version":1,"engine":"stall"}'
                self._answer(200 if self.path == "/readyz" else 404, body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                fake.predict_calls += 1
                fake.release.wait(timeout=120)
                with contextlib.suppress(OSError):  # the gateway gave up long ago
                    self._answer(503, b'{"error":"released","code":"released"}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling_server() -> Iterator[StallingServer]:
    with StallingServer() as server:
        yield server
