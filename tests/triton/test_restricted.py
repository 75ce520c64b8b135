"""The local tritonserver's restricted APIs and its shared-memory regions, against the real
server: registering shared memory or reading the log settings is refused over HTTP and gRPC
while inference is not, and the regions a killed server left in /dev/shm are gone after the
next start and after the next stop."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.common.processes import stop_group
from services.triton.launcher import (
    ADMIN_KEY_FILE,
    RESTRICTED_API_HEADER,
    RESTRICTED_APIS,
    LocalTriton,
)
from tests.conftest import PublishedModel
from tests.processes import processes_naming
from tests.triton.conftest import triton_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_restricts_the_same_apis(tmp_path: Path) -> None:
    """The Triton image's command (docker/triton_serve.py, run here with a stand-in
    tritonserver that prints its arguments) restricts what the local launcher restricts, with
    a fresh key on each start."""
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "docker" / "triton_serve.py"

    def arguments() -> list[str]:
        run = subprocess.run(
            [sys.executable, str(script), "--http-port=8200"],
            env=env, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return run.stdout.splitlines()

    first, second = arguments(), arguments()
    assert first[0] == "--http-port=8200"
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in first[1:])
    assert set(flags) == {"http-restricted-api", "grpc-restricted-protocol"}
    apis, key = flags["http-restricted-api"].split(":", 1)
    assert tuple(apis.split(",")) == RESTRICTED_APIS
    assert (
        key.startswith(f"{RESTRICTED_API_HEADER}=") and len(key) > len(RESTRICTED_API_HEADER) + 16
    )
    assert flags["grpc-restricted-protocol"] == flags["http-restricted-api"]
    assert second[1] != first[1]  # drawn for each start


def _kill(launcher: LocalTriton) -> None:
    """SIGKILL the whole group, as a crash or the OOM killer would: no cleanup runs."""
    assert launcher.process is not None
    stop_group(launcher.process.pid, timeout_s=30, first_signal=signal.SIGKILL)
    launcher.process.wait(timeout=30)


def _assert_restricted(launcher: LocalTriton) -> None:
    base = f"http://{launcher.settings.http_url}"
    register = httpx.post(
        f"{base}/v2/systemsharedmemory/region/probe/register",
        json={"key": "/probe", "offset": 0, "byte_size": 64},
        timeout=10,
    )
    assert register.status_code == 403, register.text
    assert "restricted" in register.json()["error"]
    assert httpx.get(f"{base}/v2/logging", timeout=10).status_code == 403
    assert httpx.post(f"{base}/v2/repository/index", timeout=10).status_code == 403
    # The launcher's own key (reload uses it) opens them, and only its owner can read it.
    key_file = launcher.run_dir / ADMIN_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    index = httpx.post(f"{base}/v2/repository/index", headers=launcher.admin_headers(), timeout=10)
    assert index.status_code == 200, index.text
    assert httpx.get(f"{base}/v2/health/ready", timeout=10).status_code == 200

    client = grpcclient.InferenceServerClient(launcher.settings.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("probe", "/probe", 64)
        assert "restricted" in str(info.value.message())
        with pytest.raises(InferenceServerException):
            client.get_log_settings()
        assert client.is_server_ready()
        image = np.array([[b"not an image"]], dtype=np.object_)
        tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(image)
        with pytest.raises(InferenceServerException) as refused:  # inference is open: the
            client.infer(launcher.settings.ensemble, [tensor])  # model itself refuses it
        assert "not_an_image" in str(refused.value.message())
    finally:
        client.close()


def test_restricted_apis_and_no_region_left_after_a_crash(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    run_dir = tmp_path / "triton-run"
    launcher = LocalTriton(triton_settings(published_model, run_dir))
    try:
        launcher.start()
        launcher.wait_ready()
        _assert_restricted(launcher)
        first = launcher.shm_regions()
        assert first, "the python backend made no shared-memory region"
        _kill(launcher)
        assert launcher.shm_regions() == first  # a crash leaves them (the defect's premise)

        launcher.start()  # the next start removes them before the new server makes its own
        launcher.wait_ready()
        second = launcher.shm_regions()
        assert second and not set(first) & set(second)
        _kill(launcher)
        assert launcher.shm_regions() == second
    finally:
        launcher.stop()  # no server left to stop: it removes what the killed one left
    assert launcher.shm_regions() == []
    assert not (run_dir / ADMIN_KEY_FILE).exists()
    assert not processes_naming(run_dir)
