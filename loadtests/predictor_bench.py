"""``python -m loadtests.predictor_bench``: throughput and latency of the predictor, measured.

Starts the predictor itself (twice: dynamic batching as the model's serving config says, then
off with ``max_batch_size=1``), pinned to one CPU, and drives it from this process pinned to
another with the harness's closed-loop keep-alive client (one connection per concurrent
caller). For every concurrency it prints requests/s and p50/p99 latency of ``POST /predict``
(one held-out digit per request) and of ``POST /noop`` with the same bodies (the server's HTTP
ceiling), plus how busy each CPU was, so a reader can tell which side limited the run. Last, it
times the engine's forward pass alone on the server's CPU and prints the share of the no-op
ceiling that a /predict doing nothing else could reach.

    python -m loadtests.predictor_bench --repo model_repository --seconds 5
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np

from loadtests.harness import (
    HttpSender,
    PinnedProcess,
    cpu_ms_per_request,
    http_request,
    measure,
    pin_load_generator,
    run_main,
    service,
    serving_config,
    serving_line,
)
from services.predictor.settings import PredictorSettings
from training.digits import held_out_pngs

#: The model the predictor serves (the bench drops the caller's PREDICTOR_* variables).
MODEL: str = PredictorSettings.model_fields["model"].default


@dataclass
class Result:
    endpoint: str
    batching: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # share of one CPU used by the server process during the run
    client_cpu: float  # share of one CPU used by this load generator
    server_cpu_ms: float  # server CPU time per request: comparable even on a busy machine


def predict_bodies(count: int = 16) -> list[bytes]:
    """``/predict`` JSON bodies of one held-out digit each, ``top_k`` 1."""
    return [
        json.dumps({"image": base64.b64encode(png).decode(), "top_k": 1}).encode()
        for png in held_out_pngs(count)
    ]


def start_predictor(
    repo: Path,
    engine: str,
    cpu: int | Collection[int],
    max_batch_size: int | None,
    port: int,
    precision: str = "fp32",
    workers: int = 1,
) -> PinnedProcess:
    """The predictor on ``cpu`` (one or several), as ``workers`` processes; ``max_batch_size``
    overrides the model's (None: the model's)."""
    env = {
        "PREDICTOR_WORKERS": str(workers),
        "PREDICTOR_REPOSITORY": str(repo),
        "PREDICTOR_PORT": str(port),
        "PREDICTOR_ENGINE": engine,
        "PREDICTOR_PRECISION": precision,
        "PREDICTOR_POLL_INTERVAL_S": "0",
        "PREDICTOR_LOG_LEVEL": "warning",
        "PREDICTOR_DEVICE": "cpu",
        "PREDICTOR_GRPC_PORT": "0",  # the bench measures HTTP; no port to clash with a stack's
    }
    if max_batch_size is not None:
        env["PREDICTOR_MAX_BATCH_SIZE"] = str(max_batch_size)
    return service("predictor", env, {cpu} if isinstance(cpu, int) else set(cpu), port)


def run_cell(
    server: PinnedProcess,
    port: int,
    endpoint: str,
    batching: str,
    bodies: list[bytes],
    concurrency: int,
    warmup_s: float,
    seconds: float,
) -> Result:
    requests = [http_request(endpoint, body, port) for body in bodies]
    loop, cpu = measure(
        HttpSender.connector(port, requests),
        concurrency,
        {"server": server.cpu_seconds},
        seconds=seconds,
        warmup_s=warmup_s,
    )
    return Result(
        endpoint=endpoint,
        batching=batching,
        concurrency=concurrency,
        requests=loop.requests,
        errors=loop.errors,
        seconds=loop.seconds,
        rps=loop.rps,
        p50_ms=loop.percentile_ms(50),
        p99_ms=loop.percentile_ms(99),
        server_cpu=cpu.busy("server"),
        client_cpu=cpu.busy("client"),
        # Warm-up requests used CPU too: divide by every request of the run.
        server_cpu_ms=cpu_ms_per_request(cpu.seconds["server"], loop.completed),
    )


def table(results: list[Result]) -> str:
    rows = [
        "| endpoint | batching | concurrency | req/s | p50 ms | p99 ms | errors "
        "| server CPU | server CPU ms/req | client CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rows.append(
            f"| {r.endpoint} | {r.batching} | {r.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.errors} | {r.server_cpu:.0%} | {r.server_cpu_ms:.3f} "
            f"| {r.client_cpu:.0%} |"
        )
    return "\n".join(rows)


def ratios(results: list[Result], concurrency: int) -> str:
    def rps(endpoint: str, batching: str) -> float:
        for r in results:
            if (r.endpoint, r.batching, r.concurrency) == (endpoint, batching, concurrency):
                return r.rps
        return float("nan")

    on, off, noop = rps("/predict", "on"), rps("/predict", "off"), rps("/noop", "on")
    return (
        f"at concurrency {concurrency}: batching on / off = {on / off:.2f}x (target >= 1.5x); "
        f"/predict / no-op ceiling = {on / noop:.0%} (target >= 50%)"
    )


def model_only_ms_per_image(
    repo: Path, engine: str, cpu: int, batch: int, seconds: float, precision: str = "fp32"
) -> float:
    """CPU milliseconds per image of the engine's forward pass alone at ``batch``, on ``cpu``
    with one thread as the server runs it: a floor that no HTTP or batching work gets below."""
    # Imported here: the load generator has no use for torch until the servers are gone.
    from services.common.runtime import EngineKind, Precision, load_model, set_torch_threads

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        set_torch_threads(1)
        model = load_model(
            repo,
            MODEL,
            None,
            cast(EngineKind, engine),
            "cpu",
            serving_overrides={"max_batch_size": batch},
            precision=cast(Precision, precision),
        )
        shape = (batch, *model.spec.shape)
        images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        runs = 0
        cpu0 = time.process_time()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            model.engine.infer(images)
            runs += 1
        return (time.process_time() - cpu0) * 1000.0 / (runs * batch)
    finally:
        os.sched_setaffinity(0, previous)


def run(args: argparse.Namespace) -> int:
    pin_load_generator({args.server_cpu}, {args.client_cpu})
    _, serving = serving_config(args.repo, MODEL)
    batch = args.max_batch_size or serving.max_batch_size
    bodies = predict_bodies()
    results: list[Result] = []
    for batching, max_batch in (("on", args.max_batch_size), ("off", 1)):
        server = start_predictor(args.repo, args.engine, args.server_cpu, max_batch, args.port)
        try:
            server.wait_ready()
            endpoints = ["/predict", "/noop"] if batching == "on" else ["/predict"]
            for endpoint in endpoints:
                for concurrency in args.concurrency:
                    result = run_cell(
                        server,
                        args.port,
                        endpoint,
                        batching,
                        bodies,
                        concurrency,
                        args.warmup,
                        args.seconds,
                    )
                    print(
                        f"{endpoint} batching {batching} c={concurrency}: {result.rps:.0f} req/s",
                        file=sys.stderr,
                    )
                    results.append(result)
        finally:
            server.stop()

    print(
        f"predictor ({args.engine}) on CPU {args.server_cpu}, load generator on CPU "
        f"{args.client_cpu}, {args.seconds:g}s per cell after {args.warmup:g}s warm-up"
    )
    on = "" if args.max_batch_size is None else f"{args.max_batch_size} for batching on, "
    overrides = {"max_batch_size": f"{on}1 for batching off"}
    print(serving_line("predictor", args.repo, MODEL, overrides=overrides) + "\n")
    print(table(results))
    print()
    high = max(args.concurrency)
    print(ratios(results, high))
    model_ms = model_only_ms_per_image(args.repo, args.engine, args.server_cpu, batch, args.seconds)
    noop_ms = next(
        (r.server_cpu_ms for r in results if (r.endpoint, r.concurrency) == ("/noop", high)),
        float("nan"),
    )
    print(
        f"the forward pass alone costs {model_ms:.3f} ms of CPU per image at batch "
        f"{batch} (CPU {args.server_cpu}, one thread) and a whole /noop request "
        f"{noop_ms:.3f} ms at concurrency {high}: a /predict that did nothing else would reach "
        f"at most {noop_ms / (noop_ms + model_ms):.0%} of the no-op ceiling"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """The repository, the engine, and the CPUs of the servers and of the load generator."""
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--engine", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.predictor_bench", description=__doc__.split("\n\n")[0]
    )
    add_predictor_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per cell")
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="for 'batching on' (default: the model's serving config)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
