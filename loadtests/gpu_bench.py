"""``python -m loadtests.gpu_bench``: the predictor on a CUDA host, end to end (`make gpu-bench`).

    python -m loadtests.gpu_bench --repo model_repository --workers 1 4 --seconds 10

For every worker count (``PREDICTOR_WORKERS``) and precision (fp32, and fp16 through
``PREDICTOR_FP16``: TorchScript on CUDA), it starts the predictor itself on the device and
drives it from this process, on the same host, with the harness's closed-loop keep-alive client:
``POST /predict`` with one held-out digit per request (``image``) and with 64 of them
(``images``). Per cell it prints images/s end to end, client-side p50/p99, the server-side p50
of ``/predict`` read from the predictor's own request histogram (the time inside the server,
which the client's own overhead does not inflate), errors, and the GPU's mean utilisation from
``nvidia-smi`` sampled while the cell ran.

The performance issue's targets, on one H100/H200: at least 50,000 images/s end to end with
64-image requests, and a batch-1 server-side p50 of at most 1 ms. They are printed beside the
figures, never asserted. ``--device cpu`` runs the same bench on a machine without a GPU (the
test suite does, to keep the command working); its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests.harness import (
    BenchError,
    HttpSender,
    PinnedProcess,
    http_request,
    measure,
    run_main,
    service,
    serving_line,
)
from loadtests.predictor_bench import MODEL
from training.digits import held_out_pngs

TARGET_IMAGES_PER_S = 50_000
TARGET_SERVER_P50_MS = 1.0
#: The predictor's request-duration histogram (seconds), by route and status.
DURATION = "predictor_http_request_duration_seconds"


@dataclass
class Cell:
    workers: int
    precision: str
    images_per_request: int
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    server_p50_ms: float
    gpu_util: float | None


def predict_bodies(images_per_request: int, count: int = 8) -> list[bytes]:
    """``/predict`` bodies: one digit as ``image``, or ``images_per_request`` of them."""
    pngs = held_out_pngs(max(count, images_per_request))
    texts = [base64.b64encode(png).decode() for png in pngs]
    if images_per_request == 1:
        return [json.dumps({"image": text, "top_k": 1}).encode() for text in texts[:count]]
    return [
        json.dumps(
            {"images": [texts[(i + j) % len(texts)] for j in range(images_per_request)], "top_k": 1}
        ).encode()
        for i in range(count)
    ]


def start(repo: Path, device: str, workers: int, precision: str, port: int) -> PinnedProcess:
    env = {
        "PREDICTOR_REPOSITORY": str(repo),
        "PREDICTOR_PORT": str(port),
        "PREDICTOR_GRPC_PORT": "0",
        "PREDICTOR_ENGINE": "torchscript",
        "PREDICTOR_DEVICE": device,
        "PREDICTOR_FP16": "1" if precision == "fp16" else "0",
        "PREDICTOR_WORKERS": str(workers),
        "PREDICTOR_POLL_INTERVAL_S": "0",
        "PREDICTOR_LOG_LEVEL": "warning",
    }
    return service("predictor", env, None, port)


def duration_buckets(port: int) -> dict[float, float]:
    """Cumulative ``/predict`` 200 counts by upper bound (seconds), from ``/metrics``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != DURATION:
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == DURATION + "_bucket"
                and labels.get("route") == "/predict"
                and labels.get("status") == "200"
            ):
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_p50_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The median of the requests between two scrapes, interpolated inside its bucket the way
    Prometheus' ``histogram_quantile`` does."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = counts[-1] / 2.0
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000.0
            inside = cumulative - below
            share = (rank - below) / inside if inside else 0.0
            return (lower + (bound - lower) * share) * 1000.0
        lower, below = bound, cumulative
    return float("nan")


@contextmanager
def gpu_utilisation() -> Iterator[list[float]]:
    """Samples of the GPUs' mean utilisation (%) every 0.5 s while the block runs; empty where
    nvidia-smi is absent."""
    samples: list[float] = []
    smi = shutil.which("nvidia-smi")
    stop = threading.Event()

    def sample() -> None:
        while smi and not stop.wait(0.5):
            done = subprocess.run(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            )
            values = [float(v) for v in done.stdout.split() if v.strip().isdigit()]
            if values:
                samples.append(sum(values) / len(values))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=5)


