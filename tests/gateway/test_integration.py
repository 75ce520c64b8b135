"""The real gateway process in front of the three real engines: answers, compare mode,
failover when an engine dies, a bad-input battery that never reaches an engine, and metrics.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.conftest import PublishedModel
from tests.gateway.conftest import Engines, GatewayProcess
from tests.images import b64
from tests.metrics import metric_samples, sample_sum
from tests.processes import wait_for

pytestmark = pytest.mark.slow

BACKENDS = ("predictor", "torchserve", "triton")


def post(
    gateway: GatewayProcess, body: Any, backend: str | None = None, **kw: Any
) -> httpx.Response:
    params = {"backend": backend} if backend else None
    return httpx.post(gateway.url + "/predict", json=body, params=params, timeout=30, **kw)


def top1(predictions: list[dict[str, Any]]) -> int:
    return int(predictions[0]["class_id"])


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["error"] and isinstance(body["error"], str)
    if code is not None:
        assert body["code"] == code, body


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_gives_the_eager_models_top1(
    gateway: GatewayProcess, published_model: PublishedModel, backend: str
) -> None:
    images = published_model.images
    labels = published_model.manifest.labels
    # All test images in one request ...
    response = post(gateway, {"images": [b64(i) for i in images], "top_k": 3}, backend)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Backend"] == backend == body["backend"]
    assert body["model"] == published_model.model
    assert body["version"] == str(published_model.version)
    assert [top1(p) for p in body["predictions"]] == published_model.expected_top1
    for predictions in body["predictions"]:
        assert len(predictions) == 3
        assert [p["label"] for p in predictions] == [labels[p["class_id"]] for p in predictions]
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True) and 0.0 < scores[0] <= 1.0
    # ... and single images, one per request.
    for image, expected in list(zip(images, published_model.expected_top1, strict=True))[:8]:
        response = post(gateway, {"image": b64(image), "top_k": 1}, backend)
        assert response.status_code == 200, response.text
        assert [top1(response.json()["predictions"])] == [expected]


def test_engines_give_the_same_scores(
    gateway: GatewayProcess, published_model: PublishedModel
) -> None:
    """One schema for three engines: same classes, same (softmax) scores to ~1e-5."""
    body = {"images": [b64(i) for i in published_model.images[:8]], "top_k": 10}
    answers = {b: post(gateway, body, b).json()["predictions"] for b in BACKENDS}
    for backend in ("torchserve", "triton"):
        for ours, theirs in zip(answers["predictor"], answers[backend], strict=True):
            ours_by_class = {p["class_id"]: p["score"] for p in ours}
            theirs_by_class = {p["class_id"]: p["score"] for p in theirs}
            assert ours_by_class.keys() == theirs_by_class.keys()
            for class_id, score in ours_by_class.items():
                assert theirs_by_class[class_id] == pytest.approx(score, abs=1e-4), backend


def test_default_backend_headers_and_request_id(
    gateway: GatewayProcess, published_model: PublishedModel
) -> None:
    image = published_model.images[0]
    request_id = f"test-{uuid.uuid4().hex}"
    response = post(
        gateway,
        {"image": f"data:image/png;base64,{b64(image)}"},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend"] == "predictor" == response.json()["backend"]
    assert response.headers["X-Request-ID"] == request_id
    assert len(response.json()["predictions"]) == 5  # top_k defaults to 5
    # A request without an id gets a fresh one; a malformed id is replaced, not echoed.
    first = post(gateway, {"image": b64(image)})
    second = post(gateway, {"image": b64(image)}, headers={"X-Request-ID": "bad id\twith tabs"})
    ids = {first.headers["X-Request-ID"], second.headers["X-Request-ID"]}
    assert len(ids) == 2 and "bad id\twith tabs" not in ids


def test_compare_mode_reports_agreement(
    gateway: GatewayProcess, published_model: PublishedModel
) -> None:
    count = 16
    labels = published_model.manifest.labels
    expected = [labels[i] for i in published_model.expected_top1[:count]]
    response = post(gateway, {"images": [b64(i) for i in published_model.images[:count]]}, "all")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "all"
    assert body["agree"] is True
    assert sorted(body["answered"]) == sorted(BACKENDS)
    assert sorted(response.headers["X-Backend"].split(",")) == sorted(BACKENDS)
    for result in body["results"]:
        assert result["status"] == 200, result
        assert result["agrees"] is True
        assert result["top1"] == expected
        assert result["version"] == str(published_model.version)
        assert len(result["predictions"]) == count
        assert result["latency_ms"] > 0
    # Each engine's predictions take the request's form, as a routed answer does: a list per
    # image for `images` (even of one), one flat list for `image`.
    one = b64(published_model.images[0])
    as_list = post(gateway, {"images": [one]}, "all").json()["results"]
    as_image = post(gateway, {"image": one}, "all").json()["results"]
    assert [type(r["predictions"][0]) for r in as_list] == [list] * len(BACKENDS)
    for listed, single in zip(as_list, as_image, strict=True):
        assert [p["class_id"] for p in listed["predictions"][0]] == [
            p["class_id"] for p in single["predictions"]
        ]
    # An image every engine refuses is the caller's mistake in compare mode too.
    refused = post(gateway, {"image": b64(b"not an image")}, "all")
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "not_an_image"
    assert [r["status"] for r in refused.json()["results"]] == [400, 400, 400]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_engines_bad_input_verdict_is_a_4xx(
    gateway: GatewayProcess, published_model: PublishedModel, backend: str
) -> None:
    """Valid base64 that is no image passes the edge; each engine refuses it, the gateway
    answers 400 in its own error shape, and the engine stays in service."""
    not_an_image = post(gateway, {"image": b64(b"this is not an image")}, backend)
    assert_error(not_an_image, 400, "not_an_image")
    assert not_an_image.headers["X-Backend"] == backend
    truncated = post(gateway, {"image": b64(published_model.images[0][:40])}, backend)
    assert 400 <= truncated.status_code < 500, truncated.text
    assert_error(truncated, truncated.status_code)
    body = {"images": [b64(published_model.images[0]), b64(b"\x89PNG nonsense")]}
    assert_error(post(gateway, body, backend), 400)
    readiness = gateway.readiness()
    assert readiness is not None and readiness["backends"][backend]["ready"] is True
    good = post(gateway, {"image": b64(published_model.images[0])}, backend)
    assert good.status_code == 200


def battery(published_model: PublishedModel) -> list[tuple[str, dict[str, Any], int, str]]:
    """(name, httpx.post keyword arguments, status, code): mistakes the edge must catch."""
    good = b64(published_model.images[0])
    too_big = b"{" + b" " * (10 * 1024 * 1024 + 10) + b"}"
    as_json = {"content-type": "application/json"}

    def chunks() -> Any:
        yield b'{"image": "'
        for _ in range(11):
            yield b"A" * (1024 * 1024)
        yield b'"}'

    return [
        ("text body", {"content": good, "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("no content type", {"content": b'{"image": "x"}'}, 415, "unsupported_media_type"),
        ("broken json", {"content": b'{"image": ', "headers": as_json}, 400, "invalid_json"),
        ("json array", {"json": [good]}, 422, "invalid_request"),
        ("json string", {"json": good}, 422, "invalid_request"),
        ("empty object", {"json": {}}, 422, "invalid_request"),
        ("image and images", {"json": {"image": good, "images": [good]}}, 422, "invalid_request"),
        ("image is a number", {"json": {"image": 12}}, 422, "invalid_request"),
        ("image is null", {"json": {"image": None}}, 422, "invalid_request"),
        ("images is a string", {"json": {"images": good}}, 422, "invalid_request"),
        ("images empty", {"json": {"images": []}}, 422, "empty_images"),
        ("unknown field", {"json": {"image": good, "model": "x"}}, 422, "invalid_request"),
        ("top_k zero", {"json": {"image": good, "top_k": 0}}, 422, "invalid_request"),
        ("top_k huge", {"json": {"image": good, "top_k": 1001}}, 422, "invalid_request"),
        ("top_k string", {"json": {"image": good, "top_k": "3"}}, 422, "invalid_request"),
        ("not base64", {"json": {"image": "this is not base64!"}}, 400, "invalid_base64"),
        ("bad padding", {"json": {"image": good[:-3]}}, 400, "invalid_base64"),
        ("empty image", {"json": {"image": ""}}, 400, "empty_image"),
        ("one bad of many", {"json": {"images": [good, "%%%"]}}, 400, "invalid_base64"),
        ("too many images", {"json": {"images": [good] * 65}}, 413, "too_many_images"),
        ("declared too large", {"content": too_big, "headers": as_json}, 413, "payload_too_large"),
        ("streamed too large", {"content": chunks(), "headers": as_json}, 413, "payload_too_large"),
    ]  # fmt: skip


def test_bad_input_battery_is_refused_at_the_edge(
    gateway: GatewayProcess, engines: Engines, published_model: PublishedModel
) -> None:
    before_engines = engines.request_counts()
    before = metric_samples(httpx.get(gateway.url + "/metrics", timeout=5).text)
    cases = battery(published_model)
    answered = 0
    for index, (name, kwargs, status, code) in enumerate(cases):
        backend = BACKENDS[index % len(BACKENDS)]
        response = httpx.post(
            gateway.url + "/predict", params={"backend": backend}, timeout=30, **kwargs
        )
        assert response.status_code == status, (name, response.text)
        assert_error(response, status, code)
        assert "X-Request-ID" in response.headers
        answered += 1
    unknown = post(gateway, {"image": b64(published_model.images[0])}, "tensorflow")
    assert_error(unknown, 400, "unknown_backend")

    after = metric_samples(httpx.get(gateway.url + "/metrics", timeout=5).text)
    assert engines.request_counts() == before_engines  # no engine saw any of them
    upstream = "gateway_upstream_duration_seconds_count"
    assert sample_sum(after, upstream) == sample_sum(before, upstream)
    # Everything the app saw is counted under backend "none" (the two 413s for the body size
    # are answered by the middleware in front of it and counted by the HTTP histogram).
    refused = "gateway_request_duration_seconds_count"
    assert (
        sample_sum(after, refused, backend="none") - sample_sum(before, refused, backend="none")
        == answered - 2 + 1
    )


def test_metrics_count_every_request_by_backend(
    gateway: GatewayProcess, published_model: PublishedModel
) -> None:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    for name in (
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_http_requests_in_flight",
        "gateway_failovers_total",
        "gateway_upstream_errors_total",
        "gateway_errors_total",
        "gateway_compare_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    before = metric_samples(text)
    sent = {"predictor": 3, "torchserve": 2, "triton": 4}
    image = b64(published_model.images[1])
    for backend, count in sent.items():
        for _ in range(count):
            assert post(gateway, {"image": image}, backend).status_code == 200
    assert post(gateway, {"image": image}, "all").status_code == 200
    after = metric_samples(httpx.get(gateway.url + "/metrics", timeout=5).text)

    def delta(name: str, **labels: str) -> float:
        return sample_sum(after, name, **labels) - sample_sum(before, name, **labels)

    model = published_model.model
    for backend, count in sent.items():
        labels = {"backend": backend, "model": model, "status": "200"}
        assert delta("gateway_request_duration_seconds_count", **labels) == count
        # every request falls in the +Inf bucket, and took some time
        assert delta("gateway_request_duration_seconds_bucket", le="+Inf", **labels) == count
        assert delta("gateway_request_duration_seconds_sum", **labels) > 0
        # one upstream call per request, plus one from compare mode
        upstream = {"backend": backend, "outcome": "ok"}
        assert delta("gateway_upstream_duration_seconds_count", **upstream) == count + 1
    compare = {"backend": "all", "model": model, "status": "200"}
    assert delta("gateway_request_duration_seconds_count", **compare) == 1
    # The HTTP histogram every service has counts them under the route template.
    http = {"method": "POST", "route": "/predict", "status": "200"}
    assert delta("gateway_http_request_duration_seconds_count", **http) == sum(sent.values()) + 1
    assert delta("gateway_compare_total", result="agree") == 1


def test_failover_when_the_predictor_dies_and_back_when_it_returns(
    gateway: GatewayProcess, engines: Engines, published_model: PublishedModel
) -> None:
    image = b64(published_model.images[2])
    expected = published_model.expected_top1[2]
    before = metric_samples(httpx.get(gateway.url + "/metrics", timeout=5).text)
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()
    wrong: list[Any] = []
    unanswered: list[str] = []  # a transport error would otherwise end its thread unseen
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post(
                        gateway.url + "/predict", json={"image": image, "top_k": 1}
                    )
                except httpx.HTTPError as exc:
                    unanswered.append(repr(exc))
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    body = response.json()
                    served[body["backend"]] += 1
                    if top1(body["predictions"]) != expected:
                        wrong.append(body)

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: served["predictor"] >= 20, 60, "requests served by the predictor")
        engines.predictor.kill()  # mid-traffic
        served_before = sum(served.values())
        wait_for(lambda: sum(served.values()) >= served_before + 40, 60, "requests after the kill")

        def predictor_down() -> bool:
            body = gateway.readiness()
            return body is not None and body["backends"]["predictor"]["ready"] is False

        wait_for(predictor_down, 30, "/readyz to report the predictor down")
        readiness = gateway.readiness()
        assert readiness is not None and readiness["ready"] is True  # the others still answer
        assert readiness["backends"]["torchserve"]["ready"] is True
        stop.set()
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
        if not engines.predictor.alive:
            engines.predictor.start()

    assert not wrong
    assert not unanswered
    assert set(statuses) == {200}, statuses  # no 5xx (nor anything else) while it was down
    assert served["torchserve"] > 0  # the next engine in failover order took over
    after = metric_samples(httpx.get(gateway.url + "/metrics", timeout=5).text)
    failovers = sample_sum(
        after, "gateway_failovers_total", from_backend="predictor", to_backend="torchserve"
    ) - sample_sum(
        before, "gateway_failovers_total", from_backend="predictor", to_backend="torchserve"
    )
    assert failovers == served["torchserve"]

    # A request while it is down says who answered and whom it stood in for.
    # (The predictor was restarted above; wait for the gateway to see it.)
    def predictor_back() -> bool:
        body = gateway.readiness()
        return body is not None and body["backends"]["predictor"]["ready"] is True

    wait_for(predictor_back, 60, "/readyz to report the predictor ready again")
    response = post(gateway, {"image": image, "top_k": 1})
    assert response.status_code == 200
    assert response.headers["X-Backend"] == "predictor"
    assert "X-Failover-From" not in response.headers
    assert top1(response.json()["predictions"]) == expected


def test_a_failed_over_answer_names_who_served_it(
    gateway: GatewayProcess, engines: Engines, published_model: PublishedModel
) -> None:
    engines.predictor.kill()
    try:
        response = post(gateway, {"image": b64(published_model.images[3])}, "predictor")
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == "torchserve" == response.headers["X-Backend"]
        assert response.headers["X-Failover-From"] == "predictor"
        compare = post(gateway, {"image": b64(published_model.images[3])}, "all")
        assert compare.status_code == 200
        body = compare.json()
        assert sorted(body["answered"]) == ["torchserve", "triton"]
        assert body["agree"] is True
        predictor = next(r for r in body["results"] if r["backend"] == "predictor")
        assert predictor["status"] == 503 and "error" in predictor
    finally:
        engines.predictor.start()
    wait_for(
        lambda: (
            (gateway.readiness() or {}).get("backends", {}).get("predictor", {}).get("ready")
            is True
        ),
        60,
        "the predictor back in the gateway's view",
    )


def test_concurrent_predictor_requests_are_coalesced_and_split_back(
    gateway: GatewayProcess, published_model: PublishedModel
) -> None:
    """Under concurrency the gateway merges predictor requests into `images` calls: each client
    still gets exactly its own answer, and a bad image among them fails only its own request."""
    images = published_model.images[:24]
    expected = published_model.expected_top1[:24]
    results: dict[int, httpx.Response] = {}
    start = threading.Barrier(len(images) + 1)

    def send(index: int) -> None:
        body = {"image": b64(images[index]), "top_k": 1 + index % 2}  # two top_k groups
        if index == 5:
            body = {"image": b64(b"not an image at all")}
        start.wait()
        results[index] = post(gateway, body, "predictor")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(images)
    assert_error(results[5], 400, "not_an_image")
    for index, response in results.items():
        if index == 5:
            continue
        assert response.status_code == 200, response.text
        assert response.headers["X-Backend"] == "predictor"
        predictions = response.json()["predictions"]
        assert len(predictions) == 1 + index % 2
        assert top1(predictions) == expected[index], index
