"""Gateway logic with settings of each test's choosing: in-process gateways (lifespan on)
in front of the real engines, plus one fake engine that stalls on purpose."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PublishedModel
from tests.gateway.conftest import (
    Engines,
    StallingServer,
    gateway_app,
    isolated_settings,
)
from tests.images import b64
from tests.processes import free_port

pytestmark = pytest.mark.slow


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


async def test_a_stalling_engine_gives_504_within_its_timeout(
    engines: Engines, published_model: PublishedModel, stalling_server: StallingServer
) -> None:
    timeout_s = 0.5
    settings = engines.settings(
        predictor_url=stalling_server.url,
        predictor_timeout_s=timeout_s,
        breaker_failures=2,
        breaker_reset_s=300,
    )
    body = {"image": b64(published_model.images[0])}
    async with gateway_app(settings) as (client, _):
        for _ in range(2):
            start = time.monotonic()
            response = await client.post("/predict", json=body, timeout=60)
            elapsed = time.monotonic() - start
            assert response.status_code == 504, response.text
            assert response.json()["code"] == "timeout"
            assert set(response.json()) == {"error", "code"}
            assert response.headers["X-Backend"] == "predictor"
            # Not before the timeout, and long before the fake would have answered (it holds
            # every request until the test ends).
            assert elapsed >= timeout_s
            assert not stalling_server.release.is_set()
        assert stalling_server.predict_calls == 2  # a timeout is not retried
        # Two timeouts opened the predictor's breaker: requests fail over at once now.
        response = await client.post("/predict", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == "torchserve"
        assert response.headers["X-Failover-From"] == "predictor"
        assert stalling_server.predict_calls == 2
        readiness = (await client.get("/readyz")).json()
        assert readiness["backends"]["predictor"]["breaker"] == "open"
        assert readiness["backends"]["predictor"]["ready"] is False
        metrics = (await client.get("/metrics")).text
        assert 'gateway_upstream_errors_total{backend="predictor",kind="timeout"} 2.0' in metrics


async def test_the_breaker_logs_only_real_transitions(
    stalling_server: StallingServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls in flight when the breaker opens fail after it did, and each reopens it; the
    calls after it are refused by the open breaker. Neither is a state change to log: one
    CLOSED -> OPEN line, no OPEN -> OPEN."""
    settings = isolated_settings(
        backends=["predictor"],
        predictor_url=stalling_server.url,
        predictor_timeout_s=0.3,
        predictor_coalesce_calls=0,  # every request its own engine call
        breaker_failures=2,
        breaker_reset_s=300,
        failover=False,
    )
    body = {"image": b64(b"not looked at: the engine stalls")}
    caplog.set_level(logging.WARNING, logger="services.gateway.resilience")
    async with gateway_app(settings) as (client, state):
        in_flight = await asyncio.gather(*(client.post("/predict", json=body) for _ in range(6)))
        assert [r.status_code for r in in_flight] == [504] * 6
        refused = [await client.post("/predict", json=body) for _ in range(3)]
        assert {r.status_code for r in refused} == {503}, [r.text for r in refused]
        assert state.guards["predictor"].breaker_state == "open"
    assert stalling_server.predict_calls == 6
    transitions = [r.getMessage() for r in caplog.records if "circuit breaker of" in r.getMessage()]
    assert transitions == ["circuit breaker of predictor: CLOSED -> OPEN"]


async def test_without_failover_a_dead_engine_is_a_503(
    engines: Engines, published_model: PublishedModel
) -> None:
    settings = engines.settings(predictor_url=closed_port_url(), failover=False)
    async with gateway_app(settings) as (client, _):
        response = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "no_backend_available"
        assert "predictor" in response.json()["error"]
        # The other engines still answer when asked for by name.
        named = await client.post(
            "/predict", params={"backend": "triton"}, json={"image": b64(published_model.images[0])}
        )
        assert named.status_code == 200
        assert named.json()["backend"] == "triton"


async def _predictor_ready(client: Any) -> bool:
    return bool((await client.get("/readyz")).json()["backends"]["predictor"]["ready"])


@pytest.mark.parametrize("tolerated", [3, 1])
async def test_probes_that_time_out_count_only_so_many_in_a_row(
    stalling_server: StallingServer, tolerated: int
) -> None:
    """A ready engine whose probes time out (Triton while it loads a model) stays ready for
    ``health_timeouts - 1`` checks in a row, then counts as not ready; one answer in time
    resets the count."""
    interval_s, timeout_s = 0.2, 0.3
    settings = isolated_settings(
        predictor_url=stalling_server.url,
        torchserve_url=closed_port_url(),
        torchserve_management_url=closed_port_url(),
        torchserve_key_file=None,
        triton_url=closed_port_url(),
        connect_timeout_s=0.5,
        health_interval_s=interval_s,
        health_timeout_s=timeout_s,
        health_timeouts=tolerated,
    )
    async with gateway_app(settings) as (client, _):
        deadline = time.monotonic() + 10
        while not await _predictor_ready(client):
            assert time.monotonic() < deadline, "the predictor never turned ready"
            await asyncio.sleep(0.05)
        stalling_server.slow_probes.set()
        slowed = time.monotonic()
        # Still ready through tolerated - 1 timed-out checks (none when tolerated is 1).
        spell_s = (tolerated - 1) * (interval_s + timeout_s)
        while time.monotonic() < slowed + spell_s:
            assert await _predictor_ready(client), time.monotonic() - slowed
            await asyncio.sleep(0.05)
        while await _predictor_ready(client):
            assert time.monotonic() < slowed + spell_s + 5, "timed-out probes never counted"
            await asyncio.sleep(0.05)
        body = (await client.get("/readyz")).json()["backends"]["predictor"]
        assert body["detail"] == "readiness check timed out", body
        stalling_server.slow_probes.clear()
        deadline = time.monotonic() + 10
        while not await _predictor_ready(client):
            assert time.monotonic() < deadline, "the predictor never turned ready again"
            await asyncio.sleep(0.05)


