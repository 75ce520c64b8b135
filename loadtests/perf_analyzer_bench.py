"""``python -m loadtests.perf_analyzer_bench`` (``make perf-analyzer``): Triton's perf_analyzer
against every engine, one table.

    python -m loadtests.perf_analyzer_bench --repo model_repository [--concurrency 4]
        [--requests 500] [--server-cpus 0 --client-cpus 1]

Sets perf_analyzer up first when needed (:mod:`loadtests.perf_analyzer`, cached in
``.cache/perf-analyzer``), trains and publishes a model when the repository has none, then
starts each engine in turn through the harness's pinned runner on its own ports (a running
stack is not disturbed) and measures it with the same perf_analyzer command line:

* the predictor, Open Inference Protocol v2 over REST and gRPC;
* the local tritonserver (the project's Triton launcher), REST and gRPC;
* TorchServe, ``--service-kind=torchserve`` with its inference key as a bearer token;

each v2 engine on ``classifier`` (FP32 ``[N,3,32,32]``: held-out digits decoded and normalised
by the shared imaging code) and ``classifier_ensemble`` (BYTES ``IMAGE`` ``[N,1]``: the same
digits' PNG files), TorchServe on the PNG files. A run that fails (perf_analyzer stops at the
first failed request) is a row saying why, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import perf_analyzer
from loadtests.harness import (
    BenchError,
    PinnedProcess,
    http_ready,
    parse_cpus,
    pin_load_generator,
    run_main,
    service,
    serving_line,
)
from loadtests.perf_analyzer import Measurement, PerfAnalyzer, PerfAnalyzerError, Protocol
from loadtests.torchserve_bench import bench_settings, is_ready
from services.common.repository import list_versions, read_manifest
from services.torchserve.config import TorchServeSettings, read_keys
from training.digits import held_out_pngs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "classifier"
IMAGES = 16


@dataclass(frozen=True)
class Target:
    """One row: a model on one engine over one protocol, and what perf_analyzer sends it."""

    engine: str
    protocol: Protocol
    model: str
    url: str
    input_data: Mapping[str, Any]
    service_kind: perf_analyzer.ServiceKind = "triton"
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Row:
    target: Target
    result: Measurement | None
    error: str = ""


class Payloads:
    """perf_analyzer input data of the held-out digits, for each kind of input."""

    def __init__(self, repo: Path, model: str, folder: Path) -> None:
        from services.common.imaging import decode_and_preprocess  # numpy, only when running
        from services.triton.protocol import IMAGE_INPUT

        version = list_versions(repo, model)[-1]
        self.manifest = read_manifest(repo, model, version)
        self.pngs = held_out_pngs(IMAGES)
        spec = self.manifest.input_spec
        rows = [decode_and_preprocess(png, spec).astype("<f4").tobytes() for png in self.pngs]
        self.fp32 = perf_analyzer.tensor_input_data(spec.name, rows)
        self.image = perf_analyzer.bytes_input_data(IMAGE_INPUT, self.pngs)
        files = []
        for index, png in enumerate(self.pngs):
            path = folder / f"digit-{index}.png"
            path.write_bytes(png)
            files.append(path)
        self.files = perf_analyzer.torchserve_input_data(files)

    def v2_targets(self, engine: str, model: str, http: str, grpc: str) -> list[Target]:
        """``model`` (FP32) and its ensemble (BYTES) over REST and gRPC."""
        ensemble = f"{model}_ensemble"
        urls: tuple[tuple[Protocol, str], ...] = (("http", http), ("grpc", grpc))
        return [
            Target(engine, protocol, name, url, data)
            for protocol, url in urls
            for name, data in ((model, self.fp32), (ensemble, self.image))
        ]


def ensure_model(repo: Path, model: str) -> None:
    """Train and publish first when the repository has no version of ``model``."""
    if list_versions(repo, model):
        return
    print(f"no published {model} in {repo}: training and publishing first", file=sys.stderr)
    command = [sys.executable, "-m", "training", "train-and-publish", "--repo", str(repo)]
    if subprocess.run([*command, "--model-name", model], cwd=ROOT, check=False).returncode:
        raise BenchError("train-and-publish failed; see its output above")


def _inherited(prefix: str, env: Mapping[str, str]) -> dict[str, str]:
    """This environment without the caller's own ``<PREFIX>_*`` settings, plus ``env``."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefix)} | dict(env)


@contextmanager
def running(server: PinnedProcess, timeout_s: float, log: Path | None = None) -> Iterator[None]:
    """``server`` ready for the block, stopped after it (its log tail when it never gets
    ready)."""
    try:
        try:
            server.wait_ready(timeout_s=timeout_s)
        except BenchError as exc:
            if log is None or not log.exists():
                raise
            tail = log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{exc}; its output ends with:\n{tail}") from None
        yield
    finally:
        server.stop(timeout_s=30)


def predictor_server(args: argparse.Namespace, log: Path) -> PinnedProcess:
    env = {
        "PREDICTOR_REPOSITORY": str(args.repo),
        "PREDICTOR_HOST": "127.0.0.1",
        "PREDICTOR_PORT": str(args.predictor_port),
        "PREDICTOR_GRPC_PORT": str(args.predictor_port + 1),
        "PREDICTOR_POLL_INTERVAL_S": "0",
    }
    return service("predictor", env, args.server_cpus, args.predictor_port, log)


