"""Prometheus helpers shared by the FastAPI services.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (not the process-global
default one) so that several apps can live in one test process without "duplicated timeseries"
errors. :class:`RequestMetrics` is a pure ASGI middleware that observes every HTTP request's
duration by method, route template (never the raw path: unknown paths would make unbounded
label values) and status code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, multiprocess
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics import MetricWrapperBase
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Seconds; fine at the bottom because the services answer in about a millisecond on a CPU.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Images per batch: integers, powers of two from 1 to the default request limit (64); larger
#: batches land in +Inf. Batch sizes are whole numbers while ``histogram_quantile`` interpolates
#: inside a bucket (from 0 in the lowest one), so the dashboard rounds its quantiles up with
#: ``ceil``: a p50 of batches that were all 1 reads 1, not 0.5.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

UNMATCHED_ROUTE = "unmatched"
#: Status label of a request whose client disconnected before any response (nginx's 499).
CLIENT_CLOSED = 499


def http_metrics(registry: CollectorRegistry, namespace: str) -> tuple[Histogram, Gauge]:
    """The request-duration histogram and in-flight gauge every service exposes."""
    duration = Histogram(
        "http_request_duration_seconds",
        "Time from request start to the last response byte, by route and status.",
        ["method", "route", "status"],
        namespace=namespace,
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )
    in_flight = Gauge(
        "http_requests_in_flight",
        "Requests being handled now.",
        namespace=namespace,
        registry=registry,
        multiprocess_mode="livesum",
    )
    return duration, in_flight


MetricT = TypeVar("MetricT", bound=MetricWrapperBase)


def labelled(metric: MetricT) -> Callable[..., MetricT]:
    """``metric.labels`` remembered per label values, for per-request paths: prometheus_client
    validates and joins the label values on every ``labels`` call, which costs more than the
    observation itself. Only for labels with few values (routes, statuses, backends)."""
    return functools.cache(metric.labels)


def route_label(scope: Scope) -> str:
    """The matched route's template (``/v2/models/{model}``), set by Starlette's router."""
    route = scope.get("route")
    if isinstance(route, BaseRoute):
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
    return UNMATCHED_ROUTE


class RequestMetrics:
    """Pure ASGI middleware observing :func:`http_metrics` for every HTTP request."""

    def __init__(self, app: ASGIApp, duration: Histogram, in_flight: Gauge) -> None:
        self.app = app
        self.duration = labelled(duration)
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Until a response starts: an exception becomes the server's 500; returning without
        # any response means the client went away first (nginx's 499), not a server error.
        status = CLIENT_CLOSED

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status == CLIENT_CLOSED:
                status = 500
            raise
        finally:
            self.in_flight.dec()
            self.duration(scope["method"], route_label(scope), str(status)).observe(
                time.perf_counter() - start
            )


#: The OpenAPI ``responses`` of every ``GET /metrics``: Prometheus text, not JSON (FastAPI would
#: document a route that returns a plain ``Response`` as JSON).
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


#: prometheus_client's switch to multiprocess mode: the folder every process writes its values
#: to (read when prometheus_client is first imported, so set before the workers start).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


@contextlib.contextmanager
def multiprocess_folder() -> Iterator[Path]:
    """A fresh, empty multiprocess folder in the environment for the workers this process is
    about to spawn, removed when they are done. Each gauge says how the workers' values combine
    (``multiprocess_mode``; ignored by a single process); counters and histograms add up."""
    folder = Path(tempfile.mkdtemp(prefix="prometheus-workers-"))
    previous = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def _forget_dead_workers(folder: str) -> None:
    """Drop the live gauges of workers that died (their supervisor replaced them), so that an
    in-flight or queue-depth sum does not count a process that is gone."""
    for entry in Path(folder).iterdir():
        match = _LIVE_GAUGE_FILE.match(entry.name)
        if match and not Path(f"/proc/{match[1]}").exists():
            multiprocess.mark_process_dead(int(match[1]), folder)  # type: ignore[no-untyped-call]


def metrics_response(registry: CollectorRegistry) -> Response:
    """``GET /metrics`` body in the Prometheus text format: ``registry``'s metrics, or, when
    the service runs as several workers, every worker's, combined."""
    folder = os.environ.get(MULTIPROCESS_ENV)
    if folder:
        _forget_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, folder)  # type: ignore[no-untyped-call]
    return Response(_generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
