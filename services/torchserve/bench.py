"""Start-to-ready time and sequential latency of a fresh local TorchServe instance.

    python -m services.torchserve.bench [--requests 200] [--warmup 10]

Starts its own instance (repository and model from TORCHSERVE_* settings; a temporary run
folder and free loopback ports, so a running stack is not disturbed), times ``up`` until the
model's worker is READY, sends ``--requests`` sequential requests over one keep-alive
connection (a 32x32 PNG of a drawn digit, raw bytes) and prints p50/p90/p99/mean in
milliseconds as JSON. The instance is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from services.torchserve.config import TorchServeSettings
from services.torchserve.launcher import down, up


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def digit_png() -> bytes:
    image = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(image).text((12, 10), "7", fill=255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)

    base = TorchServeSettings()
    ports = _free_ports(5)
    with tempfile.TemporaryDirectory(prefix="torchserve-bench-") as tmp:
        settings = base.model_copy(
            update={
                "run_dir": Path(tmp) / "run",
                "repository": base.repository_path,
                "inference_port": ports[0],
                "management_port": ports[1],
                "metrics_port": ports[2],
                "grpc_inference_port": ports[3],
                "grpc_management_port": ports[4],
            }
        )
        started = time.perf_counter()
        instance = up(settings)
        start_to_ready = time.perf_counter() - started
        try:
            body = digit_png()
            latencies = []
            with httpx.Client(headers=instance.inference_headers, timeout=30) as client:
                url = instance.predictions_url()
                for i in range(args.warmup + args.requests):
                    t0 = time.perf_counter()
                    response = client.post(url, content=body)
                    elapsed = time.perf_counter() - t0
                    if response.status_code != 200:
                        print(f"request {i} failed: {response.status_code} {response.text}")
                        return 1
                    if i >= args.warmup:
                        latencies.append(elapsed * 1e3)
        finally:
            down(settings)
    latencies.sort()
    report = {
        "model": settings.model,
        "version": instance.version,
        "start_to_ready_s": round(start_to_ready, 2),
        "requests": len(latencies),
        "max_batch_delay_ms": settings.max_batch_delay_ms,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "mean_ms": round(statistics.fmean(latencies), 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