def triton_server(args: argparse.Namespace, run_dir: Path) -> PinnedProcess:
    http, grpc, metrics = args.triton_port, args.triton_port + 1, args.triton_port + 2
    env = {
        "TRITON_REPOSITORY": str(args.repo),
        "TRITON_MODEL": args.model,
        "TRITON_RUN_DIR": str(run_dir),
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
    }
    base = f"http://127.0.0.1:{http}"
    checks = [
        http_ready(f"{base}/v2/health/ready"),
        http_ready(f"{base}/v2/models/{args.model}_ensemble/ready"),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    return PinnedProcess(
        "tritonserver",
        [sys.executable, "-m", "services.triton", "run"],
        _inherited("TRITON_", env),
        cpus=args.server_cpus,
        ready=lambda: all(check() for check in checks),
        log=run_dir / "tritonserver-bench.log",
    )


def measure_all(
    tool: PerfAnalyzer, targets: list[Target], args: argparse.Namespace
) -> Iterator[Row]:
    for target in targets:
        try:
            result = perf_analyzer.run(
                tool,
                url=target.url,
                model=target.model,
                input_data=target.input_data,
                protocol=target.protocol,
                service_kind=target.service_kind,
                concurrency=args.concurrency,
                requests=args.requests,
                warmup_requests=args.warmup,
                headers=target.headers,
            )
        except PerfAnalyzerError as exc:
            row = Row(target, None, " ".join(str(exc).split())[-300:])
        else:
            row = Row(target, result)
        done = "ok" if row.result is not None else f"FAILED: {row.error}"
        print(f"{target.engine} {target.protocol} {target.model}: {done}", file=sys.stderr)
        yield row


def table(rows: list[Row]) -> str:
    lines = [
        "| engine | protocol | model | concurrency | requests | infer/s | p50 ms | p90 ms "
        "| p99 ms | result |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        t, r = row.target, row.result
        protocol = "REST" if t.protocol == "http" else "gRPC"
        if r is None:
            lines.append(
                f"| {t.engine} | {protocol} | {t.model} | | | | | | | failed: {row.error} |"
            )
            continue
        lines.append(
            f"| {t.engine} | {protocol} | {t.model} | {r.concurrency} | {r.requests} "
            f"| {r.throughput:.1f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | ok |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        tool = perf_analyzer.install(log=lambda line: print(line, file=sys.stderr))
    except PerfAnalyzerError as exc:
        raise BenchError(str(exc)) from None
    ensure_model(args.repo, args.model)
    if args.server_cpus:
        pin_load_generator(args.server_cpus, args.client_cpus or args.server_cpus)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-bench-") as tmp:
        folder = Path(tmp)
        payloads = Payloads(args.repo, args.model, folder)

        def predictor() -> list[Row]:
            port = args.predictor_port
            targets = payloads.v2_targets(
                "predictor", args.model, f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
            )
            log = folder / "predictor.log"
            with running(predictor_server(args, log), 120, log):
                return list(measure_all(tool, targets, args))

        def triton() -> list[Row]:
            port = args.triton_port
            targets = payloads.v2_targets(
                "triton", args.model, f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
            )
            server = triton_server(args, folder / "triton")
            with running(server, 180, folder / "triton" / "tritonserver-bench.log"):
                return list(measure_all(tool, targets, args))

        def torchserve() -> list[Row]:
            base = TorchServeSettings(repository=args.repo, model=args.model)
            settings, env = bench_settings(base, folder / "torchserve")
            log = folder / "torchserve-launcher.log"
            server = PinnedProcess(
                "torchserve launcher",
                [sys.executable, "-m", "services.torchserve", "up", "--foreground"],
                _inherited("TORCHSERVE_", env),
                cpus=args.server_cpus,
                ready=lambda: is_ready(settings),
                log=log,
            )
            with running(server, settings.start_timeout_s + 30, log):
                key = read_keys(settings.key_file).inference
                target = Target(
                    "torchserve",
                    "http",
                    args.model,
                    f"127.0.0.1:{settings.inference_port}",
                    payloads.files,
                    service_kind="torchserve",
                    headers={"Authorization": f"Bearer {key}"},
                )
                return list(measure_all(tool, [target], args))

        engines: dict[str, Callable[[], list[Row]]] = {
            "predictor": predictor,
            "triton": triton,
            "torchserve": torchserve,
        }
        for name in args.engines:
            rows += engines[name]()
    print(f"{tool.version()}; {args.requests} requests per row at concurrency {args.concurrency}")
    for engine in dict.fromkeys(row.target.engine for row in rows):
        print(serving_line(engine, args.repo, args.model))
    print()
    print(table(rows))
    return 0 if all(row.result is not None for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.perf_analyzer_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["predictor", "triton", "torchserve"],
        default=["predictor", "triton", "torchserve"],
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500, help="measured requests per row")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per row")
    parser.add_argument("--predictor-port", type=int, default=18941, help="REST; gRPC is +1")
    parser.add_argument("--triton-port", type=int, default=18951, help="HTTP; gRPC +1, metrics +2")
    parser.add_argument("--server-cpus", type=parse_cpus, default=None, help="pin the servers")
    parser.add_argument("--client-cpus", type=parse_cpus, default=None, help="pin perf_analyzer")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
