"""``python -m loadtests.torchserve_bench``: start-to-ready and sequential latency of TorchServe.

    python -m loadtests.torchserve_bench [--requests 200] [--warmup 10] [--server-cpus 0]

Starts its own instance (``python -m services.torchserve up --foreground``, repository and
model from TORCHSERVE_* settings; a temporary run folder and free loopback ports, so a running
stack is not disturbed) through the harness's pinned runner, times it until the model's worker
is READY, sends ``--requests`` sequential requests over one keep-alive connection (held-out
digits as PNG, raw bytes) and prints p50/p90/p99/mean in milliseconds, the serving config and
the server's CPU per request as JSON. The instance is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtests.harness import (
    BenchError,
    HttpSender,
    PinnedProcess,
    cpu_ms_per_request,
    http_request,
    measure,
    parse_cpus,
    processes_cpu_seconds,
    run_main,
    serving_config,
)
from services.torchserve.config import TorchServeSettings, read_keys
from services.torchserve.launcher import describe, down, instance_processes, status
from training.digits import held_out_pngs


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def bench_settings(
    base: TorchServeSettings, run_dir: Path
) -> tuple[TorchServeSettings, dict[str, str]]:
    """Settings of an instance in ``run_dir`` on free ports, and the environment that gives the
    launcher the same settings."""
    ports = dict(
        zip(
            (
                "inference_port",
                "management_port",
                "metrics_port",
                "grpc_inference_port",
                "grpc_management_port",
            ),
            _free_ports(5),
            strict=True,
        )
    )
    update: dict[str, Any] = {"run_dir": run_dir, "repository": base.repository_path, **ports}
    env = {f"TORCHSERVE_{name.upper()}": str(value) for name, value in update.items()}
    return base.model_copy(update=update), env


def is_ready(settings: TorchServeSettings) -> bool:
    return bool(status(settings).get("ready"))


def sequential(settings: TorchServeSettings, requests: int, warmup: int) -> dict[str, Any]:
    """``requests`` sequential predictions after ``warmup`` unmeasured ones."""
    headers = {
        "Content-Type": "image/png",
        "Authorization": f"Bearer {read_keys(settings.key_file).inference}",
    }
    path = f"/predictions/{settings.model}"
    port = settings.inference_port
    bodies = [http_request(path, png, port, headers) for png in held_out_pngs(16)]

    def server_cpu() -> float:
        return processes_cpu_seconds([p.pid for p in instance_processes(settings)])

    loop, cpu = measure(
        HttpSender.connector(port, bodies),
        1,
        {"server": server_cpu},
        requests=requests,
        warmup_requests=warmup,
    )
    return {
        "requests": loop.requests,
        "errors": loop.errors,
        "p50_ms": round(loop.percentile_ms(50), 2),
        "p90_ms": round(loop.percentile_ms(90), 2),
        "p99_ms": round(loop.percentile_ms(99), 2),
        "mean_ms": round(loop.mean_ms, 2),
        "server_cpu_ms_per_request": round(
            cpu_ms_per_request(cpu.seconds["server"], loop.completed), 3
        ),
    }


def run(args: argparse.Namespace) -> int:
    base = TorchServeSettings()
    with tempfile.TemporaryDirectory(prefix="torchserve-bench-") as tmp:
        settings, env = bench_settings(base, Path(tmp) / "run")
        server = PinnedProcess(
            "torchserve launcher",
            [sys.executable, "-m", "services.torchserve", "up", "--foreground"],
            os.environ | env,
            cpus=args.server_cpus,
            ready=lambda: is_ready(settings),
            log=Path(tmp) / "launcher.log",
        )
        try:
            try:
                start_to_ready = server.wait_ready(timeout_s=settings.start_timeout_s + 30)
            except BenchError as exc:
                log = (Path(tmp) / "launcher.log").read_text(errors="replace")
                raise BenchError(f"{exc}; its output ends with:\n{log[-3000:]}") from None
            version = int(status(settings)["default_version"])
            keys = read_keys(settings.key_file)
            applied = describe(settings, keys, version)[0]
            figures = sequential(settings, args.requests, args.warmup)
        finally:
            # SIGTERM makes the launcher stop TorchServe (its own process group) and exit.
            server.stop(timeout_s=settings.stop_timeout_s + 15)
            if instance_processes(settings):
                down(settings)
    _, serving = serving_config(settings.repository_path, settings.model, version)
    report = {
        "model": settings.model,
        "version": version,
        "start_to_ready_s": round(start_to_ready, 2),
        "requests": figures.pop("requests"),
        "max_batch_delay_ms": applied.get("maxBatchDelay"),
        **figures,
        "batch_size": applied.get("batchSize"),
        "serving": serving.model_dump(mode="json"),
    }
    print(json.dumps(report, indent=2))
    if report["errors"]:
        print(f"{report['errors']} requests failed", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.torchserve_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--server-cpus", type=parse_cpus, default=None, help="pin TorchServe (default: no pinning)"
    )
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
