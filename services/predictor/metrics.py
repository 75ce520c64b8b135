"""The predictor's Prometheus metrics, all in one per-app registry (docs/architecture.md
"Metrics").

With ``PREDICTOR_WORKERS`` above 1, ``/metrics`` combines every worker's values: counters and
histograms add up, and each gauge's ``multiprocess_mode`` says how (in-flight and queue depth
add up; ``model_version`` is the lowest version a live worker serves, so it moves only once
every worker has reloaded; ``refused_versions`` the most any worker refused)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, http_metrics

NAMESPACE = "predictor"


@dataclass(frozen=True)
class PredictorMetrics:
    registry: CollectorRegistry
    http_duration: Histogram
    in_flight: Gauge
    grpc_duration: Histogram
    grpc_in_flight: Gauge
    queue_time: Histogram
    batch_size: Histogram
    inference_time: Histogram
    images: Counter
    reloads: Counter
    refused_versions: Gauge
    model_version: Gauge
    queue_depth: Gauge

    @classmethod
    def create(cls) -> PredictorMetrics:
        registry = CollectorRegistry()
        http_duration, in_flight = http_metrics(registry, NAMESPACE)
        return cls(
            registry=registry,
            http_duration=http_duration,
            in_flight=in_flight,
            grpc_duration=Histogram(
                "grpc_request_duration_seconds",
                "Time of one gRPC call, by method and status code.",
                ["method", "code"],
                namespace=NAMESPACE,
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            grpc_in_flight=Gauge(
                "grpc_requests_in_flight",
                "gRPC calls being handled now.",
                namespace=NAMESPACE,
                registry=registry,
                multiprocess_mode="livesum",
            ),
            queue_time=Histogram(
                "queue_time_seconds",
                "Time an image waited in the batcher's queue before its batch started.",
                namespace=NAMESPACE,
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            batch_size=Histogram(
                "batch_size",
                "Images per inference call.",
                namespace=NAMESPACE,
                registry=registry,
                buckets=BATCH_BUCKETS,
            ),
            inference_time=Histogram(
                "inference_time_seconds",
                "Time of one inference call (stacking the batch and running the engine).",
                namespace=NAMESPACE,
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            images=Counter(
                "images",
                "Images classified, by route.",
                ["route"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            reloads=Counter(
                "model_reloads",
                "New versions seen by the hot reloader, by result (loaded or refused).",
                ["result"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            refused_versions=Gauge(
                "refused_versions",
                "Published versions this server refused (failed verification or loading), at "
                "start-up or on reload; /readyz lists them with the reason.",
                namespace=NAMESPACE,
                registry=registry,
                multiprocess_mode="livemax",
            ),
            model_version=Gauge(
                "model_version",
                "Version being served (0 before the first load).",
                namespace=NAMESPACE,
                registry=registry,
                multiprocess_mode="livemin",
            ),
            queue_depth=Gauge(
                "queue_depth",
                "Images waiting for a batch now.",
                namespace=NAMESPACE,
                registry=registry,
                multiprocess_mode="livesum",
            ),
        )
