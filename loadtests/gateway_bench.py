"""``python -m loadtests.gateway_bench``: what the gateway costs in front of the predictor.

One run starts the predictor and a gateway that forwards to it (``GATEWAY_BACKENDS=predictor``),
both pinned to one CPU, and drives them from this process pinned to another, with the
harness's closed-loop keep-alive client (one connection per concurrent caller). Direct and
through-the-gateway rounds alternate, so slow drift of the machine hits both alike. It prints,
per concurrency, requests/s and p50/p99 of ``POST /predict`` (one held-out digit per request)
direct and through the gateway, how busy each process was, and the two figures the gateway
issue sets targets for: the p50 the gateway adds at concurrency 1 (target <= 1 ms) and the
throughput ratio at concurrency 16 (target >= 0.8).

    python -m loadtests.gateway_bench --repo model_repository --seconds 4 --rounds 3

Both servers share the server CPU, as they would share a machine: every CPU-millisecond the
gateway spends is one the predictor does not get, which is what the throughput ratio shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.harness import (
    HttpSender,
    Loop,
    PinnedProcess,
    core_busy_seconds,
    cpu_ms_per_request,
    http_request,
    measure,
    pin_load_generator,
    run_main,
    service,
    serving_line,
)
from loadtests.predictor_bench import (
    MODEL,
    add_predictor_arguments,
    predict_bodies,
    start_predictor,
)

TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.8


def start_gateway(predictor_port: int, cpu: int, port: int) -> PinnedProcess:
    """The gateway pinned to ``cpu``, forwarding to the predictor only."""
    return service(
        "gateway",
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_BACKENDS": "predictor",
            "GATEWAY_DEFAULT_BACKEND": "predictor",
            "GATEWAY_PREDICTOR_URL": f"http://127.0.0.1:{predictor_port}",
            "GATEWAY_LOG_LEVEL": "warning",
        },
        {cpu},
        port,
    )


@dataclass
class Cell:
    """Every measured round of one target at one concurrency, pooled."""

    target: str
    concurrency: int
    loop: Loop = field(init=False)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds

    def __post_init__(self) -> None:
        self.loop = Loop(self.concurrency)

    @property
    def rps(self) -> float:
        return self.loop.rps

    def percentile(self, q: float) -> float:
        return self.loop.percentile_ms(q)

    def busy(self, process: str) -> float:
        """Share of one CPU the process used while this cell ran."""
        return self.cpu.get(process, 0.0) / self.wall if self.wall else float("nan")


def run_round(
    cell: Cell,
    port: int,
    bodies: list[bytes],
    sources: dict[str, Callable[[], float]],
    warmup: float,
    seconds: float,
) -> None:
    requests = [http_request("/predict", body, port) for body in bodies]
    loop, cpu = measure(
        HttpSender.connector(port, requests),
        cell.concurrency,
        sources,
        seconds=seconds,
        warmup_s=warmup,
    )
    cell.loop.add(loop)
    cell.wall += cpu.wall
    for name, spent in cpu.seconds.items():
        cell.cpu[name] = cell.cpu.get(name, 0.0) + spent


def cell_cpu_ms_per_request(cell: Cell) -> float:
    """Predictor + gateway CPU per request. The warm-up used CPU too, so divide by every
    request of the rounds, not only the timed ones."""
    total = cell.cpu.get("predictor", 0.0) + cell.cpu.get("gateway", 0.0)
    return cpu_ms_per_request(total, cell.loop.completed)


def table(cells: list[Cell]) -> str:
    rows = [
        "| path | concurrency | req/s | p50 ms | p99 ms | errors | predictor CPU | gateway CPU "
        "| CPU ms/req (pred + gw) | server core busy (all processes) | client CPU "
        "| client core busy (all processes) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        rows.append(
            f"| {c.target} | {c.concurrency} | {c.rps:.0f} | {c.percentile(50):.2f} "
            f"| {c.percentile(99):.2f} | {c.loop.errors} | {c.busy('predictor'):.0%} "
            f"| {c.busy('gateway'):.0%} | {cell_cpu_ms_per_request(c):.3f} "
            f"| {c.busy('server core'):.0%} | {c.busy('client'):.0%} "
            f"| {c.busy('client core'):.0%} |"
        )
    return "\n".join(rows)


def limit(cell: Cell) -> str:
    """Which side held the run back, from how busy each CPU was and who kept it busy."""
    ours = cell.busy("predictor") + cell.busy("gateway")
    core, client = cell.busy("server core"), cell.busy("client")
    text = (
        f"server core {core:.0%} busy ({ours:.0%} predictor + gateway), "
        f"load generator {client:.0%} of its core"
    )
    if ours >= 0.9:
        return text + ": CPU-bound on the server side"
    if client >= 0.9:
        return text + ": CPU-bound on the load generator"
    if core >= 0.9:
        return text + ": the server core was saturated by OTHER processes (a shared machine)"
    return text + ": neither side CPU-bound (latency-bound)"


def verdict(cells: list[Cell], low: int, high: int) -> list[str]:
    by_key = {(c.target, c.concurrency): c for c in cells}
    lines = []
    direct, through = by_key.get(("direct", low)), by_key.get(("gateway", low))
    if direct and through:
        added = through.percentile(50) - direct.percentile(50)
        ok = "meets" if added <= TARGET_ADDED_P50_MS else "misses"
        lines.append(
            f"added p50 at concurrency {low}: {added:.3f} ms "
            f"({ok} the target of <= {TARGET_ADDED_P50_MS:g} ms)"
        )
    direct, through = by_key.get(("direct", high)), by_key.get(("gateway", high))
    if direct and through:
        ratio = through.rps / direct.rps
        ok = "meets" if ratio >= TARGET_THROUGHPUT_RATIO else "misses"
        lines.append(
            f"throughput ratio at concurrency {high}: {ratio:.2f}x "
            f"({ok} the target of >= {TARGET_THROUGHPUT_RATIO:g}x)"
        )
        # When the server core is the bottleneck, throughput goes as 1 / (CPU per request):
        # this ratio is what the throughput ratio tends to, whatever else runs on the machine.
        direct_ms, through_ms = cell_cpu_ms_per_request(direct), cell_cpu_ms_per_request(through)
        lines.append(
            f"CPU per request at concurrency {high}: direct {direct_ms:.3f} ms, "
            f"through the gateway {through_ms:.3f} ms (predictor + gateway): "
            f"ratio {direct_ms / through_ms:.2f}x"
        )
        for cell in (direct, through):
            lines.append(f"  {cell.target} at {high}: {limit(cell)}")
    return lines


def run(args: argparse.Namespace) -> int:
    pin_load_generator({args.server_cpu}, {args.client_cpu})
    bodies = predict_bodies()
    predictor = start_predictor(
        args.repo, args.engine, args.server_cpu, max_batch_size=None, port=args.predictor_port
    )
    gateway: PinnedProcess | None = None
    cells: list[Cell] = []
    try:
        predictor.wait_ready()
        gateway = start_gateway(args.predictor_port, args.server_cpu, args.gateway_port)
        gateway.wait_ready(timeout_s=60.0)
        sources = {
            "predictor": predictor.cpu_seconds,
            "gateway": gateway.cpu_seconds,
            "server core": lambda: core_busy_seconds(args.server_cpu),
            "client core": lambda: core_busy_seconds(args.client_cpu),
        }
        for concurrency in args.concurrency:
            direct = Cell("direct", concurrency)
            through = Cell("gateway", concurrency)
            for _ in range(args.rounds):
                for cell, port in ((direct, args.predictor_port), (through, args.gateway_port)):
                    run_round(cell, port, bodies, sources, args.warmup, args.seconds)
                    print(
                        f"{cell.target} c={concurrency}: {cell.rps:.0f} req/s so far",
                        file=sys.stderr,
                    )
            cells += [direct, through]
    finally:
        if gateway is not None:
            gateway.stop()
        predictor.stop()

    low, high = args.concurrency
    print(
        f"predictor ({args.engine}) and gateway on CPU {args.server_cpu}, load generator on CPU "
        f"{args.client_cpu}; {args.rounds} alternating rounds of {args.seconds:g}s "
        f"(after {args.warmup:g}s warm-up each) per cell"
    )
    print(serving_line("predictor", args.repo, MODEL) + "\n")
    print(table(cells))
    print()
    print("\n".join(verdict(cells, low, high)))
    if args.json:
        summary = [
            {
                "target": c.target,
                "concurrency": c.concurrency,
                "requests": c.loop.requests,
                "errors": c.loop.errors,
                "seconds": c.loop.seconds,
                "wall": c.wall,
                "cpu": c.cpu,
                "rps": c.rps,
                "p50_ms": c.percentile(50),
                "p99_ms": c.percentile(99),
            }
            for c in cells
        ]
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gateway_bench", description=__doc__.split("\n\n")[0]
    )
    add_predictor_arguments(parser)
    parser.add_argument(
        "--concurrency", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH")
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell")
    parser.add_argument("--predictor-port", type=int, default=18941)
    parser.add_argument("--gateway-port", type=int, default=18942)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
