"""The bounded HTTP front end (services/common/limits.py) against real uvicorn processes.

Both services run it (``services.common.cli.serve``): each test runs against a gateway (no
engines: every probe here is answered at the edge) and a predictor, started with short read
timeouts so that a timeout test takes a second or two. The clients are the hostile ones of
``loadtests/http_limits.py``; memory is read from /proc/<pid>/status around each probe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests import http_limits as probes
from services.common.limits import HttpLimits
from services.common.settings import ServiceSettings
from tests.predictor.conftest import get_json, start_predictor
from tests.processes import ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
BUFFER_BUDGET = 64 * 1024 * 1024
DEFAULTS = HttpLimits()
#: RSS a probe may add to a server, MiB: a few reads' worth, far below what the probes send.
MEMORY_SLACK_MIB = 24


@dataclass
class Served:
    name: str
    process: ServiceProcess

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def assert_healthy(self) -> None:
        status, body = get_json(self.process.url + "/healthz")
        assert status == 200, body
        log = self.process.log()
        assert "Traceback" not in log, log[-3000:]


def limit_settings(prefix: str) -> dict[str, str]:
    return {
        f"{prefix}_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        f"{prefix}_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        f"{prefix}_MAX_BUFFERED_BYTES": str(BUFFER_BUDGET),
    }


def start_gateway(log: Path, **extra: str) -> ServiceProcess:
    dead = f"http://127.0.0.1:{free_port()}"  # no engine listens there
    env = {
        "GATEWAY_PREDICTOR_URL": dead,
        "GATEWAY_TORCHSERVE_URL": dead,
        "GATEWAY_TORCHSERVE_MANAGEMENT_URL": dead,
        "GATEWAY_TRITON_URL": dead,
        "GATEWAY_TORCHSERVE_KEY_FILE": "",
        **limit_settings("GATEWAY"),
        **extra,
    }
    server = ServiceProcess("gateway", env, log)

    def listening() -> bool:
        server.raise_if_exited()
        try:
            return get_json(server.url + "/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    try:
        wait_for(listening, 60, "the gateway to answer /healthz")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module", params=["gateway", "predictor"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("http-limits") / f"{request.param}.log"
    if request.param == "gateway":
        server = start_gateway(log)
    else:
        published = request.getfixturevalue("published_model")
        server = start_predictor(
            published.repo,
            log,
            poll_interval_s=0,
            header_timeout_s=HEADER_TIMEOUT_S,
            body_timeout_s=BODY_TIMEOUT_S,
            max_buffered_bytes=BUFFER_BUDGET,
        )
    try:
        yield Served(request.param, server)
    finally:
        server.stop()


def assert_refused(outcome: probes.Outcome, status: int, code: str) -> None:
    assert outcome.status == status, outcome.line()
    assert outcome.body is not None and outcome.body["code"] == code, outcome.line()
    assert isinstance(outcome.body.get("error"), str), outcome.body
    assert outcome.closed, f"the connection stayed open: {outcome.line()}"


def assert_memory_bounded(outcome: probes.Outcome) -> None:
    memory = outcome.memory
    assert memory is not None
    assert memory.peak - memory.before < MEMORY_SLACK_MIB, outcome.line()
    assert memory.after - memory.before < MEMORY_SLACK_MIB, outcome.line()


def test_a_100_mib_header_gets_431_without_being_read(served: Served) -> None:
    outcome = probes.huge_header(served.port, served.pid, size=100 * probes.MIB, timeout=30)
    assert_refused(outcome, 431, "headers_too_large")
    assert outcome.sent_bytes < 50 * probes.MIB, outcome.line()  # refused long before its end
    assert_memory_bounded(outcome)
    served.assert_healthy()


def test_ten_thousand_headers_get_431(served: Served) -> None:
    outcome = probes.many_headers(served.port, served.pid, count=10_000, timeout=30)
    assert_refused(outcome, 431, "too_many_headers")
    assert_memory_bounded(outcome)
    served.assert_healthy()


def test_an_overlong_header_line_or_url_is_refused(served: Served) -> None:
    line = DEFAULTS.max_header_line_bytes + 1
    header = probes._probe_head(
        "long header line",
        served.port,
        None,
        iter([b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Long: " + b"a" * line + b"\r\n\r\n"]),
        10,
    )
    assert_refused(header, 431, "header_line_too_large")
    url = probes._probe_head(
        "long url",
        served.port,
        None,
        iter([b"GET /healthz?" + b"a" * line + b" HTTP/1.1\r\nHost: p\r\n\r\n"]),
        10,
    )
    assert_refused(url, 414, "uri_too_long")
    served.assert_healthy()


def test_a_stalled_head_or_body_gets_408_within_the_timeout(served: Served) -> None:
    body = probes.stalled_body(served.port, served.pid, timeout=10)
    assert_refused(body, 408, "request_timeout")
    assert BODY_TIMEOUT_S * 0.9 < body.seconds < BODY_TIMEOUT_S + 1.5, body.line()

    start = time.perf_counter()
    with probes.connect(served.port, 10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Half: ")
        status, answer, closed = probes.read_answer(sock, 10)
    elapsed = time.perf_counter() - start
    assert (status, closed) == (408, True) and answer is not None, answer
    assert HEADER_TIMEOUT_S * 0.9 < elapsed < HEADER_TIMEOUT_S + 1.5, elapsed

    start = time.perf_counter()
    with probes.connect(served.port, 10) as sock:  # connects and says nothing: closed, no 408
        assert sock.recv(100) == b""
    assert time.perf_counter() - start < HEADER_TIMEOUT_S + 1.5
    served.assert_healthy()


def test_urllib_reads_the_413_of_a_body_it_sends_whole(served: Served) -> None:
    outcome = probes.urllib_upload(served.port, served.pid, size=20 * probes.MIB, timeout=30)
    assert outcome.status == 413, outcome.line()
    assert outcome.body is not None and outcome.body["code"] == "payload_too_large", outcome.line()
    served.assert_healthy()


def test_an_endless_upload_after_a_413_is_cut_after_the_drain_bound(served: Served) -> None:
    # Loopback socket buffers hold a few MiB on top of what the server drained.
    cap = DEFAULTS.drain_max_bytes + 256 * probes.MIB
    outcome = probes.endless_upload(served.port, served.pid, cap_bytes=cap, timeout=20)
    assert outcome.status == 413 and outcome.body is not None, outcome.line()
    assert outcome.closed, f"the server kept reading: {outcome.line()}"
    assert outcome.sent_bytes < DEFAULTS.drain_max_bytes + 64 * probes.MIB, outcome.line()
    served.assert_healthy()


def test_parked_bodies_hold_at_most_the_budget_and_their_memory_is_given_back(
    served: Served,
) -> None:
    outcome = probes.parked_bodies(served.port, served.pid, count=100, size=10 * probes.MIB)
    assert outcome.extra.get("answered_503", 0) >= 1, outcome.line()  # beyond the budget
    assert outcome.extra.get("answered_with_retry_after", 0) >= outcome.extra["answered_503"]
    memory = outcome.memory
    assert memory is not None
    budget_mib = BUFFER_BUDGET / probes.MIB
    assert memory.peak - memory.before < budget_mib + MEMORY_SLACK_MIB, outcome.line()
    assert memory.after - memory.before < MEMORY_SLACK_MIB, outcome.line()
    served.assert_healthy()


def test_without_the_api_key_the_gateway_answers_401_before_the_body(tmp_path: Path) -> None:
    server = start_gateway(tmp_path / "gateway.log", GATEWAY_API_KEY="s3cret")
    try:
        outcome = probes.body_without_key(server.port, server.process.pid, timeout=10)
        assert_refused(outcome, 401, "unauthorized")
        assert outcome.seconds < 1.0, outcome.line()  # not waiting for the body (10 MiB)
        with probes.connect(server.port, 10) as sock:  # with the key, the body is read
            head = probes.post_head("/predict", 2, extra="X-API-Key: s3cret\r\n")
            sock.sendall(head + b"{}")
            status, body, _ = probes.read_answer(sock, 10)
        assert status == 422 and body is not None, body
    finally:
        server.stop()


def test_keep_alive_still_serves_several_requests_on_one_connection(served: Served) -> None:
    with probes.connect(served.port, 10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
            status, body, closed = probes.read_answer(sock, 10)
            assert (status, closed) == (200, False), body


def test_every_limit_is_a_setting_with_the_same_default() -> None:
    fields = ServiceSettings.model_fields
    for name in HttpLimits.__dataclass_fields__:
        assert fields[name].default == getattr(DEFAULTS, name), name
