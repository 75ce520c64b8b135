"""Real predictor processes for the integration tests.

Each server is ``python -m services.predictor`` in its own process group on a free port of
127.0.0.1, configured only through ``PREDICTOR_*`` variables (the way a user runs it), and
waited on through ``/readyz`` — never a fixed sleep. Teardown kills the whole group.

This file imports only the standard library and pytest, so ``test_gpu.py`` can be collected on a
GPU machine that has torch and onnxruntime but not the web stack.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class PredictorProcess:
    """One ``python -m services.predictor`` with its log file and base URL."""

    def __init__(self, repo: Path, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTOR_")}
        env.update(
            PREDICTOR_HOST="127.0.0.1",
            PREDICTOR_PORT=str(self.port),
            PREDICTOR_REPOSITORY=str(repo),
            PREDICTOR_LOG_LEVEL="info",
        )
        env.update({f"PREDICTOR_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.predictor"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"predictor exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                status, _ = get_json(self.url + "/readyz", timeout=2.0)
                if status == 200:
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass  # not listening yet (or something else answers: our process exits soon)
            time.sleep(0.1)
        raise RuntimeError(f"predictor not ready after {timeout}s:\n{self.log()[-3000:]}")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # group already gone
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # group already gone
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self._log.close()


def start_predictor(repo: Path, log_path: Path, **settings: object) -> PredictorProcess:
    server = PredictorProcess(repo, log_path, **settings)
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


@pytest.fixture
def repo_copy(published_model: Any, tmp_path: Path) -> Path:
    """A private copy of the published repository, for tests that publish or corrupt versions."""
    target = tmp_path / "model_repository"
    shutil.copytree(published_model.repo, target)
    return target
