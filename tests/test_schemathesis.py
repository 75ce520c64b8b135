"""schemathesis, every check, against the OpenAPI documents of the real predictor and the real
gateway (uvicorn processes; the gateway in front of that predictor): every answer must be one
the document describes, in status, content type, headers and schema; schema-invalid input
must be refused and schema-valid input accepted (tests/schemathesis.toml says which refusals a
schema cannot express); nothing may be a 5xx. The examples per operation are bounded so the
whole file stays well under two minutes of run time.

The same bytes also get the same status and code from both services: they parse the body in
one place (services.common.schemas.parse_predict_request).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PublishedModel
from tests.gateway.conftest import GatewayProcess
from tests.predictor.conftest import PredictorProcess, start_predictor

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "schemathesis.toml"
#: Test cases per operation and phase: enough to reach every documented status here, few
#: enough for two servers on two cores.
MAX_EXAMPLES = 15
SEED = 20261202  # a failure is reproducible with the same seed
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def predictor(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictorProcess]:
    log = tmp_path_factory.mktemp("schemathesis") / "predictor.log"
    server = start_predictor(published_model.repo, log, poll_interval_s=0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    predictor: PredictorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {
        "GATEWAY_BACKENDS": "predictor",
        "GATEWAY_PREDICTOR_URL": predictor.url,
        "GATEWAY_HEALTH_INTERVAL_S": "0.5",
    }
    server = GatewayProcess(env, tmp_path_factory.mktemp("schemathesis") / "gateway.log")
    try:
        server.wait_all_ready()
        yield server
    finally:
        server.stop()


def run_schemathesis(base_url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """The ``st`` command line; run in ``workdir``, where it keeps its cache."""
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "30",
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=workdir, check=False
    )


@pytest.mark.parametrize("service", ["predictor", "gateway"])
def test_schemathesis_finds_nothing(
    service: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue(service)
    run = run_schemathesis(server.url, tmp_path)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counts is not None and counts[1] == counts[2] and int(counts[1]) > 50, report
    # It did test, and the service is still fine after everything it was sent.
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"[]",
        b"{}",
        b'{"images": []}',
        b'{"images": [""]}',
        b'{"image": ""}',
        b'{"image": null, "images": ["aGVsbG8="]}',
        b'{"image": "aGVsbG8=", "top_k": 0}',
    ],
)
def test_both_services_answer_the_same_bytes_alike(
    body: bytes, predictor: PredictorProcess, gateway: GatewayProcess
) -> None:
    headers = {"content-type": "application/json"}
    direct = httpx.post(predictor.url + "/predict", content=body, headers=headers, timeout=30)
    edge = httpx.post(gateway.url + "/predict", content=body, headers=headers, timeout=30)
    assert 400 <= direct.status_code < 500, direct.text
    assert (edge.status_code, edge.json()["code"]) == (
        direct.status_code,
        direct.json()["code"],
    ), (direct.text, edge.text)
