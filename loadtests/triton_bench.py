"""``python -m loadtests.triton_bench``: Triton's start-to-ready, sequential latency, throughput.

    python -m loadtests.triton_bench                 # start a server from TRITON_* settings
    python -m loadtests.triton_bench --running       # measure the server `up` already started
    python -m loadtests.triton_bench --protocol grpc --concurrency 8 --requests 400

Every request carries one held-out digit as PNG, sent as it is, and goes through the ensemble
(decode, resize, normalise, classify), so the figures include both python stubs and the
batcher. Over HTTP a request is the binary tensor extension asking for the top class (as the
gateway asks), over gRPC the plain tensor; an error, or an answer without ``LOGITS`` for one
image, counts as a failure. Also reported: the mean batch each model ran under concurrent load,
the server's CPU per request, and the serving config of the version served.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.harness import (
    Connect,
    HttpSender,
    Loop,
    PinnedProcess,
    Sender,
    cpu_ms_per_request,
    group_cpu_seconds,
    http_ready,
    http_request,
    measure,
    parse_cpus,
    run_main,
    serving_config,
)
from loadtests.targets import AnswerError, parse_triton_classification
from services.triton.launcher import LocalTriton
from services.triton.protocol import IMAGE_INPUT, LOGITS_OUTPUT, binary_infer_request
from services.triton.settings import TritonSettings
from training.digits import held_out_pngs

_COUNTER = re.compile(
    r'^(?P<name>nv_inference_count|nv_inference_exec_count)\{[^}]*model="(?P<model>[^"]+)"'
    r"[^}]*\} (?P<value>[0-9.e+]+)$"
)
#: Warm-up of the sequential phase (first calls pay for connections and lazy init).
SEQUENTIAL_WARMUP = 10


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


def http_connector(settings: TritonSettings, images: list[bytes]) -> Connect:
    """Binary-tensor infer requests to the ensemble, each answer checked."""
    path = f"/v2/models/{settings.ensemble}/infer"
    requests = []
    for image in images:
        body, headers = binary_infer_request([image], 1)
        requests.append(http_request(path, body, settings.http_port, headers, settings.host))

    def check(status: int, body: bytes) -> bool:
        if status != 200:
            return False
        try:
            parse_triton_classification(body, settings.ensemble, 1)
        except AnswerError:
            return False
        return True

    return HttpSender.connector(settings.http_port, requests, check)


class GrpcSender:
    """One gRPC channel (tritonclient's asyncio client) sending the images in turn."""

    def __init__(self, client: Any, model: str, images: list[bytes], first: int) -> None:
        self.client = client
        self.model = model
        self.images = images
        self.next = first

    @classmethod
    def connector(cls, settings: TritonSettings, images: list[bytes]) -> Connect:
        async def connect(index: int) -> Sender:
            import tritonclient.grpc.aio as grpcaio  # here: Locust imports this module

            client = grpcaio.InferenceServerClient(settings.grpc_url)
            return cls(client, settings.ensemble, images, index)

        return connect

    async def send(self) -> bool:
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import InferenceServerException

        image = self.images[self.next % len(self.images)]
        self.next += 1
        tensor = grpcaio.InferInput(IMAGE_INPUT, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        try:
            result = await self.client.infer(self.model, [tensor])
        except InferenceServerException:
            return False
        logits = result.as_numpy(LOGITS_OUTPUT)
        return logits is not None and logits.ndim == 2 and logits.shape[0] == 1

    async def close(self) -> None:
        await self.client.close()


def phase(
    connect: Connect,
    concurrency: int,
    requests: int,
    warmup: int,
    server: Callable[[], float] | None,
    grpc: bool,
) -> tuple[Loop, float]:
    """One closed-loop phase; its figures and the server's CPU ms per request (NaN unknown)."""
    sources = {"server": server} if server is not None else {}
    loop, cpu = measure(
        connect,
        concurrency,
        sources,
        uvloop_ok=not grpc,  # grpc.aio wants asyncio's own loop
        requests=requests,
        warmup_requests=warmup,
    )
    cpu_ms = cpu_ms_per_request(cpu.seconds["server"], loop.completed) if server else float("nan")
    return loop, round(cpu_ms, 3)


def start(settings: TritonSettings, cpus: set[int] | None) -> PinnedProcess:
    """``python -m services.triton run`` (it becomes tritonserver) through the pinned runner."""
    base = f"http://{settings.http_url}"
    checks = [
        http_ready(f"{base}/v2/health/ready"),
        http_ready(f"{base}/v2/models/{settings.ensemble}/ready"),
    ]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return PinnedProcess(
        "tritonserver",
        [sys.executable, "-m", "services.triton", "run"],
        os.environ,
        cpus=cpus,
        ready=lambda: all(check() for check in checks),
        log=settings.run_dir / "bench-tritonserver.log",
    )


def run(args: argparse.Namespace) -> int:
    settings = TritonSettings()
    grpc = args.protocol == "grpc"
    report: dict[str, Any] = {"protocol": args.protocol}
    server = None if args.running else start(settings, args.server_cpus)
    try:
        if server is not None:
            report["start_to_ready_s"] = server.wait_ready(timeout_s=settings.ready_timeout_s)
            pgid: int | None = server.pid
        else:
            pgid = LocalTriton(settings).running_pid()
        cpu = (lambda: group_cpu_seconds(pgid)) if pgid is not None else None
        images = held_out_pngs(64)
        connector = GrpcSender.connector if grpc else http_connector
        connect = connector(settings, images)
        loop, cpu_ms = phase(connect, 1, args.requests, SEQUENTIAL_WARMUP, cpu, grpc)
        report["sequential"] = {
            "requests": loop.requests,
            "failures": loop.errors,
            "p50_ms": loop.percentile_ms(50),
            "p99_ms": loop.percentile_ms(99),
            "mean_ms": loop.mean_ms,
            "server_cpu_ms_per_request": cpu_ms,
        }
        before = batching_counters(settings)
        clients = args.concurrency
        loop, cpu_ms = phase(connect, clients, args.concurrent_requests, clients * 2, cpu, grpc)
        after = batching_counters(settings)
        report["concurrent"] = {
            "clients": clients,
            "requests": loop.requests,
            "failures": loop.errors,
            "seconds": loop.seconds,
            "throughput_rps": (loop.requests - loop.errors) / loop.seconds,
            "p50_ms": loop.percentile_ms(50),
            "p99_ms": loop.percentile_ms(99),
            # Mean batch each model ran during the concurrent phase (1.0: no batching at all).
            "mean_batch": {
                model: round((count - before[model][0]) / max(1.0, execs - before[model][1]), 2)
                for model, (count, execs) in after.items()
                if count > before.get(model, (count, 0.0))[0]  # models that ran in this phase
            },
            "server_cpu_ms_per_request": cpu_ms,
        }
    finally:
        if server is not None:
            server.stop(timeout_s=settings.stop_timeout_s)
            LocalTriton(settings).stop()  # nothing runs now: only clears its pid file
    version, serving = serving_config(settings.repository, settings.model)
    report["version"] = version
    report["serving"] = serving.model_dump(mode="json")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failures = report["sequential"]["failures"] + report["concurrent"]["failures"]
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.triton_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--running", action="store_true", help="use the server `up` started")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests")
    parser.add_argument("--concurrent-requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument(
        "--server-cpus",
        type=parse_cpus,
        default=None,
        help="pin tritonserver (default: no pinning)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
