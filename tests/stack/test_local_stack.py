"""`make up` for real: every engine through the gateway, Prometheus scraping all of them, the
process manager restarting a killed engine, and the dashboard's metrics present in live scrapes.
The `local_stack` fixture (tests/conftest.py) checks that `make down` leaves no process."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import LocalStack, held_out_digit_pngs
from tests.processes import wait_for
from tests.stack.test_compose_static import (
    dashboard_metric_names,
    dashboard_panels,
    exposition_metric_names,
)

pytestmark = pytest.mark.slow

BACKENDS = ("predictor", "torchserve", "triton")
REPO_ROOT = Path(__file__).resolve().parents[2]


def predict(stack: LocalStack, image: bytes, backend: str) -> httpx.Response:
    body = {"image": base64.b64encode(image).decode()}
    return httpx.post(
        f"{stack.gateway_url}/predict", params={"backend": backend}, json=body, timeout=30
    )


def engines_ready(stack: LocalStack) -> dict[str, bool]:
    body = httpx.get(f"{stack.gateway_url}/readyz", timeout=5).json()
    return {name: bool(state["ready"]) for name, state in body["backends"].items()}


def test_predict_through_each_backend_agrees(local_stack: LocalStack) -> None:
    images = held_out_digit_pngs(12)
    answers: dict[str, list[int]] = {}
    for backend in BACKENDS:
        top1 = []
        for image in images:
            response = predict(local_stack, image, backend)
            assert response.status_code == 200, response.text
            assert response.headers["x-backend"] == backend
            assert response.headers["x-request-id"]
            body = response.json()
            assert body["backend"] == backend and body["model"] == "classifier"
            top1.append(body["predictions"][0]["class_id"])
        answers[backend] = top1
    assert answers["predictor"] == answers["torchserve"] == answers["triton"]
    compare = httpx.post(
        f"{local_stack.gateway_url}/predict",
        params={"backend": "all"},
        json={"image": base64.b64encode(images[0]).decode()},
        timeout=30,
    )
    assert compare.status_code == 200, compare.text
    assert compare.json()["agree"] is True


def _prometheus_has(stack: LocalStack, query: str) -> bool:
    response = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=5)
    return response.status_code == 200 and bool(response.json()["data"]["result"])


def test_prometheus_scrapes_gateway_histogram_and_engine_metrics(local_stack: LocalStack) -> None:
    image = held_out_digit_pngs(1)[0]
    for backend in BACKENDS:
        assert predict(local_stack, image, backend).status_code == 200
    for backend in BACKENDS:
        query = f'gateway_request_duration_seconds_count{{backend="{backend}"}}'
        wait_for(lambda q=query: _prometheus_has(local_stack, q), 60, query)  # type: ignore[misc]
    for query in ("nv_inference_count", '{__name__=~"ts_.+"}', "predictor_batch_size_count"):
        wait_for(lambda q=query: _prometheus_has(local_stack, q), 60, query)  # type: ignore[misc]
    targets = httpx.get(f"{local_stack.prometheus_url}/api/v1/targets", timeout=5).json()
    health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
    assert set(health) >= {"gateway", "predictor", "torchserve", "triton"}
    wait_for(
        lambda: all(
            t["health"] == "up"
            for t in httpx.get(f"{local_stack.prometheus_url}/api/v1/targets", timeout=5).json()[
                "data"
            ]["activeTargets"]
        ),
        30,
        "every scrape target up",
    )


def test_dashboard_queries_name_live_metrics(local_stack: LocalStack) -> None:
    image = held_out_digit_pngs(1)[0]
    for backend in BACKENDS:
        assert predict(local_stack, image, backend).status_code == 200
    exported: set[str] = set()
    for url in (
        f"{local_stack.gateway_url}/metrics",
        f"{local_stack.predictor_url}/metrics",
        f"{local_stack.torchserve_metrics_url}/metrics",
        f"{local_stack.triton_metrics_url}/metrics",
    ):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, url
        exported |= exposition_metric_names(response.text)
    missing = dashboard_metric_names() - exported
    assert not missing, f"dashboard queries metrics no live scrape exports: {sorted(missing)}"
    # Every query of every panel returns data from the stack's Prometheus, as Grafana would ask
    # it (its $__rate_interval is at least four scrape intervals): no "No data" panel.
    queries = [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]
    for backend in BACKENDS:  # traffic inside the rate window
        assert predict(local_stack, image, backend).status_code == 200
    empty = []
    for title, query in queries:
        try:
            wait_for(lambda q=query: _prometheus_has(local_stack, q), 60, query, interval=1.0)  # type: ignore[misc]
        except AssertionError:
            empty.append((title, query))
    assert not empty, f"panels with a query that returns no data: {empty}"


def test_container_healthcheck_script_against_real_services(local_stack: LocalStack) -> None:
    script = REPO_ROOT / "docker" / "healthcheck.py"
    ok = subprocess.run(
        [sys.executable, str(script), f"{local_stack.gateway_url}/readyz"], timeout=30
    )
    assert ok.returncode == 0
    torchserve = subprocess.run(
        [
            sys.executable,
            str(script),
            "--torchserve-key-file",
            str(local_stack.torchserve_key_file),
            f"{local_stack.torchserve_management_url}/models/classifier",
        ],
        timeout=30,
    )
    assert torchserve.returncode == 0


def _supervised_pid(stack: LocalStack, program: str) -> int:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "supervisorctl"),
            "-c",
            str(stack.run_dir / "supervisord.conf"),
            "pid",
            program,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(done.stdout.strip() or 0)


def test_killed_engine_is_restarted_and_ready_again(local_stack: LocalStack) -> None:
    before = _supervised_pid(local_stack, "predictor")
    assert before > 0
    os.kill(before, signal.SIGKILL)
    wait_for(
        lambda: not engines_ready(local_stack)["predictor"], 30, "/readyz to show predictor down"
    )
    # While it is down, requests for it fail over: the client sees no 5xx.
    image = held_out_digit_pngs(1)[0]
    response = predict(local_stack, image, "predictor")
    assert response.status_code == 200, response.text
    wait_for(lambda: _supervised_pid(local_stack, "predictor") not in (0, before), 60, "a new pid")
    wait_for(lambda: all(engines_ready(local_stack).values()), 180, "/readyz green again")
    response = predict(local_stack, image, "predictor")
    assert response.status_code == 200 and response.headers["x-backend"] == "predictor"
