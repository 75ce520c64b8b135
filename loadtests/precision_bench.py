"""``python -m loadtests.precision_bench``: the int8 model against fp32, model-only and end to end.

For a version published with ``--int8``: first the ONNX engine's forward pass alone, fp32 and
int8 alternated in rounds on one pinned CPU with one thread (images/s at each batch size), then
the predictor serving each precision (``PREDICTOR_ENGINE=onnx``) on that CPU under the bench
harness' closed loop from another CPU (``/predict``, one held-out digit per request). It prints
both tables and the int8/fp32 ratios; the README's int8 section says what was measured.

    python -m loadtests.precision_bench --repo model_repository --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np

from loadtests.harness import pin_load_generator, run_main
from loadtests.predictor_bench import MODEL, predict_bodies, run_cell, start_predictor

PRECISIONS = ("fp32", "int8")


def model_only_images_per_s(
    repo: Path, cpu: int, batches: list[int], seconds: float, rounds: int
) -> dict[tuple[str, int], float]:
    """Median images/s of the forward pass per (precision, batch), the precisions alternated."""
    from services.common.runtime import Precision, load_model

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        models = {
            p: load_model(repo, MODEL, None, "onnx", "cpu", precision=cast(Precision, p))
            for p in PRECISIONS
        }
        shape = models["fp32"].spec.shape
        samples: dict[tuple[str, int], list[float]] = {}
        for round_index in range(rounds):
            order = PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]
            for batch in batches:
                rng = np.random.default_rng(batch)
                images = rng.standard_normal((batch, *shape), dtype=np.float32)
                for precision in order:
                    engine = models[precision].engine
                    engine.infer(images)
                    runs, started = 0, time.perf_counter()
                    while time.perf_counter() - started < seconds:
                        engine.infer(images)
                        runs += 1
                    rate = runs * batch / (time.perf_counter() - started)
                    samples.setdefault((precision, batch), []).append(rate)
        return {key: statistics.median(values) for key, values in samples.items()}
    finally:
        os.sched_setaffinity(0, previous)


def model_only_table(rates: dict[tuple[str, int], float], batches: list[int]) -> str:
    """The model-only figures as a table: images/s per precision and batch, and the ratio."""
    rows = [
        "| batch | fp32 images/s | int8 images/s | int8 / fp32 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for batch in batches:
        fp32, int8 = rates[("fp32", batch)], rates[("int8", batch)]
        rows.append(f"| {batch} | {fp32:.0f} | {int8:.0f} | {int8 / fp32:.2f}x |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    model_only = model_only_images_per_s(
        args.repo, args.server_cpu, args.batches, args.seconds, args.rounds
    )
    print(
        f"model only: ONNX Runtime on CPU {args.server_cpu}, one thread, "
        f"median of {args.rounds} rounds\n"
    )
    print(model_only_table(model_only, args.batches))

    pin_load_generator({args.server_cpu}, {args.client_cpu})
    bodies = predict_bodies()
    rates: dict[tuple[str, int], list[float]] = {}
    for round_index in range(args.rounds):
        order = PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            server = start_predictor(
                args.repo, "onnx", args.server_cpu, None, args.port, precision=precision
            )
            try:
                server.wait_ready()
                for concurrency in args.concurrency:
                    result = run_cell(
                        server,
                        args.port,
                        "/predict",
                        "on",
                        bodies,
                        concurrency,
                        args.warmup,
                        args.seconds,
                    )
                    if result.errors:
                        print(
                            f"{precision} c={concurrency}: {result.errors} errors", file=sys.stderr
                        )
                    rates.setdefault((precision, concurrency), []).append(result.rps)
            finally:
                server.stop()
    print(
        f"\nend to end: the predictor (ONNX engine) on CPU {args.server_cpu}, load generator on "
        f"CPU {args.client_cpu}, /predict of one digit, median req/s of {args.rounds} rounds\n"
    )
    print("| concurrency | fp32 req/s | int8 req/s | int8 / fp32 |")
    print("| ---: | ---: | ---: | ---: |")
    for concurrency in args.concurrency:
        fp32 = statistics.median(rates[("fp32", concurrency)])
        int8 = statistics.median(rates[("int8", concurrency)])
        print(f"| {concurrency} | {fp32:.0f} | {int8:.0f} | {int8 / fp32:.2f}x |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.precision_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per cell")
    parser.add_argument("--port", type=int, default=18932)
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
