"""Compare mode across model versions, and the metrics a dashboard can read from the start.

The engines here are in-process fakes behind real :class:`EngineGuard` objects (the gateway's
own code path from the guard up); the real engines on different versions are in
tests/stack/test_versions.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import BATCH_BUCKETS
from services.gateway.app import create_app
from services.gateway.backends import Answer, EncodedImage, Readiness
from services.gateway.metrics import (
    COMPARE_RESULTS,
    GATEWAY_ERRORS,
    UPSTREAM_ERROR_KINDS,
    GatewayMetrics,
)
from services.gateway.resilience import EngineGuard
from services.gateway.routing import Router
from services.gateway.settings import BackendName
from services.predictor.metrics import PredictorMetrics
from tests.gateway.conftest import isolated_settings
from tests.processes import free_port

IMAGE = EncodedImage(data=b"png")


class VersionedBackend:
    """An engine that answers every image with one label, from one model version."""

    precisions = frozenset(("fp32",))

    def __init__(self, name: BackendName, version: str, label: str) -> None:
        self.name = name
        self.version = version
        self.label = label

    async def predict(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: str = "fp32",
    ) -> Answer:
        prediction = {"label": self.label, "class_id": int(self.label), "score": 1.0}
        return Answer("classifier", self.version, [[prediction] for _ in images])

    async def check_ready(self) -> Readiness:
        return Readiness(True, f"classifier v{self.version}", self.version)

    async def aclose(self) -> None:
        pass


async def compare(*engines: tuple[BackendName, str, str]) -> tuple[dict[str, object], Router]:
    settings = isolated_settings()
    metrics = GatewayMetrics.create(settings.backends)
    guards = {}
    for name, version, label in engines:
        guard = EngineGuard(VersionedBackend(name, version, label), settings, metrics)  # type: ignore[arg-type]
        await guard.check()
        guards[name] = guard
    router = Router(settings, guards, metrics)
    status, body = await router.compare([IMAGE], 1, "id", single=True)
    assert status == 200
    return body, router


def sample(router: Router, name: str, **labels: str) -> float | None:
    return router.metrics.registry.get_sample_value(name, labels)


async def test_engines_on_the_same_version_are_compared() -> None:
    body, router = await compare(
        ("predictor", "2", "3"), ("torchserve", "2", "3"), ("triton", "2", "3")
    )
    assert body["agree"] is True and body["version_mismatch"] is False
    assert body["versions"] == {"predictor": "2", "torchserve": "2", "triton": "2"}
    assert sample(router, "gateway_compare_version_mismatches_total") == 0
    assert sample(router, "gateway_compare_total", result="agree") == 1


async def test_different_labels_on_different_versions_are_no_disagreement() -> None:
    """Version 2 on the predictor may rightly answer 5 where version 1 answers 3: only the two
    engines on version 1 are compared, and the mismatch is reported and counted."""
    body, router = await compare(
        ("predictor", "2", "5"), ("torchserve", "1", "3"), ("triton", "1", "3")
    )
    assert body["agree"] is True
    assert body["version_mismatch"] is True
    assert body["versions"] == {"predictor": "2", "torchserve": "1", "triton": "1"}
    results = {r["backend"]: r for r in body["results"]}  # type: ignore[attr-defined]
    assert results["predictor"]["version"] == "2" and results["predictor"]["agrees"] is None
    assert results["torchserve"]["agrees"] is True and results["triton"]["agrees"] is True
    assert sample(router, "gateway_compare_version_mismatches_total") == 1
    assert sample(router, "gateway_compare_total", result="agree") == 1


async def test_a_disagreement_within_one_version_is_reported() -> None:
    body, router = await compare(
        ("predictor", "2", "5"), ("torchserve", "1", "3"), ("triton", "1", "4")
    )
    assert body["agree"] is False and body["version_mismatch"] is True
    assert sample(router, "gateway_compare_total", result="disagree") == 1


async def test_every_engine_on_its_own_version_compares_nothing() -> None:
    body, router = await compare(
        ("predictor", "3", "5"), ("torchserve", "2", "3"), ("triton", "1", "4")
    )
    assert body["agree"] is None and body["version_mismatch"] is True
    assert sample(router, "gateway_compare_total", result="incomplete") == 1


async def test_error_failover_and_upstream_counters_exist_at_zero_from_the_start() -> None:
    """A fresh gateway's /metrics already has every known error, failover, upstream-error and
    compare series at 0, so a dashboard's rate() reads 0 rather than "no data"."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    settings = isolated_settings(predictor_url=nowhere, torchserve_url=nowhere, triton_url=nowhere)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    backends = settings.backends
    for status, code in GATEWAY_ERRORS:
        assert value("gateway_errors_total", status=status, code=code) == 0
    for backend in backends:
        for kind in UPSTREAM_ERROR_KINDS:
            assert value("gateway_upstream_errors_total", backend=backend, kind=kind) == 0
        for other in backends:
            if other != backend:
                pair = {"from_backend": backend, "to_backend": other}
                assert value("gateway_failovers_total", **pair) == 0
    for result in COMPARE_RESULTS:
        assert value("gateway_compare_total", result=result) == 0
    assert value("gateway_compare_version_mismatches_total") == 0


def test_the_predictor_batch_histogram_has_integer_buckets_from_one() -> None:
    metrics = PredictorMetrics.create()
    metrics.batch_size.observe(1)
    bounds = [
        s.labels["le"]
        for family in metrics.registry.collect()
        if family.name == "predictor_batch_size"
        for s in family.samples
        if s.name == "predictor_batch_size_bucket"
    ]
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64)
    assert bounds == ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "+Inf"]
    # A batch of 1 lands in the lowest bucket, so ceil(histogram_quantile) reads 1.
    value = metrics.registry.get_sample_value("predictor_batch_size_bucket", {"le": "1.0"})
    assert value == 1
