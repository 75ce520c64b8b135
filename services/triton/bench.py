"""Measure the local Triton: start-to-ready, sequential latency, throughput under concurrency.

    python -m services.triton.bench                 # start a server from TRITON_* settings
    python -m services.triton.bench --running       # measure the server `up` already started
    python -m services.triton.bench --protocol grpc --concurrency 8 --requests 400

Every request carries one PNG-encoded 8x8 digit from scikit-learn's bundled set, sent as it
is, and goes through the ensemble (decode, resize, normalise, classify), so the figures include
both python stubs and the batcher. A request that errors or lacks LOGITS of shape [1, classes]
counts as a failure. Also reported: the mean batch each model ran under concurrent load.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from services.triton.launcher import LocalTriton
from services.triton.settings import TritonSettings
from training.digits import digit_pixels, png

logger = logging.getLogger(__name__)

_COUNTER = re.compile(
    r'^(?P<name>nv_inference_count|nv_inference_exec_count)\{[^}]*model="(?P<model>[^"]+)"'
    r"[^}]*\} (?P<value>[0-9.e+]+)$"
)


def digit_pngs(count: int) -> list[bytes]:
    pixels, _ = digit_pixels()
    return [png(image) for image in pixels[:count]]


def make_infer(settings: TritonSettings, protocol: str) -> Callable[[bytes], None]:
    """A function sending one image through the ensemble with a client of its own thread."""
    module: Any = httpclient if protocol == "http" else grpcclient
    url = settings.http_url if protocol == "http" else settings.grpc_url
    local = threading.local()

    def infer(image: bytes) -> None:
        if not hasattr(local, "client"):
            local.client = module.InferenceServerClient(url)
        tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        logits = local.client.infer(settings.ensemble, [tensor]).as_numpy("LOGITS")
        if logits is None or logits.ndim != 2 or logits.shape[0] != 1:
            raise RuntimeError(f"bad answer: {logits!r}")

    return infer


def batching_counters(settings: TritonSettings) -> dict[str, tuple[float, float]]:
    """Per model, (inferences, executions) so far, from Triton's Prometheus metrics."""
    text = httpx.get(settings.metrics_url, timeout=5).text
    counters: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _COUNTER.match(line)
        if match:
            pair = counters.setdefault(match["model"], [0.0, 0.0])
            pair[0 if match["name"] == "nv_inference_count" else 1] += float(match["value"])
    return {model: (pair[0], pair[1]) for model, pair in counters.items()}


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q) * 1000.0)


def sequential(infer: Callable[[bytes], None], images: list[bytes], n: int) -> dict[str, float]:
    for image in images[:10]:  # warm-up: first calls pay for connections and lazy init
        infer(image)
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        infer(images[i % len(images)])
        latencies.append(time.perf_counter() - started)
    return {
        "requests": n,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "mean_ms": statistics.fmean(latencies) * 1000.0,
    }


def concurrent(
    infer: Callable[[bytes], None], images: list[bytes], n: int, clients: int
) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            infer(images[i % len(images)])
        except Exception:  # counted, not raised: the figure must say how many failed
            logger.exception("request %d failed", i)
            with lock:
                failures += 1
            return
        with lock:
            latencies.append(time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(clients * 2)))  # warm every client's connection
        latencies.clear()
        failures = 0  # warm-up failures are logged above; the figures cover the measured run
        started = time.perf_counter()
        list(pool.map(one, range(n)))
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": n,
        "failures": failures,
        "seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", action="store_true", help="use the server `up` started")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests")
    parser.add_argument("--concurrent-requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = TritonSettings()
    report: dict[str, Any] = {"protocol": args.protocol}
    triton = None if args.running else LocalTriton(settings)
    try:
        if triton is not None:
            started = time.perf_counter()
            triton.start()
            triton.wait_ready()
            report["start_to_ready_s"] = time.perf_counter() - started
        images = digit_pngs(64)
        infer = make_infer(settings, args.protocol)
        report["sequential"] = sequential(infer, images, args.requests)
        before = batching_counters(settings)
        report["concurrent"] = concurrent(infer, images, args.concurrent_requests, args.concurrency)
        after = batching_counters(settings)
        # Mean batch each model ran during the concurrent phase (1.0: no batching at all).
        report["concurrent"]["mean_batch"] = {
            model: round((count - before[model][0]) / max(1.0, execs - before[model][1]), 2)
            for model, (count, execs) in after.items()
            if count > before.get(model, (count, 0.0))[0]  # models that ran in this phase
        }
    finally:
        if triton is not None:
            triton.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["concurrent"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
