"""``python -m loadtests.gateway_bench``: what the gateway costs in front of the predictor.

One run starts the predictor and a gateway that forwards to it (``GATEWAY_BACKENDS=predictor``,
every other setting the gateway's default, as ``make up`` runs it) and drives them with the
harness's closed-loop keep-alive client (one connection per concurrent caller). Direct and
through-the-gateway rounds alternate, so slow drift of the machine hits both alike. It prints,
per concurrency, requests/s and p50/p99 of ``POST /predict`` (one held-out digit per request)
direct and through the gateway, how busy each process was, and the figures the performance
issue sets targets for: the p50 the gateway adds at the lowest concurrency (target <= 0.3 ms)
and the throughput ratio through / direct at each concurrency (targets: >= 0.95 at 1 and 8,
>= 1.0 at 32).

    python -m loadtests.gateway_bench --repo model_repository --seconds 4 --rounds 3
    python -m loadtests.gateway_bench --pinned     # servers on --server-cpu, client on --client-cpu

By default nothing is pinned: that is what a user runs, the gateway and the predictor free to
use every core. ``--pinned`` puts both servers on one CPU and the client on another: every
CPU-millisecond the gateway spends is then one the predictor does not get, which the
throughput ratio shows, and the report says which side was CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import os
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

TARGET_ADDED_P50_MS = 0.3
#: Through-the-gateway / direct req/s by concurrency (never asserted).
TARGET_THROUGHPUT_RATIOS = {1: 0.95, 8: 0.95, 32: 1.0}


def start_gateway(predictor_port: int, cpu: int | None, port: int) -> PinnedProcess:
    """The gateway (pinned to ``cpu`` unless None), forwarding to the predictor only."""
    return service(
        "gateway",
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_BACKENDS": "predictor",
            "GATEWAY_DEFAULT_BACKEND": "predictor",
            "GATEWAY_PREDICTOR_URL": f"http://127.0.0.1:{predictor_port}",
            "GATEWAY_LOG_LEVEL": "warning",
        },
        {cpu} if cpu is not None else None,
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


def share(cell: Cell, source: str) -> str:
    """How busy ``source`` was, or n/a where it was not measured (a core, when unpinned)."""
    return f"{cell.busy(source):.0%}" if source in cell.cpu else "n/a"


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
            f"| {share(c, 'server core')} | {c.busy('client'):.0%} "
            f"| {share(c, 'client core')} |"
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


def verdict(cells: list[Cell], concurrency: list[int], pinned: bool) -> list[str]:
    by_key = {(c.target, c.concurrency): c for c in cells}
    lines = []
    low, high = min(concurrency), max(concurrency)
    direct, through = by_key[("direct", low)], by_key[("gateway", low)]
    added = through.percentile(50) - direct.percentile(50)
    ok = "meets" if added <= TARGET_ADDED_P50_MS else "misses"
    lines.append(
        f"added p50 at concurrency {low}: {added:.3f} ms "
        f"({ok} the target of <= {TARGET_ADDED_P50_MS:g} ms)"
    )
    for n in concurrency:
        direct, through = by_key[("direct", n)], by_key[("gateway", n)]
        ratio = through.rps / direct.rps if direct.rps else float("nan")
        target = TARGET_THROUGHPUT_RATIOS.get(n)
        verdict_text = ""
        if target is not None:
            verdict_text = (
                f" ({'meets' if ratio >= target else 'misses'} the target of >= {target:g}x)"
            )
        lines.append(f"throughput ratio at concurrency {n}: {ratio:.2f}x{verdict_text}")
    direct, through = by_key[("direct", high)], by_key[("gateway", high)]
    direct_ms, through_ms = cell_cpu_ms_per_request(direct), cell_cpu_ms_per_request(through)
    lines.append(
        f"CPU per request at concurrency {high}: direct {direct_ms:.3f} ms, "
        f"through the gateway {through_ms:.3f} ms (predictor + gateway)"
    )
    if pinned:
        # When the server core is the bottleneck, throughput goes as 1 / (CPU per request).
        for cell in (direct, through):
            lines.append(f"  {cell.target} at {high}: {limit(cell)}")
    return lines


def run(args: argparse.Namespace) -> int:
    server_cpu: int | None = args.server_cpu if args.pinned else None
    if args.pinned:
        pin_load_generator({args.server_cpu}, {args.client_cpu})
    bodies = predict_bodies()
    predictor = start_predictor(
        args.repo,
        args.engine,
        server_cpu if server_cpu is not None else os.sched_getaffinity(0),
        max_batch_size=None,
        port=args.predictor_port,
    )
    gateway: PinnedProcess | None = None
    cells: list[Cell] = []
    try:
        predictor.wait_ready()
        gateway = start_gateway(args.predictor_port, server_cpu, args.gateway_port)
        gateway.wait_ready(timeout_s=60.0)
        sources: dict[str, Callable[[], float]] = {
            "predictor": predictor.cpu_seconds,
            "gateway": gateway.cpu_seconds,
        }
        if args.pinned:
            sources["server core"] = lambda: core_busy_seconds(args.server_cpu)
            sources["client core"] = lambda: core_busy_seconds(args.client_cpu)
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

    where = (
        f"predictor ({args.engine}) and gateway on CPU {args.server_cpu}, load generator on CPU "
        f"{args.client_cpu}"
        if args.pinned
        else f"predictor ({args.engine}), gateway and load generator unpinned "
        f"({len(os.sched_getaffinity(0))} CPUs, as `make up` runs them)"
    )
    one, five, _ = os.getloadavg()
    print(
        f"{where}; {args.rounds} alternating rounds of {args.seconds:g}s "
        f"(after {args.warmup:g}s warm-up each) per cell; load average {one:.2f} {five:.2f}"
    )
    print(serving_line("predictor", args.repo, MODEL) + "\n")
    print(table(cells))
    print()
    print("\n".join(verdict(cells, args.concurrency, args.pinned)))
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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="both servers on --server-cpu, the load generator on --client-cpu",
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
