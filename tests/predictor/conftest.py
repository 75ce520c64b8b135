"""Real predictor processes for the integration tests.

Each server is ``python -m services.predictor`` in its own process group on a free port of
127.0.0.1, configured only through ``PREDICTOR_*`` variables (the way a user runs it), and
waited on through ``/readyz`` — never a fixed sleep. Teardown kills the whole group.

This file imports only the standard library and pytest, so ``test_gpu.py`` can be collected on a
GPU machine that has torch and onnxruntime but not the web stack.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class PredictorProcess(ServiceProcess):
    """One ``python -m services.predictor``; ``settings`` are its fields (``engine="onnx"``).
    Its gRPC endpoint gets a free port of its own too (``grpc_port=0`` turns it off)."""

    def __init__(
        self, repo: Path, log_path: Path, *, port: int | None = None, **settings: object
    ) -> None:
        settings.setdefault("grpc_port", free_port())
        self.grpc_port = int(str(settings["grpc_port"]))
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        env = {
            "PREDICTOR_REPOSITORY": str(repo),
            "PREDICTOR_LOG_LEVEL": "info",
            **{f"PREDICTOR_{k.upper()}": str(v) for k, v in settings.items()},
        }
        super().__init__("predictor", env, log_path, port)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.raise_if_exited()
            try:
                status, _ = get_json(self.url + "/readyz", timeout=2.0)
                if status == 200:
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass  # not listening yet (or something else answers: our process exits soon)
            time.sleep(0.1)
        raise RuntimeError(f"predictor not ready after {timeout}s:\n{self.log()[-3000:]}")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        return super().wait_exit(timeout)


def start_predictor(
    repo: Path, log_path: Path, *, port: int | None = None, **settings: object
) -> PredictorProcess:
    """A :class:`PredictorProcess` that is ready (stopped again if it never gets there)."""
    server = PredictorProcess(repo, log_path, port=port, **settings)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def predictor(published_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """TorchScript engine on the shared published repository; hot reload off (nobody publishes
    into that repository: tests that publish use their own copy)."""
    log = tmp_path_factory.mktemp("predictor-logs") / "torchscript.log"
    server = start_predictor(published_model.repo, log, engine="torchscript", poll_interval_s=0)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def onnx_predictor(published_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("predictor-logs") / "onnx.log"
    server = start_predictor(published_model.repo, log, engine="onnx", poll_interval_s=0)
    yield server
    server.stop()
