"""``python -m services.gateway.bench``: what the gateway costs in front of the predictor.

One run starts the predictor and a gateway that forwards to it (``GATEWAY_BACKENDS=predictor``),
both pinned to one CPU, and drives them from this process pinned to another, with the
predictor benchmark's closed-loop keep-alive client (one connection per concurrent caller).
Direct and through-the-gateway rounds alternate, so slow drift of the machine hits both alike.
It prints, per concurrency, requests/s and p50/p99 of ``POST /predict`` (one PNG digit per
request) direct and through the gateway, how busy each process was, and the two figures the
gateway issue sets targets for: the p50 the gateway adds at concurrency 1 (target <= 1 ms) and
the throughput ratio at concurrency 16 (target >= 0.8).

    python -m services.gateway.bench --repo model_repository --seconds 4 --rounds 3

Both servers share the server CPU, as they would share a machine: every CPU-millisecond the
gateway spends is one the predictor does not get, which is what the throughput ratio shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.predictor.bench import (
    CLOCK_TICKS,
    PinnedService,
    closed_loop,
    cpu_seconds,
    http_request,
    pin_load_generator,
    predict_bodies,
    run_loop,
    start_predictor,
)

TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.8


def core_busy_seconds(cpu: int) -> float:
    """Busy (non-idle) seconds of one CPU since boot, every process counted, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            return (sum(values[:8]) - idle) / CLOCK_TICKS
    raise ValueError(f"cpu{cpu} not in /proc/stat")


def start_gateway(predictor_port: int, cpu: int, port: int) -> PinnedService:
    """The gateway pinned to ``cpu``, forwarding to the predictor only."""
    return PinnedService(
        "gateway",
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_BACKENDS": "predictor",
            "GATEWAY_DEFAULT_BACKEND": "predictor",
            "GATEWAY_PREDICTOR_URL": f"http://127.0.0.1:{predictor_port}",
            "GATEWAY_LOG_LEVEL": "warning",
        },
        cpu,
        port,
    )


@dataclass
class Cell:
    """Every measured round of one target at one concurrency, pooled."""

    target: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies) * 1000.0, q))

    def busy(self, process: str) -> float:
        """Share of one CPU the process used while this cell ran."""
        return self.cpu.get(process, 0.0) / self.wall if self.wall else float("nan")


def run_round(
    cell: Cell,
    port: int,
    bodies: list[bytes],
    pids: dict[str, int],
    cores: dict[str, int],
    warmup: float,
    seconds: float,
) -> None:
    requests = [http_request("/predict", body, port) for body in bodies]
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    core0 = {name: core_busy_seconds(cpu) for name, cpu in cores.items()}
    client0 = time.process_time()
    wall0 = time.perf_counter()
    latencies, errors, window = run_loop(
        closed_loop(port, requests, cell.concurrency, warmup, seconds)
    )
    cell.wall += time.perf_counter() - wall0
    for name, pid in pids.items():
        cell.cpu[name] = cell.cpu.get(name, 0.0) + cpu_seconds(pid) - cpu0[name]
    cell.cpu["client"] = cell.cpu.get("client", 0.0) + time.process_time() - client0
    for name, cpu in cores.items():
        cell.cpu[name] = cell.cpu.get(name, 0.0) + core_busy_seconds(cpu) - core0[name]
    cell.latencies.extend(latencies)
    cell.requests += len(latencies)
    cell.errors += errors
    cell.seconds += window


def cpu_ms_per_request(cell: Cell) -> float:
    """Predictor + gateway CPU per request. The warm-up used CPU too, so divide by every
    request of the rounds (estimated from the measured rate), not only the timed ones."""
    total = cell.cpu.get("predictor", 0.0) + cell.cpu.get("gateway", 0.0)
    served = cell.requests * cell.wall / cell.seconds if cell.seconds else 0.0
    return total * 1000.0 / served if served else float("nan")


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
            f"| {c.percentile(99):.2f} | {c.errors} | {c.busy('predictor'):.0%} "
            f"| {c.busy('gateway'):.0%} | {cpu_ms_per_request(c):.3f} "
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
        cost = cpu_ms_per_request(direct) / cpu_ms_per_request(through)
        lines.append(
            f"CPU per request at concurrency {high}: direct {cpu_ms_per_request(direct):.3f} ms, "
            f"through the gateway {cpu_ms_per_request(through):.3f} ms (predictor + gateway): "
            f"ratio {cost:.2f}x"
        )
        for cell in (direct, through):
            lines.append(f"  {cell.target} at {high}: {limit(cell)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--engine", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument(
        "--concurrency", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH")
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--predictor-port", type=int, default=18941)
    parser.add_argument("--gateway-port", type=int, default=18942)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if not pin_load_generator(args.server_cpu, args.client_cpu):
        return 2
    bodies = predict_bodies()
    predictor = start_predictor(
        args.repo, args.engine, args.server_cpu, max_batch_size=32, port=args.predictor_port
    )
    gateway: PinnedService | None = None
    cells: list[Cell] = []
    try:
        predictor.wait_ready()
        gateway = start_gateway(args.predictor_port, args.server_cpu, args.gateway_port)
        gateway.wait_ready(timeout=60.0)
        pids = {"predictor": predictor.process.pid, "gateway": gateway.process.pid}
        cores = {"server core": args.server_cpu, "client core": args.client_cpu}
        for concurrency in args.concurrency:
            direct = Cell("direct", concurrency)
            through = Cell("gateway", concurrency)
            for _ in range(args.rounds):
                for cell, port in ((direct, args.predictor_port), (through, args.gateway_port)):
                    run_round(cell, port, bodies, pids, cores, args.warmup, args.seconds)
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
        f"(after {args.warmup:g}s warm-up each) per cell\n"
    )
    print(table(cells))
    print()
    print("\n".join(verdict(cells, low, high)))
    if args.json:
        summary = [
            {
                **{k: v for k, v in asdict(c).items() if k != "latencies"},
                "rps": c.rps,
                "p50_ms": c.percentile(50),
                "p99_ms": c.percentile(99),
            }
            for c in cells
        ]
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
