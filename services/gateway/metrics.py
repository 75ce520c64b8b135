"""The gateway's Prometheus metrics (docs/architecture.md "Metrics"), all in one per-app registry.

Label values are bounded: engine names from the settings (plus ``none`` for requests refused
at the edge and ``all`` for compare mode), the one configured model, HTTP status codes and
the fixed outcome kinds of :mod:`services.gateway.backends`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, http_metrics

NAMESPACE = "gateway"
#: ``backend`` label of a request answered before any engine was chosen (bad input, bad key).
NO_BACKEND = "none"
#: ``?backend=`` value of compare mode, and the ``backend`` label of such a request.
ALL_BACKENDS = "all"


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    http_duration: Histogram
    in_flight: Gauge
    request_duration: Histogram
    upstream_duration: Histogram
    upstream_errors: Counter
    failovers: Counter
    errors: Counter
    compare: Counter
    backend_ready: Gauge

    @classmethod
    def create(cls) -> GatewayMetrics:
        registry = CollectorRegistry()
        http_duration, in_flight = http_metrics(registry, NAMESPACE)
        return cls(
            registry=registry,
            http_duration=http_duration,
            in_flight=in_flight,
            request_duration=Histogram(
                "request_duration_seconds",
                "POST /predict from the body's arrival to the answer, by the engine that served "
                "it (none: refused at the edge; all: compare mode), model and HTTP status.",
                ["backend", "model", "status"],
                namespace=NAMESPACE,
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            upstream_duration=Histogram(
                "upstream_duration_seconds",
                "One call to an engine (retries included), by engine and outcome (ok, rejected, "
                "connect, unavailable, fault, timeout).",
                ["backend", "outcome"],
                namespace=NAMESPACE,
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            upstream_errors=Counter(
                "upstream_errors",
                "Engine calls that gave no answer, by engine and kind (connect, unavailable, "
                "fault, timeout, circuit_open).",
                ["backend", "kind"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            failovers=Counter(
                "failovers",
                "Requests answered by another engine than the one chosen for them.",
                ["from_backend", "to_backend"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            errors=Counter(
                "errors",
                "POST /predict answered with an error, by HTTP status and machine code.",
                ["status", "code"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            compare=Counter(
                "compare",
                "Compare-mode requests by result: agree (every answering engine gave the same "
                "top-1 labels), disagree, or incomplete (fewer than two engines answered).",
                ["result"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            backend_ready=Gauge(
                "backend_ready",
                "1 while an engine passes its readiness check and its circuit is not open.",
                ["backend"],
                namespace=NAMESPACE,
                registry=registry,
            ),
        )
