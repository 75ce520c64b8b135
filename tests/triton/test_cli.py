"""``python -m services.triton up|status|down`` as a person runs it: real processes, then none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.triton.launcher import LocalTriton
from tests.conftest import PublishedModel
from tests.processes import free_ports, processes_naming
from tests.triton.conftest import triton_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.triton", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_up_status_down_leaves_no_process(published_model: PublishedModel, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "TRITON_REPOSITORY": str(published_model.repo),
        "TRITON_RUN_DIR": str(run_dir),
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
        "TRITON_TORCHSCRIPT_TWIN": "false",
    }
    try:
        up = cli("up", env)
        assert up.returncode == 0, up.stderr
        assert "ready" in up.stdout
        # The server outlives the `up` command, serves on the configured ports, only locally.
        assert httpx.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).status_code == 200
        listening = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{http:04X}" in listening  # 127.0.0.1, not 0.0.0.0
        assert f"00000000:{http:04X}" not in listening
        status = cli("status", env)
        assert status.returncode == 0 and "ready=True" in status.stdout
        again = cli("up", env)
        assert again.returncode == 0 and "already running" in again.stdout
        assert processes_naming(run_dir)  # the server and its python stubs
    finally:
        down = cli("down", env)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert processes_naming(run_dir) == []
    assert cli("status", env).returncode == 3
    assert cli("down", env).stdout.strip() == "tritonserver was not running"


def test_up_fails_clearly_without_a_published_model(tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    env = {
        **os.environ,
        "TRITON_REPOSITORY": str(tmp_path / "empty"),
        "TRITON_RUN_DIR": str(tmp_path / "run"),
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
    }
    result = cli("up", env)
    assert result.returncode == 1
    assert "no published version" in result.stderr
    assert "Traceback" not in result.stderr
    assert processes_naming(tmp_path) == []


def test_stubs_a_crashed_server_left_are_killed_and_nothing_else(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """Under load, a tritonserver killed outright can leave busy python stubs behind in its
    process group (seen with the stack: `kill -9` of the server, two of three stubs lived on
    until `make down`). `down` and the next start kill what is left of that group, and only
    processes naming the run folder."""
    settings = triton_settings(published_model, tmp_path / "run")
    launcher = LocalTriton(settings)
    launcher.run_dir.mkdir(parents=True)
    stub_like = [
        sys.executable,
        "-c",
        "import time; time.sleep(300)",
        str(launcher.repository / "classifier" / "1" / "model.py"),
    ]
    # The orphan: in the dead server's group (here it leads it), naming the run folder.
    orphan = subprocess.Popen(stub_like, start_new_session=True)
    # A bystander naming the run folder from another group, and one in no way related.
    bystander = subprocess.Popen(stub_like, start_new_session=True)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        launcher.pid_path.write_text(f"{orphan.pid}\n")  # what the crashed server left
        assert launcher.stop() is False  # no tritonserver was running
        assert orphan.wait(timeout=15) == -signal.SIGKILL
        assert bystander.poll() is None and unrelated.poll() is None
    finally:
        for process in (orphan, bystander, unrelated):
            process.kill()
            process.wait()
