"""A real tritonserver (the nvidia-pytriton wheel's binary) serving the session's published model.

Started once per module on free ports from a temporary run folder, waited on through Triton's
own readiness endpoints, and stopped (whole process group) at teardown, which also checks that
no tritonserver or python stub from that run folder is left.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.triton.launcher import LocalTriton
from services.triton.settings import TritonSettings
from tests.conftest import PublishedModel


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now, held together so they differ from each other."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def processes_using(folder: Path) -> list[str]:
    """Live processes whose command line names ``folder`` (tritonserver and its stubs do)."""
    found = []
    needle = str(folder).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:  # a zombie has an empty command line and does not count
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {text}")
    return found


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
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"


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
    left = processes_using(run_dir)
    assert not left, f"processes left after stopping tritonserver: {left}"
