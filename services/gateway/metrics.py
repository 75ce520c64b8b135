"""The gateway's Prometheus metrics (docs/architecture.md "Metrics"), all in one per-app registry.

Label values are bounded: engine names from the settings (plus ``none`` for requests refused
at the edge and ``all`` for compare mode), the one configured model, HTTP status codes and
the fixed outcome kinds of :mod:`services.gateway.backends`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, http_metrics

NAMESPACE = "gateway"
#: ``backend`` label of a request answered before any engine was chosen (bad input, bad key).
NO_BACKEND = "none"
#: ``?backend=`` value of compare mode, and the ``backend`` label of such a request.
ALL_BACKENDS = "all"
#: ``kind`` of an engine call that gave no answer (:mod:`services.gateway.backends`' error
#: kinds, plus ``circuit_open`` when the breaker refused the call before it was sent).
UPSTREAM_ERROR_KINDS = ("connect", "unavailable", "fault", "timeout", "circuit_open")
#: ``result`` of a compare-mode request (:meth:`services.gateway.routing.Router.compare`).
COMPARE_RESULTS = ("agree", "disagree", "incomplete")
#: (status, code) of the errors the gateway answers on its own: the edge's checks, routing,
#: the API key. An engine's verdict on an image passes its own code through and is counted
#: when it first happens.
GATEWAY_ERRORS = (
    ("400", "invalid_json"),
    ("400", "bad_request"),
    ("400", "unknown_backend"),
    ("401", "unauthorized"),
    ("413", "payload_too_large"),
    ("415", "unsupported_media_type"),
    ("422", "invalid_request"),
    ("503", "no_backend_available"),
    ("504", "timeout"),
)


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
    version_mismatches: Counter

    @classmethod
    def create(cls, backends: Sequence[str] = ()) -> GatewayMetrics:
        """The gateway's metrics; every error, failover and compare counter of ``backends``
        (the configured engines) exists at 0 from the start, so a dashboard's rate reads 0,
        not "no data", until something fails."""
        registry = CollectorRegistry()
        http_duration, in_flight = http_metrics(registry, NAMESPACE)
        metrics = cls(
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
                "Compare-mode requests by result: agree (the engines serving the same version "
                "gave the same top-1 labels), disagree, or incomplete (no two answering engines "
                "served the same version).",
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
            version_mismatches=Counter(
                "compare_version_mismatches",
                "Compare-mode requests whose answering engines served different model "
                "versions (labels are then compared only between engines on the same version).",
                namespace=NAMESPACE,
                registry=registry,
            ),
        )
        metrics.initialise(backends)
        return metrics

    def initialise(self, backends: Sequence[str]) -> None:
        """Create every known label combination at 0 (see :meth:`create`)."""
        for status, code in GATEWAY_ERRORS:
            self.errors.labels(status, code)
        for result in COMPARE_RESULTS:
            self.compare.labels(result)
        for backend in backends:
            self.backend_ready.labels(backend)
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(backend, kind)
            for other in backends:
                if other != backend:
                    self.failovers.labels(backend, other)
