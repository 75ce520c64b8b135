"""Real TorchServe (Java frontend + Python worker) serving the published model."""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from services.torchserve.launcher import Instance, describe
from services.torchserve.logs import MAIN_LOG
from tests.conftest import PublishedModel
from tests.images import png_bomb

pytestmark = pytest.mark.slow

_METRIC_LINE = re.compile(
    r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$"
)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = _METRIC_LINE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


def batches_by_size(instance: Instance) -> dict[int, float]:
    """The handler's HandlerBatches counter from TorchServe's /metrics, per batch size."""
    text = httpx.get(f"{instance.settings.metrics_url}/metrics", timeout=10).text
    counts: dict[int, float] = {}
    for name, labels, value in parse_metrics(text):
        if name == "HandlerBatches" and labels.get("ModelName") == instance.settings.model:
            size = int(labels["BatchSize"])
            counts[size] = counts.get(size, 0.0) + value
    return counts


def worker_state(instance: Instance) -> list[tuple[int, str]]:
    entries = describe(instance.settings, instance.keys, instance.version)
    return [(int(w["pid"]), str(w["status"])) for e in entries for w in e["workers"]]


@pytest.fixture(scope="module")
def client(torchserve: Instance) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=torchserve.settings.inference_url,
        headers=torchserve.inference_headers,
        timeout=30,
        limits=httpx.Limits(max_connections=32),
    ) as session:
        yield session


def predict(
    client: httpx.Client, instance: Instance, body: bytes, **headers: str
) -> httpx.Response:
    return client.post(f"/predictions/{instance.settings.model}", content=body, headers=headers)


def check_prediction(body: dict[str, Any], published_model: PublishedModel, top_k: int) -> None:
    assert body["model"] == published_model.model
    assert body["version"] == str(published_model.version)
    assert body["backend"] == "torchserve"
    predictions = body["predictions"]
    assert len(predictions) == top_k
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for p in predictions:
        assert p["label"] == published_model.manifest.labels[p["class_id"]]