async def test_no_engine_at_all_is_a_503_and_not_ready() -> None:
    settings = isolated_settings(
        predictor_url=closed_port_url(),
        torchserve_url=closed_port_url(),
        torchserve_management_url=closed_port_url(),
        torchserve_key_file=None,
        triton_url=closed_port_url(),
        connect_timeout_s=0.5,
    )
    async with gateway_app(settings) as (client, _):
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503
        assert readiness.json()["code"] == "not_ready"
        assert all(not b["ready"] for b in readiness.json()["backends"].values())
        response = await client.post("/predict", json={"image": b64(b"anything")})
        assert response.status_code == 503
        assert response.json()["code"] == "no_backend_available"
        assert (await client.get("/healthz")).status_code == 200
        compare = await client.post("/predict?backend=all", json={"image": b64(b"anything")})
        assert compare.status_code == 503
        assert compare.json()["agree"] is None


async def test_readiness_and_errors_name_no_internal_path(tmp_path: Path) -> None:
    """An unusable TorchServe key file is reported by what is wrong with it, never where it
    is: /readyz and a caller's 503 are public, the folder layout of the host is not."""
    key_file = tmp_path / "secret-run-folder" / "key_file.json"
    settings = isolated_settings(
        backends=["torchserve"],
        default_backend="torchserve",
        torchserve_url=closed_port_url(),
        torchserve_management_url=closed_port_url(),
        torchserve_key_file=key_file,
        connect_timeout_s=0.5,
    )
    async with gateway_app(settings) as (client, _):
        readiness = await client.get("/readyz")
        detail = readiness.json()["backends"]["torchserve"]["detail"]
        assert detail == "torchserve key file is unreadable: No such file or directory"
        key_file.parent.mkdir()
        key_file.write_text("{not json")
        response = await client.post("/predict", json={"image": b64(b"anything")})
        assert response.status_code == 503, response.text
        await client.get("/readyz")  # the poller runs on its own; this asks again
        state_detail = (await client.get("/readyz")).text
    for answer in (readiness.text, response.text, state_detail):
        assert str(tmp_path) not in answer
        assert "secret-run-folder" not in answer


async def test_a_request_to_an_engine_that_just_died_is_retried_elsewhere(
    engines: Engines, published_model: PublishedModel
) -> None:
    """The readiness poll has not noticed yet: the refused connection itself fails over."""
    settings = engines.settings(predictor_url=closed_port_url(), health_interval_s=3600)
    async with gateway_app(settings) as (client, state):
        guard = state.guards["predictor"]
        guard.ready = True  # as if it was up at the last check
        response = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == "torchserve"
        assert guard.ready is False  # marked down by the failed call
        metrics = (await client.get("/metrics")).text
        assert 'gateway_upstream_errors_total{backend="predictor",kind="connect"} 1.0' in metrics


async def test_weighted_split_sends_traffic_by_weight(
    engines: Engines, published_model: PublishedModel
) -> None:
    settings = engines.settings(weights="torchserve=1,triton=3")
    body = {"image": b64(published_model.images[0]), "top_k": 1}
    served: Counter[str] = Counter()
    async with gateway_app(settings) as (client, _):
        for _ in range(60):
            response = await client.post("/predict", json=body)
            assert response.status_code == 200
            served[response.json()["backend"]] += 1
        # An explicit choice wins over the split.
        explicit = await client.post("/predict", params={"backend": "predictor"}, json=body)
        assert explicit.json()["backend"] == "predictor"
    assert set(served) == {"torchserve", "triton"}  # never the unweighted default
    # 60 draws at p = 3/4: fewer than 30 for triton has probability ~1e-5.
    assert served["triton"] > 30


async def test_api_key_when_configured(engines: Engines, published_model: PublishedModel) -> None:
    settings = engines.settings(api_key="s3cret", api_key_header="X-Gateway-Key")
    body = {"image": b64(published_model.images[0])}
    async with gateway_app(settings) as (client, _):
        missing = await client.post("/predict", json=body)
        wrong = await client.post("/predict", json=body, headers={"X-Gateway-Key": "guess"})
        right = await client.post("/predict", json=body, headers={"X-Gateway-Key": "s3cret"})
        # Health and metrics stay open (probes and Prometheus carry no key).
        assert (await client.get("/readyz")).status_code == 200
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
    assert right.status_code == 200


async def test_torchserve_keys_are_read_again_when_they_change(
    engines: Engines, published_model: PublishedModel, tmp_path: Path
) -> None:
    """A stale inference key (TorchServe restarted) is read again once the file changes."""
    real = engines.torchserve.settings.key_file
    copy = tmp_path / "key_file.json"
    copy.write_text(real.read_text().replace(engines.torchserve.keys.inference, "stale-key"))
    settings = engines.settings(torchserve_key_file=str(copy), failover=False)
    body = {"image": b64(published_model.images[0])}
    async with gateway_app(settings) as (client, _):
        stale = await client.post("/predict", params={"backend": "torchserve"}, json=body)
        assert stale.status_code == 503  # refused: the key is wrong
        assert stale.json()["code"] == "no_backend_available"
        copy.write_text(real.read_text())  # TorchServe "wrote new keys"
        fresh = await client.post("/predict", params={"backend": "torchserve"}, json=body)
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["backend"] == "torchserve"
