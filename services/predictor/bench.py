"""``python -m services.predictor.bench``: throughput and latency of the predictor, measured.

Starts the predictor itself (twice: dynamic batching on, then off with ``max_batch_size=1``),
pinned to one CPU, and drives it from this process pinned to another, with a minimal
keep-alive HTTP/1.1 client (one connection per concurrent caller, each sending its next request
as soon as the last answer arrived: closed-loop load). For every concurrency it prints requests/s
and p50/p99 latency of ``POST /predict`` (one PNG digit per request) and of ``POST /noop`` with
the same body (the server's HTTP ceiling), plus how busy each CPU was, so a reader can tell
which side limited the run. Last, it times the engine's forward pass alone on the server's CPU
and prints the share of the no-op ceiling that a /predict doing nothing else could reach.

    python -m services.predictor.bench --repo model_repository --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


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


def digit_pngs(count: int, seed: int = 0) -> list[bytes]:
    """8x8 grayscale PNGs shaped like the training digits (blurry strokes on black)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = (rng.random((8, 8)) > 0.6) * rng.integers(120, 256, (8, 8))
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def predict_bodies(count: int = 16) -> list[bytes]:
    """``/predict`` JSON bodies of one digit PNG each, ``top_k`` 1."""
    return [
        json.dumps({"image": base64.b64encode(png).decode(), "top_k": 1}).encode()
        for png in digit_pngs(count)
    ]


def pin_load_generator(server_cpu: int, client_cpu: int) -> bool:
    """Pin this process (the load generator) to ``client_cpu``; False, after saying why, when
    either CPU is not one this process may use."""
    available = os.sched_getaffinity(0)
    if {server_cpu, client_cpu} - available:
        print(f"CPUs {server_cpu} and {client_cpu} must be among {sorted(available)}")
        return False
    os.sched_setaffinity(0, {client_cpu})
    return True


def http_request(path: str, body: bytes, port: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    await reader.readexactly(length)
    return status


async def closed_loop(
    port: int, requests: list[bytes], concurrency: int, warmup_s: float, seconds: float
) -> tuple[list[float], int, float]:
    """Latencies (s) of requests started inside the measured window, errors, window length."""
    latencies: list[float] = []
    errors = 0
    loop_start = time.perf_counter()
    measure_from = loop_start + warmup_s
    stop_at = measure_from + seconds

    async def caller(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = requests[index % len(requests)]
        try:
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                writer.write(request)
                status = await read_response(reader)
                if start >= measure_from:
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies, errors, seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when installed: the load generator must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class PinnedService:
    """``python -m services.<name>`` pinned to one CPU, configured only by ``env`` (the caller's
    own ``<NAME>_*`` variables are dropped); ready once its ``/readyz`` answers 200."""

    def __init__(self, name: str, env: dict[str, str], cpu: int, port: int) -> None:
        self.name = name
        self.port = port
        prefix = f"{name.upper()}_"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=inherited | env,
            start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the {self.name} exited with {self.process.returncode}")
            try:
                url = f"http://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet (or, for the gateway, no engine seen yet)
            time.sleep(0.1)
        raise SystemExit(f"the {self.name} did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_predictor(
    repo: Path, engine: str, cpu: int, max_batch_size: int, port: int
) -> PinnedService:
    return PinnedService(
        "predictor",
        {
            "PREDICTOR_REPOSITORY": str(repo),
            "PREDICTOR_PORT": str(port),
            "PREDICTOR_ENGINE": engine,
            "PREDICTOR_MAX_BATCH_SIZE": str(max_batch_size),
            "PREDICTOR_POLL_INTERVAL_S": "0",
            "PREDICTOR_LOG_LEVEL": "warning",
            "PREDICTOR_DEVICE": "cpu",
        },
        cpu,
        port,
    )


def measure(
    server: PinnedService,
    endpoint: str,
    batching: str,
    bodies: list[bytes],
    concurrency: int,
    warmup_s: float,
    seconds: float,
) -> Result:
    requests = [http_request(endpoint, body, server.port) for body in bodies]
    server_cpu0 = cpu_seconds(server.process.pid)
    client_cpu0 = time.process_time()
    wall0 = time.perf_counter()
    latencies, errors, window = run_loop(
        closed_loop(server.port, requests, concurrency, warmup_s, seconds)
    )
    wall = time.perf_counter() - wall0
    server_seconds = cpu_seconds(server.process.pid) - server_cpu0
    server_cpu = server_seconds / wall
    client_cpu = (time.process_time() - client_cpu0) / wall
    ms = np.asarray(latencies) * 1000.0
    return Result(
        endpoint=endpoint,
        batching=batching,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=window,
        rps=len(latencies) / window,
        p50_ms=float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        p99_ms=float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        # Warm-up requests used CPU too: divide by every request of the run, not only those timed.
        server_cpu_ms=server_seconds * 1000.0 / max(1, len(latencies) * wall / window),
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


def model_only_ms_per_image(repo: Path, engine: str, cpu: int, batch: int, seconds: float) -> float:
    """CPU milliseconds per image of the engine's forward pass alone at ``batch``, on ``cpu``
    with one thread as the server runs it: a floor that no HTTP or batching work gets below."""
    # Imported here: the load generator has no use for torch until the servers are gone.
    from services.predictor.engines import EngineKind, load_model, set_torch_threads
    from services.predictor.settings import PredictorSettings

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        set_torch_threads(1)
        model = load_model(
            repo,
            PredictorSettings.model_fields["model"].default,
            None,
            cast(EngineKind, engine),
            "cpu",
            max_batch_size=batch,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.predictor.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--engine", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per cell")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--max-batch-size", type=int, default=32, help="for 'batching on'")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if not pin_load_generator(args.server_cpu, args.client_cpu):
        return 2
    bodies = predict_bodies()
    results: list[Result] = []
    for batching, max_batch in (("on", args.max_batch_size), ("off", 1)):
        server = start_predictor(args.repo, args.engine, args.server_cpu, max_batch, args.port)
        try:
            server.wait_ready()
            endpoints = ["/predict", "/noop"] if batching == "on" else ["/predict"]
            for endpoint in endpoints:
                for concurrency in args.concurrency:
                    result = measure(
                        server, endpoint, batching, bodies, concurrency, args.warmup, args.seconds
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
        f"{args.client_cpu}, {args.seconds:g}s per cell after {args.warmup:g}s warm-up\n"
    )
    print(table(results))
    print()
    high = max(args.concurrency)
    print(ratios(results, high))
    model_ms = model_only_ms_per_image(
        args.repo, args.engine, args.server_cpu, args.max_batch_size, args.seconds
    )
    noop_ms = next(
        (r.server_cpu_ms for r in results if (r.endpoint, r.concurrency) == ("/noop", high)),
        float("nan"),
    )
    print(
        f"the forward pass alone costs {model_ms:.3f} ms of CPU per image at batch "
        f"{args.max_batch_size} (CPU {args.server_cpu}, one thread) and a whole /noop request "
        f"{noop_ms:.3f} ms at concurrency {high}: a /predict that did nothing else would reach "
        f"at most {noop_ms / (noop_ms + model_ms):.0%} of the no-op ceiling"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