def test_top1_matches_the_eager_model(
    torchserve: Instance, client: httpx.Client, published_model: PublishedModel
) -> None:
    got = []
    for image in published_model.images:
        response = predict(
            client, torchserve, image, **{"content-type": "application/octet-stream"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        check_prediction(body, published_model, top_k=5)
        got.append(body["predictions"][0]["class_id"])
    assert got == published_model.expected_top1


def test_json_body_and_top_k(
    torchserve: Instance, client: httpx.Client, published_model: PublishedModel
) -> None:
    image = published_model.images[0]
    expected = published_model.expected_top1[0]
    encoded = base64.b64encode(image).decode()
    url = f"/predictions/{torchserve.settings.model}"

    response = client.post(url, json={"image": encoded, "top_k": 3})
    assert response.status_code == 200, response.text
    check_prediction(response.json(), published_model, top_k=3)
    assert response.json()["predictions"][0]["class_id"] == expected

    response = client.post(url, json={"image": f"data:image/png;base64,{encoded}"})
    assert response.status_code == 200, response.text
    check_prediction(response.json(), published_model, top_k=5)

    response = predict(client, torchserve, image, **{"X-Top-K": "2"})
    assert response.status_code == 200, response.text
    check_prediction(response.json(), published_model, top_k=2)
    assert response.json()["predictions"][0]["class_id"] == expected


def test_concurrent_requests_are_batched(
    torchserve: Instance, client: httpx.Client, published_model: PublishedModel
) -> None:
    before = batches_by_size(torchserve)
    images = published_model.images
    start = threading.Barrier(16)

    def one(i: int) -> tuple[int, int]:
        if i < 16:
            start.wait(timeout=30)  # the first wave arrives together
        response = predict(client, torchserve, images[i % len(images)])
        assert response.status_code == 200, response.text
        return i, response.json()["predictions"][0]["class_id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(96)))
    for i, class_id in results:
        assert class_id == published_model.expected_top1[i % len(images)]

    # The frontend reads the worker's metric lines asynchronously: wait until all 96
    # requests are counted (a deadline, not a sleep), then look at the batch sizes.
    def grown() -> dict[int, float]:
        after = batches_by_size(torchserve)
        return {size: after.get(size, 0.0) - before.get(size, 0.0) for size in after}

    deadline = time.monotonic() + 15
    counted = grown()
    while sum(s * n for s, n in counted.items()) < 96 and time.monotonic() < deadline:
        time.sleep(0.1)
        counted = grown()
    assert sum(size * count for size, count in counted.items()) == 96, counted
    assert max(size for size, count in counted.items() if count > 0) > 1, counted
    assert (
        max(size for size, count in counted.items() if count > 0)
        <= torchserve.registration.batch_size
    )

    # The handler's own log line (the workers' lines go to ts_log.log) is a second witness.
    log = (torchserve.settings.log_dir / MAIN_LOG).read_text()
    assert max(int(m) for m in re.findall(r"batch_size=(\d+)", log)) > 1


BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("garbage bytes", b"\x00\x01\x02 definitely not an image", {}, 400, "not_an_image"),
    ("plain text", b"hello there", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("empty body", b"", {}, 400, "empty_image"),
    ("png bomb header", png_bomb(), {}, 413, "image_too_large"),
    ("bad json", b'{"image": ', {"content-type": "application/json"}, 400, "invalid_json"),
    ("json list", b"[1, 2]", {"content-type": "application/json"}, 422, "invalid_request"),
    ("json no image", b"{}", {"content-type": "application/json"}, 422, "invalid_request"),
    (
        "json unknown field",
        b'{"image": "aGk=", "x": 1}',
        {"content-type": "application/json"},
        422,
        "invalid_request",
    ),
    (
        "image not a string",
        b'{"image": 5}',
        {"content-type": "application/json"},
        422,
        "invalid_type",
    ),
    (
        "bad base64",
        b'{"image": "@@@"}',
        {"content-type": "application/json"},
        400,
        "invalid_base64",
    ),
    (
        "base64 of text",
        b'{"image": "aGVsbG8="}',
        {"content-type": "application/json"},
        400,
        "not_an_image",
    ),
    (
        "top_k string",
        b'{"image": "aGk=", "top_k": "x"}',
        {"content-type": "application/json"},
        422,
        "invalid_top_k",
    ),
    (
        "top_k bool",
        b'{"image": "aGk=", "top_k": true}',
        {"content-type": "application/json"},
        422,
        "invalid_top_k",
    ),
    (
        "top_k zero",
        b'{"image": "aGk=", "top_k": 0}',
        {"content-type": "application/json"},
        422,
        "invalid_top_k",
    ),
    ("bad X-Top-K", b"", {"X-Top-K": "many"}, 422, "invalid_top_k"),
]


def _bad_cases(
    published_model: PublishedModel,
) -> list[tuple[str, bytes, dict[str, str], int, str]]:
    png = published_model.images[0]
    return [
        *BAD_REQUESTS,
        ("truncated png", png[: len(png) // 2], {}, 400, "corrupt_image"),
        ("bad X-Top-K with image", png, {"X-Top-K": "0"}, 422, "invalid_top_k"),
    ]


def test_bad_input_gets_4xx_json_without_hurting_the_worker(
    torchserve: Instance, client: httpx.Client, published_model: PublishedModel
) -> None:
    workers_before = worker_state(torchserve)
    assert [status for _, status in workers_before] == ["READY"] * torchserve.registration.workers
    cases = _bad_cases(published_model)

    for name, body, headers, status, code in cases:
        response = predict(client, torchserve, body, **headers)
        assert response.status_code == status, (name, response.status_code, response.text)
        payload = response.json()
        assert set(payload) == {"error", "code"}, (name, payload)
        assert payload["code"] == code, (name, payload)
        assert isinstance(payload["error"], str) and payload["error"], name

    # Bad and good requests interleaved and concurrent: they share batches, and each one
    # still gets its own answer.
    jobs = [(c[1], c[2], c[3]) for c in cases] + [
        (image, {}, 200) for image in published_model.images[:32]
    ]
    jobs = jobs[::2] + jobs[1::2]

    def one(job: tuple[bytes, dict[str, str], int]) -> tuple[int, int]:
        body, headers, _ = job
        return predict(client, torchserve, body, **headers).status_code, job[2]

    with ThreadPoolExecutor(max_workers=12) as pool:
        for got, want in pool.map(one, jobs):
            assert got == want

    assert worker_state(torchserve) == workers_before  # same pid, still READY: no restart
    response = predict(client, torchserve, published_model.images[1])
    assert response.status_code == 200
    assert response.json()["predictions"][0]["class_id"] == published_model.expected_top1[1]


def test_oversized_body_is_refused_by_torchserve(
    torchserve: Instance, client: httpx.Client
) -> None:
    body = b"\x89PNG" + b"\0" * (torchserve.settings.max_request_bytes + 1)
    response = predict(client, torchserve, body)
    # TorchServe's HTTP layer answers this one itself (no JSON body): the gateway maps it.
    assert response.status_code == 413


def test_requests_without_the_right_token_are_refused(
    torchserve: Instance, published_model: PublishedModel
) -> None:
    url = torchserve.predictions_url()
    image = published_model.images[0]
    attempts = {
        "no token": {},
        "wrong token": {"Authorization": "Bearer not-the-key"},
        "management key": {"Authorization": f"Bearer {torchserve.keys.management}"},
    }
    for name, headers in attempts.items():
        response = httpx.post(url, content=image, headers=headers, timeout=10)
        # TorchServe 0.12 answers 400 InvalidKeyException (not 401) for a bad token.
        assert response.status_code in (400, 401, 403), name
        assert response.json()["type"] == "InvalidKeyException", name
    management = f"{torchserve.settings.management_url}/models/{torchserve.settings.model}"
    response = httpx.get(management, headers=torchserve.inference_headers, timeout=10)
    assert response.status_code in (400, 401, 403)
    assert httpx.get(management, headers=torchserve.management_headers).status_code == 200


def test_management_api_registers_only_archives_from_the_model_store(
    torchserve: Instance,
) -> None:
    models = f"{torchserve.settings.management_url}/models"
    for url in ("https://example.com/evil.mar", "file:///etc/passwd", "../evil.mar"):
        response = httpx.post(
            models, params={"url": url}, headers=torchserve.management_headers, timeout=30
        )
        assert response.status_code >= 400, (url, response.text)
    served = describe(torchserve.settings, torchserve.keys)
    assert {entry["modelName"] for entry in served} == {torchserve.settings.model}


def test_metrics_expose_ts_metrics(torchserve: Instance, client: httpx.Client) -> None:
    text = httpx.get(f"{torchserve.settings.metrics_url}/metrics", timeout=10).text
    samples = parse_metrics(text)
    names = {name for name, _, _ in samples}
    for name in (
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
        "HandlerBatches",
    ):
        assert name in names, name
    requests = [
        value
        for name, labels, value in samples
        if name == "ts_inference_requests_total"
        and labels.get("model_name") == torchserve.settings.model
    ]
    assert requests and sum(requests) > 0


def test_run_folder_keeps_the_keys_private(torchserve: Instance) -> None:
    assert torchserve.settings.run_path.stat().st_mode & 0o077 == 0
    assert torchserve.settings.key_file.stat().st_mode & 0o077 == 0