def run_cell(
    port: int,
    workers: int,
    precision: str,
    images: int,
    concurrency: int,
    args: argparse.Namespace,
) -> Cell:
    requests = [http_request("/predict", body, port) for body in predict_bodies(images)]
    before = duration_buckets(port)
    with gpu_utilisation() as samples:
        loop, _ = measure(
            HttpSender.connector(port, requests),
            concurrency,
            {},
            seconds=args.seconds,
            warmup_s=args.warmup,
        )
    after = duration_buckets(port)
    return Cell(
        workers=workers,
        precision=precision,
        images_per_request=images,
        concurrency=concurrency,
        requests=loop.requests,
        errors=loop.errors,
        images_per_s=loop.rps * images,
        p50_ms=loop.percentile_ms(50),
        p99_ms=loop.percentile_ms(99),
        server_p50_ms=histogram_p50_ms(before, after),
        gpu_util=sum(samples) / len(samples) if samples else None,
    )


def table(cells: list[Cell]) -> str:
    rows = [
        "| workers | precision | images/request | concurrency | images/s | p50 ms | p99 ms "
        "| server p50 ms | errors | GPU util |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        util = f"{c.gpu_util:.0f}%" if c.gpu_util is not None else "n/a"
        rows.append(
            f"| {c.workers} | {c.precision} | {c.images_per_request} | {c.concurrency} "
            f"| {c.images_per_s:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.server_p50_ms:.2f} "
            f"| {c.errors} | {util} |"
        )
    return "\n".join(rows)


def verdict(cells: list[Cell]) -> list[str]:
    lines = []
    batched = [c for c in cells if c.images_per_request > 1]
    if batched:
        best = max(batched, key=lambda c: c.images_per_s)
        ok = "meets" if best.images_per_s >= TARGET_IMAGES_PER_S else "misses"
        lines.append(
            f"best batched: {best.images_per_s:.0f} images/s ({best.workers} workers, "
            f"{best.precision}, {best.images_per_request} images/request; {ok} the target of "
            f">= {TARGET_IMAGES_PER_S} images/s)"
        )
    single = [c for c in cells if c.images_per_request == 1 and c.server_p50_ms == c.server_p50_ms]
    if single:
        best = min(single, key=lambda c: c.server_p50_ms)
        ok = "meets" if best.server_p50_ms <= TARGET_SERVER_P50_MS else "misses"
        lines.append(
            f"lowest batch-1 server-side p50: {best.server_p50_ms:.2f} ms ({best.workers} "
            f"workers, {best.precision}; {ok} the target of <= {TARGET_SERVER_P50_MS:g} ms)"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):
        import torch  # only here: the CPU path needs no torch in the load generator

        if not torch.cuda.is_available():
            raise BenchError("no CUDA device here: run it on a GPU host, or pass --device cpu")
    cells: list[Cell] = []
    for workers in args.workers:
        for precision in args.precision:
            server = start(args.repo, args.device, workers, precision, args.port)
            try:
                server.wait_ready(timeout_s=300)
                for images in args.images:
                    for concurrency in args.concurrency:
                        cell = run_cell(args.port, workers, precision, images, concurrency, args)
                        print(
                            f"workers={workers} {precision} images={images} c={concurrency}: "
                            f"{cell.images_per_s:.0f} images/s",
                            file=sys.stderr,
                        )
                        cells.append(cell)
            finally:
                server.stop()
    print(
        f"predictor (torchscript) on {args.device}, load generator on the same host; "
        f"{args.seconds:g}s per cell after {args.warmup:g}s warm-up"
    )
    print(serving_line("predictor", args.repo, MODEL) + "\n")
    print(table(cells) + "\n")
    print("\n".join(verdict(cells)))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=2))
    return 0 if all(c.errors == 0 and c.requests > 0 for c in cells) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke run)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--precision", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"]
    )
    parser.add_argument("--images", type=int, nargs="+", default=[1, 64], help="per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time per cell")
    parser.add_argument("--port", type=int, default=18961)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
