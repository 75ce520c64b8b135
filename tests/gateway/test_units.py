"""Pieces of the gateway that need no server: settings, body validation, answer mapping."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys

import httpx
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from services.common.errors import (
    BadRequest,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    UnsupportedMediaType,
)
from services.gateway.app import create_app, parse_body
from services.gateway.backends import (
    Answer,
    ConnectFailed,
    EncodedImage,
    EngineFault,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Readiness,
    Reply,
    TorchServeBackend,
    status_error,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.resilience import EngineGuard
from services.triton.protocol import HEADER_LENGTH, binary_infer_request, read_labels, read_logits
from tests.gateway.conftest import ROOT, isolated_settings
from tests.processes import free_port

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def test_settings_parse_the_short_forms() -> None:
    settings = isolated_settings(backends="triton, predictor", default_backend="triton",
                                 weights="predictor=90,triton=10")  # fmt: skip
    assert settings.backends == ["triton", "predictor"]
    assert settings.weights == {"predictor": 90, "triton": 10}
    assert settings.timeout_for("triton") == settings.timeout_s
    tuned = isolated_settings(triton_timeout_s=0.25, predictor_url="http://p:1/")
    assert tuned.timeout_for("triton") == 0.25
    assert tuned.predictor_url == "http://p:1"
    assert isolated_settings(torchserve_key_file="").torchserve_key_file is None
    assert isolated_settings(api_key="").api_key is None
    defaults = isolated_settings()
    assert defaults.port == 8000 and defaults.failover is True and defaults.api_key is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backends": "predictor,tensorflow"}, "backends"),
        ({"backends": "predictor,predictor"}, "twice"),
        ({"backends": "triton"}, "default_backend"),
        ({"weights": "predictor"}, "NAME=NUMBER"),
        ({"weights": "predictor=x"}, "weights"),
        ({"weights": "predictor=0"}, "all be 0"),
        ({"weights": "predictor=-1,triton=2"}, ">= 0"),
        ({"backends": "predictor,triton", "weights": "torchserve=1"}, "not in backends"),
        ({"triton_url": "localhost:8200"}, "http://"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": 9}, "retries"),
    ],
)
def test_bad_settings_fail_fast(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        isolated_settings(**values)


def test_bad_settings_stop_the_cli_with_status_2() -> None:
    env = {"GATEWAY_WEIGHTS": "predictor=ninety", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "GATEWAY_" in done.stderr or "weights" in done.stderr
    table = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--settings"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "`GATEWAY_WEIGHTS`" in table and "`GATEWAY_TIMEOUT_S`" in table
    # Every field is documented (the README's table is printed from these docstrings).
    meanings = [row.split("|")[3].strip() for row in table.splitlines()[2:]]
    assert meanings and all(meanings), table
    assert "|  |" not in table


def test_parse_body_accepts_both_shapes() -> None:
    request, images = parse_body(b'{"image": "%s"}' % PNG.encode(), "application/json", 4)
    assert request.top_k == 5 and len(images) == 1
    assert images[0].data.startswith(b"\x89PNG")
    body = b'{"images": ["data:image/png;base64,%s", "%s"], "top_k": 2}' % (
        PNG.encode(),
        PNG.encode(),
    )
    request, images = parse_body(body, "application/json; charset=utf-8", 4)
    assert request.top_k == 2 and [i.data for i in images] == [images[1].data] * 2


@pytest.mark.parametrize(
    ("body", "content_type", "error", "code"),
    [
        (b'{"image": "x"}', "text/plain", UnsupportedMediaType, "unsupported_media_type"),
        (b'{"image": "x"}', "", UnsupportedMediaType, "unsupported_media_type"),
        (b"{", "application/json", BadRequest, "invalid_json"),
        (b"", "application/json", BadRequest, "invalid_json"),
        (b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", BadRequest,
         "invalid_json"),
        (b"[]", "application/json", Unprocessable, "invalid_request"),
        (b"{}", "application/json", Unprocessable, "invalid_request"),
        (b'{"image": null, "images": ["%s"]}' % PNG.encode(), "application/json",
         Unprocessable, "invalid_request"),
        (b'{"image": "%s", "images": null}' % PNG.encode(), "application/json",
         Unprocessable, "invalid_request"),
        (b'{"images": []}', "application/json", Unprocessable, "empty_images"),
        (b'{"images": ["a", "b", "c", "d", "e"]}', "application/json", PayloadTooLarge,
         "too_many_images"),
        (b'{"image": "@@@"}', "application/json", BadRequest, "invalid_base64"),
        (b'{"images": ["%s", "@@@"]}' % PNG.encode(), "application/json", BadRequest,
         "invalid_base64"),
    ],
)  # fmt: skip
def test_parse_body_refusals(
    body: bytes, content_type: str, error: type[ServiceError], code: str
) -> None:
    with pytest.raises(error) as info:
        parse_body(body, content_type, 4)
    assert info.value.code == code
    assert 400 <= info.value.status_code < 500
    if b"@@@" in body and b"images" in body:
        assert info.value.message.startswith("images[1]: ")


def response(status: int, body: bytes) -> Reply:
    return Reply(status, body, "Reason")


def test_engine_answers_map_to_what_the_gateway_does() -> None:
    ours = status_error("predictor", response(400, b'{"error": "broken", "code": "corrupt_image"}'))
    assert isinstance(ours, EngineRejected)
    assert (ours.status, ours.code, ours.message) == (400, "corrupt_image", "broken")
    # TorchServe's own errors carry a numeric "code" and a "message".
    big = status_error("torchserve", response(413, b'{"code": 413, "message": "too big"}'))
    assert isinstance(big, EngineRejected) and (big.status, big.code) == (413, "payload_too_large")
    for status in (401, 403, 404, 429, 503):
        assert type(status_error("x", response(status, b"{}"))) is EngineUnavailable
    assert isinstance(status_error("x", response(504, b"late")), EngineTimeout)
    fault = status_error("x", response(500, b"<html>oops</html>"))
    assert isinstance(fault, EngineFault) and "oops" in fault.message


def test_the_v2_binary_request_and_answer_round_trip() -> None:
    """The gateway's v2 call carries each image's raw bytes (4-byte length first, no base64)
    after the JSON header, and reads raw FP32 LOGITS, one row per image, back."""
    images = [b"\x89PNG first", b"second image"]
    body, headers = binary_infer_request(images, 0, "req-1")
    split = int(headers[HEADER_LENGTH])
    header = orjson.loads(body[:split])
    assert header["id"] == "req-1"
    assert header["inputs"][0]["shape"] == [2, 1] and header["inputs"][0]["datatype"] == "BYTES"
    assert header["outputs"] == [{"name": "LOGITS", "parameters": {"binary_data": True}}]
    assert body[split:] == b"".join(len(i).to_bytes(4, "little") + i for i in images)
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    answer_header = orjson.dumps(
        {
            "model_name": "classifier_ensemble",
            "model_version": "3",
            "outputs": [
                {"name": "LOGITS", "datatype": "FP32", "shape": [2, 3],
                 "parameters": {"binary_data_size": logits.nbytes}},
            ],
        }
    )  # fmt: skip
    version, read = read_logits(answer_header + logits.tobytes(), str(len(answer_header)), 2)
    assert version == "3" and read.tolist() == logits.tolist()
    with pytest.raises(ValueError):
        read_logits(answer_header + logits.tobytes(), str(len(answer_header)), 3)  # 3 images?
    # Labels are read once per version from a classification of every class (colons allowed).
    labels = orjson.dumps(
        {"outputs": [{"name": "LOGITS", "data": ["1.0:2:a:b", "0.5:0:zero", "0.1:1:one"]}]}
    )
    assert read_labels(labels, 3) == ["zero", "one", "a:b"]
    with pytest.raises(ValueError):
        read_labels(labels, 4)


async def test_torchserve_frontend_errors_are_not_the_callers() -> None:
    backend = TorchServeBackend(isolated_settings(torchserve_key_file=""))
    refused_key = response(
        400,
        b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}',
    )
    assert backend._error(refused_key).code == "engine_auth"
    assert isinstance(backend._error(refused_key), EngineUnavailable)
    handler = response(
        400, b'{"error": "data is not a recognised image format", "code": "not_an_image"}'
    )
    assert isinstance(backend._error(handler), EngineRejected)
    too_big = response(413, b'{"code": 413, "type": "TooLongFrameException", "message": "x"}')
    rejected = backend._error(too_big)
    assert isinstance(rejected, EngineRejected) and rejected.status == 413
    odd = response(405, b'{"code": 405, "type": "MethodNotAllowedException", "message": "x"}')
    assert isinstance(backend._error(odd), EngineFault)
    await backend.aclose()


class FlakyBackend:
    """Refuses the connection ``failures`` times, then answers (retry logic only)."""

    name = "predictor"
    precisions = frozenset(("fp32",))

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def predict(
        self, images: object, top_k: int, request_id: str, precision: str = "fp32"
    ) -> Answer:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return Answer("classifier", "1", [[{"label": "3", "class_id": 3, "score": 1.0}]])

    async def check_ready(self) -> Readiness:
        return Readiness(True, "fake")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    ("retries", "failures", "answered", "calls"),
    [(0, 1, False, 1), (1, 1, True, 2), (2, 2, True, 3), (2, 3, False, 3)],
)
async def test_refused_connections_are_retried_a_bounded_number_of_times(
    retries: int, failures: int, answered: bool, calls: int
) -> None:
    backend = FlakyBackend(failures, ConnectFailed("refused"))
    settings = isolated_settings(retries=retries, retry_backoff_s=0.001)
    guard = EngineGuard(backend, settings, GatewayMetrics.create())  # type: ignore[arg-type]
    if answered:
        assert (await guard.predict([], 1, "id")).version == "1"
    else:
        with pytest.raises(ConnectFailed):
            await guard.predict([], 1, "id")
    assert backend.calls == calls


@pytest.mark.parametrize(
    "error",
    [
        EngineTimeout("slow"),
        EngineFault("500"),
        EngineRejected("not an image", "not_an_image", 400),
    ],
)
async def test_other_failures_are_never_retried(error: Exception) -> None:
    backend = FlakyBackend(1, error)
    guard = EngineGuard(backend, isolated_settings(retries=3), GatewayMetrics.create())  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        await guard.predict([], 1, "id")
    assert backend.calls == 1


async def test_the_breaker_opens_on_engine_failures_not_on_bad_images() -> None:
    settings = isolated_settings(breaker_failures=2, breaker_reset_s=300, retries=0)
    rejecting = FlakyBackend(10, EngineRejected("not an image", "not_an_image", 400))
    guard = EngineGuard(rejecting, settings, GatewayMetrics.create())  # type: ignore[arg-type]
    guard.ready = True
    for _ in range(4):
        with pytest.raises(EngineRejected):
            await guard.predict([], 1, "id")
    assert guard.breaker_state == "closed" and guard.available
    failing = FlakyBackend(10, EngineFault("500"))
    guard = EngineGuard(failing, settings, GatewayMetrics.create())  # type: ignore[arg-type]
    guard.ready = True
    for _ in range(2):
        with pytest.raises(EngineFault):
            await guard.predict([], 1, "id")
    assert guard.breaker_state == "open" and not guard.available
    with pytest.raises(EngineUnavailable) as info:
        await guard.predict([], 1, "id")
    assert info.value.code == "circuit_open" and failing.calls == 2  # nothing sent
    # A passing readiness check after being down lets traffic back at once.
    guard.ready = False
    await guard.check()
    assert guard.breaker_state == "closed" and guard.available


async def test_a_merged_predictor_call_is_one_engine_call_to_the_breaker_and_metrics() -> None:
    """Requests merged into one predictor call share its outcome: one engine failure is one
    failure for the breaker and one upstream observation, however many requests it carried."""
    release = asyncio.Event()

    class StallThenFail(FlakyBackend):
        async def predict(
            self, images: object, top_k: int, request_id: str, precision: str = "fp32"
        ) -> Answer:
            self.calls += 1
            await release.wait()
            raise EngineFault("500")

    backend = StallThenFail(0, EngineFault("500"))
    settings = isolated_settings(
        breaker_failures=3, breaker_reset_s=300, retries=0, predictor_coalesce_calls=1
    )
    metrics = GatewayMetrics.create()
    guard = EngineGuard(backend, settings, metrics)  # type: ignore[arg-type]
    guard.ready = True
    image = EncodedImage(b"png")
    calls = [asyncio.create_task(guard.predict([image], 1, f"r{i}")) for i in range(8)]
    await asyncio.sleep(0.05)  # the first call is out, the other seven queue behind it
    release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [EngineFault] * 8
    assert backend.calls == 2  # the first alone, then the seven merged
    assert guard.breaker_state == "closed" and guard.available  # 2 failures < 3
    observed = metrics.registry.get_sample_value(
        "gateway_upstream_duration_seconds_count", {"backend": "predictor", "outcome": "fault"}
    )
    assert observed == 2


async def test_an_unexpected_error_is_a_json_500_that_names_the_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # no engine needed: the router fails first
    settings = isolated_settings(
        backends=["predictor"], default_backend="predictor", predictor_url=nowhere
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug, not the caller's mistake")

        monkeypatch.setattr(app.state.gateway.router, "predict", broken)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            chosen = await client.post("/predict", json={"image": PNG})
            given = await client.post(
                "/predict", json={"image": PNG}, headers={"X-Request-ID": "abc-123"}
            )
    for response in (chosen, given):
        assert response.status_code == 500
        assert response.json()["code"] == "internal_error"
        request_id = response.headers["X-Request-ID"]
        assert f"(request id {request_id})" in response.json()["error"]
        assert f"unhandled error (request id {request_id})" in caplog.text
    assert given.headers["X-Request-ID"] == "abc-123"
    assert len(chosen.headers["X-Request-ID"]) == 32  # one the gateway made up
