"""TorchServe and the gateway as the Kubernetes manifests configure them, run for real.

In Kubernetes TorchServe runs with token authorization off (its replicas sit behind one
Service, each would write keys of its own), its pods' probe asks the management API on
loopback for a READY worker with docker/healthcheck.py, and the gateway, which cannot reach
the management API there, checks TorchServe's ``/ping``. This starts a real TorchServe and a
real gateway process with exactly the TorchServe and gateway variables the rendered cpu
overlay sets (only host, ports and local paths replaced, as a pod's differ from this
machine's), and checks that they serve and that the probes agree.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import httpx
import pytest

from services.torchserve.config import TorchServeSettings, render_config
from services.torchserve.launcher import down, status, up
from tests.conftest import PublishedModel
from tests.deploy.test_kubernetes_static import container_env, main_container, pod_specs
from tests.processes import ServiceProcess, processes_naming, wait_for
from tests.torchserve.conftest import torchserve_settings

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
#: Variables that name where things are inside the pod; replaced by local ones here.
LOCAL = {"HOST", "REPOSITORY", "RUN_DIR"}


def manifest_env(workload: str) -> dict[str, str]:
    return container_env("cpu", main_container(pod_specs("cpu")[workload]))


def pod_probe(workload: str, kind: str) -> list[str]:
    return list(main_container(pod_specs("cpu")[workload])[kind]["exec"]["command"])


def test_torchserve_and_gateway_serve_as_the_manifests_configure_them(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    env = {
        name.removeprefix("TORCHSERVE_").lower(): value
        for name, value in manifest_env("torchserve").items()
        if name.removeprefix("TORCHSERVE_") not in LOCAL
    }
    assert env["token_authorization"] == "false"
    base = torchserve_settings(
        published_model.copy_repository(tmp_path), published_model.model, tmp_path / "run"
    )
    with mock.patch.dict(os.environ, {}, clear=True):
        settings = TorchServeSettings(**{**base.model_dump(), **env})
    assert settings.token_authorization is False and settings.management_host == "127.0.0.1"
    instance = up(settings)
    gateway: ServiceProcess | None = None
    try:
        config = settings.config_file.read_text()
        assert "disable_token_authorization=true" in config
        assert instance.inference_headers == {} and instance.management_headers == {}
        image = published_model.images[0]
        direct = httpx.post(instance.predictions_url(), content=image, timeout=30)
        assert direct.status_code == 200, direct.text
        assert status(settings)["ready"] is True

        # The pods' probe, with the manifest's arguments and this instance's port.
        probe = pod_probe("torchserve", "readinessProbe")
        url = probe[-1].replace(
            f":{TorchServeSettings().management_port}", f":{settings.management_port}"
        )
        args = [*probe[2:-1], url]
        checked = subprocess.run(
            [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        wrong = url.replace(f"/models/{settings.model}", "/models/no-such-model")
        refused = subprocess.run(
            [sys.executable, str(HEALTHCHECK), *probe[2:-1], wrong],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1 and "HTTP 404" in refused.stdout

        # The gateway with the manifest's variables, TorchServe at this instance.
        gateway_env = {
            name: value
            for name, value in manifest_env("gateway").items()
            if name.removeprefix("GATEWAY_") not in LOCAL
        }
        assert gateway_env["GATEWAY_TORCHSERVE_MANAGEMENT_URL"] == ""
        assert gateway_env["GATEWAY_TORCHSERVE_KEY_FILE"] == ""
        gateway_env.update(
            GATEWAY_TORCHSERVE_URL=settings.inference_url,
            GATEWAY_BACKENDS="torchserve",
            GATEWAY_DEFAULT_BACKEND="torchserve",
            GATEWAY_HEALTH_INTERVAL_S="0.2",
        )
        gateway = ServiceProcess("gateway", gateway_env, tmp_path / "gateway.log")

        def torchserve_ready() -> bool:
            assert gateway is not None
            gateway.raise_if_exited()
            try:
                reply = httpx.get(f"{gateway.url}/readyz", timeout=2)
            except httpx.HTTPError:
                return False
            return reply.status_code == 200 and reply.json()["backends"]["torchserve"]["ready"]

        wait_for(torchserve_ready, 60, "the gateway to see TorchServe ready")
        body = {"image": base64.b64encode(image).decode()}
        answer = httpx.post(f"{gateway.url}/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["backend"] == "torchserve"
        top1 = answer.json()["predictions"][0]["class_id"]
        assert top1 == published_model.expected_top1[0]
    finally:
        if gateway is not None:
            gateway.stop()
        down(settings)
        left = processes_naming(settings.run_path)
        assert not left, f"TorchServe processes survived: {left}"


@pytest.mark.parametrize("authorization", [True, False])
def test_rendered_config_follows_token_authorization(authorization: bool, tmp_path: Path) -> None:
    settings = torchserve_settings(
        tmp_path, "classifier", tmp_path / "run", token_authorization=authorization
    )
    rendered = render_config(settings, 1)
    expected = "false" if authorization else "true"
    assert f"disable_token_authorization={expected}" in rendered.splitlines()
    assert ("token_expiration_min=" in rendered) is authorization
