"""Hostile and careless requests against the real server: each gets a 4xx JSON error with a
machine code, none gets a 5xx, and the server is still ready afterwards."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import PublishedModel
from tests.images import b64, png_bomb
from tests.metrics import Samples, metric_samples, sample_sum
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow

ELEVEN_MB = 11 * 1024 * 1024


@dataclass
class Case:
    name: str
    status: int
    code: str
    method: str = "POST"
    path: str = "/predict"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    streamed: bool = False  # send the body chunked, without Content-Length


def _cases(good: str, good_png: bytes) -> list[Case]:
    text = base64.b64encode(b"hello, this is not an image at all").decode()
    return [
        Case("invalid base64", 400, "invalid_base64", json={"image": "!!!not base64!!!"}),
        Case("bad base64 padding", 400, "invalid_base64", json={"image": "abcde"}),
        Case("base64 of text", 400, "not_an_image", json={"image": text}),
        Case("truncated png", 400, "corrupt_image", json={"image": b64(good_png[:60])}),
        Case("png bomb 20000x20000", 413, "image_too_large", json={"image": b64(png_bomb())}),
        Case("empty image string", 400, "empty_image", json={"image": ""}),
        Case(
            "data url of text/plain",
            400,
            "invalid_base64",
            json={"image": "data:text/plain;base64," + text},
        ),
        Case("non-ascii image", 400, "invalid_base64", json={"image": "ééé"}),
        Case("image is a number", 422, "invalid_request", json={"image": 123}),
        Case("images is a string", 422, "invalid_request", json={"images": good}),
        Case("images holds a number", 422, "invalid_request", json={"images": [good, 7]}),
        Case("empty images list", 422, "empty_images", json={"images": []}),
        Case("image and images", 422, "invalid_request", json={"image": good, "images": [good]}),
        Case("neither image nor images", 422, "invalid_request", json={}),
        Case("unknown field", 422, "invalid_request", json={"image": good, "colour": "red"}),
        Case("top_k is a string", 422, "invalid_request", json={"image": good, "top_k": "5"}),
        Case("top_k is zero", 422, "invalid_request", json={"image": good, "top_k": 0}),
        Case("top_k is a float", 422, "invalid_request", json={"image": good, "top_k": 2.5}),
        Case("body is a json list", 422, "invalid_request", json=[good]),
        Case(
            "one bad image among good ones",
            400,
            "corrupt_image",
            json={"images": [good, b64(good_png[:60]), good]},
        ),
        Case("too many images", 413, "too_many_images", json={"images": [good] * 65}),
        Case(
            "non-json body",
            400,
            "invalid_json",
            content=b"{this is not json",
            headers={"content-type": "application/json"},
        ),
        Case(
            "json nested past the parser's limit",
            400,
            "invalid_json",
            content=b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            headers={"content-type": "application/json"},
        ),
        Case(
            "image null beside images",
            422,
            "invalid_request",
            json={"image": None, "images": [good]},
        ),
        Case(
            "text/plain body",
            415,
            "unsupported_media_type",
            content=b'{"image": "x"}',
            headers={"content-type": "text/plain"},
        ),
        Case("no content type", 415, "unsupported_media_type", content=b'{"image": "x"}'),
        Case(
            "11 MB body",
            413,
            "payload_too_large",
            content=b"{" + b" " * ELEVEN_MB + b"}",
            headers={"content-type": "application/json"},
        ),
        Case(
            "11 MB chunked body without content-length",
            413,
            "payload_too_large",
            content=b" " * ELEVEN_MB,
            headers={"content-type": "application/json"},
            streamed=True,
        ),
        Case("GET on /predict", 405, "method_not_allowed", method="GET"),
        Case("unknown path", 404, "not_found", path="/predictions"),
        Case(
            "v2 infer of garbage",
            400,
            "invalid_json",
            path="/v2/models/classifier/infer",
            content=b"\x00\x01garbage",
        ),
    ]


_CASE_NAMES = [c.name for c in _cases("", b"")]


@pytest.fixture(scope="module")
def cases(published_model: PublishedModel) -> dict[str, Case]:
    png = published_model.images[0]
    return {c.name: c for c in _cases(b64(png), png)}


@pytest.fixture(scope="module")
def client(predictor: PredictorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=predictor.url, timeout=60) as client:
        yield client


@dataclass
class Battery:
    """The session server's /metrics before the first case, and how many cases were sent."""

    before: Samples
    sent: int = 0


@pytest.fixture(scope="module")
def battery(client: httpx.Client) -> Battery:
    return Battery(metric_samples(client.get("/metrics").text))


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("name", _CASE_NAMES)
def test_bad_input_is_a_clear_4xx(
    name: str, cases: dict[str, Case], client: httpx.Client, battery: Battery
) -> None:
    case = cases[name]
    content: Any = _chunks(case.content) if case.streamed and case.content else case.content
    battery.sent += 1
    response = client.request(
        case.method, case.path, json=case.json, content=content, headers=case.headers
    )
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}
    assert body["code"] == case.code
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]


def test_no_5xx_and_still_ready_after_the_battery(client: httpx.Client, battery: Battery) -> None:
    """Runs after the battery (file order): the server counted each case it was sent as a 4xx
    and none as a 5xx (other tests' requests on the session server do not count), and it
    still answers."""
    after = metric_samples(client.get("/metrics").text)
    name = "predictor_http_request_duration_seconds_count"

    def added(status_class: str) -> float:
        return sum(
            sample_sum(after, name, status=status) - sample_sum(battery.before, name, status=status)
            for status in {labels["status"] for n, labels, _ in after if n == name}
            if status.startswith(status_class)
        )

    assert added("4") == battery.sent
    assert added("5") == 0
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
