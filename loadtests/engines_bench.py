"""``python -m loadtests.engines_bench``: the predictor, Triton and TorchServe side by side.

    python -m loadtests.engines_bench --repo model_repository --seconds 5 --rounds 3

Starts every candidate direct, with nothing in front of it, on free loopback ports: the
predictor once per engine (TorchScript and ONNX), the local tritonserver (the Triton launcher,
python-backend twins of the repository's newest version) and TorchServe (its launcher). All of
them serve that version with the serving config its manifest gives, are pinned to the server
CPU and are asked, each in its own native protocol, about the same held-out digit PNG:

* predictor: ``POST /predict``, the JSON body with the image in base64 and ``top_k`` 1;
* Triton: ``POST /v2/models/classifier_ensemble/infer`` with the image as the BYTES ``IMAGE``
  tensor in the binary tensor extension, asking for the top class;
* TorchServe: ``POST /predictions/<model>`` with the PNG as the body.

Each body is built once. Before measuring, one request per candidate is checked for a right
answer; during the runs a status other than 200 counts as an error. The load generator is wrk
(pinned to the client CPU, one thread, a Lua script that sends the prepared body and writes
the latency histogram), or the harness's closed-loop client where wrk is not installed
(``--client harness`` asks for it). Rounds alternate the candidates (the order rotates every
round) so slow drift of a busy machine hits all alike; a cell pools its rounds. The report is a
table of req/s, p50, p99, errors and the server's CPU milliseconds per request for every
candidate and concurrency, the ratios predictor / Triton, and the load average of the machine
while it ran (figures on a loaded machine are noise: read the CPU ms per request first).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.harness import (
    BenchError,
    CpuMeter,
    HttpSender,
    PinnedProcess,
    cpu_list,
    cpu_ms_per_request,
    http_ready,
    http_request,
    measure,
    pin_load_generator,
    processes_cpu_seconds,
    run_main,
    serving_line,
)
from loadtests.precision_bench import model_only_images_per_s, model_only_table
from loadtests.predictor_bench import MODEL, start_predictor
from loadtests.targets import AnswerError, parse_predict_response, parse_triton_classification
from loadtests.torchserve_bench import _free_ports, bench_settings, is_ready
from services.common.debian import PackageError, apt_install
from services.common.repository import INT8_SUFFIX
from services.torchserve.config import TorchServeSettings, read_keys
from services.torchserve.launcher import down, instance_processes
from services.triton.launcher import LocalTriton
from services.triton.protocol import binary_infer_request, ensemble_name
from services.triton.settings import TritonSettings
from training.digits import held_out_pngs

#: Predictor / Triton req/s the performance issue asks for, by concurrency (never asserted).
TARGET_RATIOS: dict[int, float] = {1: 1.5, 8: 1.3, 32: 1.3}
#: Unmeasured load each candidate gets once it is ready (first calls pay for lazy init).
WARMUP_CONCURRENCY = 8

#: wrk's script: the prepared request, and in ``done`` one JSON line with the counts and the
#: latency histogram (microseconds -> requests), so rounds can be pooled exactly.
WRK_SCRIPT = """\
local body_file = assert(io.open(os.getenv("ENGINES_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers = {}
for name, value in string.gmatch(os.getenv("ENGINES_BENCH_HEADERS"), "([^\\n:]+): ([^\\n]*)") do
  wrk.headers[name] = value
end

done = function(summary, latency, requests)
  local pairs = {}
  for i = 1, #latency do
    local value, count = latency(i)
    pairs[#pairs + 1] = string.format("[%d,%d]", value, count)
  end
  local e = summary.errors
  io.write(string.format(
    'ENGINES_BENCH {"requests":%d,"duration_us":%d,"errors":%d,"histogram":[%s]}\\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, table.concat(pairs, ",")))
end
"""


@dataclass
class Target:
    """One candidate's native request and how to tell a right answer."""

    port: int
    path: str
    body: bytes
    headers: dict[str, str]
    check: Callable[[bytes], None]
    """Raises AnswerError when a 200 answer's body is not a right one."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def check_once(self) -> None:
        """One request, answered 200 and right, or BenchError."""
        request = urllib.request.Request(self.url, self.body, self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{self.url} answered {exc.code}: {exc.read()[:300]!r}") from None
        except OSError as exc:
            raise BenchError(f"{self.url}: {exc}") from None
        try:
            self.check(answer)
        except AnswerError as exc:
            raise BenchError(f"{self.url} answered wrongly: {exc}") from None


@dataclass
class Candidate:
    """A server under test: its process, how to build its request once it is ready, what its
    CPU time is and how to stop it."""

    name: str
    server: PinnedProcess
    make_target: Callable[[], Target]
    cpu_seconds: Callable[[], float]
    stop: Callable[[], object]
    ready_timeout_s: float = 180.0
    log: Path | None = None
    """Where the server writes its output (quoted when it fails to start)."""
    target: Target | None = None


@dataclass
class Cell:
    """Every measured round of one candidate at one concurrency, pooled."""

    candidate: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    histogram: Counter[int] = field(default_factory=Counter)
    """Latency in microseconds -> requests."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def percentile_ms(self, q: float) -> float:
        """The ``q`` percentile of the pooled latencies (the nearest recorded microsecond)."""
        if not self.histogram:
            return float("nan")
        values = sorted(self.histogram)
        counts = np.cumsum([self.histogram[v] for v in values])
        rank = q / 100.0 * (int(counts[-1]) - 1)
        index = min(int(np.searchsorted(counts, rank, side="right")), len(values) - 1)
        return values[index] / 1000.0

    @property
    def server_cpu_ms(self) -> float:
        return cpu_ms_per_request(self.server_cpu_s, self.requests)

    @property
    def client_cpu(self) -> float:
        """Share of one CPU the load generator used."""
        return self.client_cpu_s / self.seconds if self.seconds else float("nan")


# --------------------------------------------------------------------------- the candidates


def _check_predictor(answer: bytes) -> None:
    parse_predict_response(answer, 1)


def _check_torchserve(answer: bytes) -> None:
    try:
        data = json.loads(answer)
    except ValueError as exc:
        raise AnswerError(f"not JSON: {answer[:200]!r}") from exc
    if not isinstance(data, dict) or not data:
        raise AnswerError(f"no class scores in {answer[:200]!r}")


def predictor_candidate(
    repo: Path,
    engine: str,
    cpus: set[int],
    image: bytes,
    workers: int = 1,
    precision: str = "fp32",
) -> Candidate:
    """The predictor on ``engine`` as ``workers`` processes at ``precision``, started by the
    predictor bench's own starter."""
    (port,) = _free_ports(1)
    server = start_predictor(repo, engine, cpus, None, port, precision=precision, workers=workers)
    body = json.dumps({"image": base64.b64encode(image).decode(), "top_k": 1}).encode()
    headers = {"Content-Type": "application/json"}

    def target() -> Target:
        return Target(port, "/predict", body, headers, _check_predictor)

    label = engine if precision == "fp32" else f"{engine} {precision}"
    name = f"predictor ({label})" if workers == 1 else f"predictor ({label}, {workers} workers)"
    return Candidate(name, server, target, server.cpu_seconds, server.stop)


def triton_candidate(
    repo: Path,
    cpus: set[int],
    image: bytes,
    run_dir: Path,
    instances: int | None = None,
    precision: str = "fp32",
) -> Candidate:
    """The local tritonserver (``python -m services.triton run``) on free ports; ``instances``
    overrides the model's instance count (classifier instances); asked for its fp32 ensemble
    or (``precision`` int8) the int8 one."""
    http, grpc, metrics = _free_ports(3)
    settings = TritonSettings(
        repository=repo,
        model=MODEL,
        run_dir=run_dir,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    env = {
        "TRITON_REPOSITORY": str(repo),
        "TRITON_MODEL": MODEL,
        "TRITON_RUN_DIR": str(run_dir),
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
    }
    if instances is not None:
        env["TRITON_INSTANCE_COUNT"] = str(instances)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    base = f"http://{settings.http_url}"
    ensemble = settings.ensemble if precision == "fp32" else ensemble_name(MODEL + INT8_SUFFIX)
    checks = [
        http_ready(f"{base}/v2/health/ready"),
        http_ready(f"{base}/v2/models/{ensemble}/ready"),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "tritonserver.log"
    server = PinnedProcess(
        "tritonserver",
        [sys.executable, "-m", "services.triton", "run"],  # it becomes tritonserver
        inherited | env,
        cpus=cpus,
        ready=lambda: all(check() for check in checks),
        log=log,
    )
    body, headers = binary_infer_request([image], 1)  # built once, sent as it is

    def check(answer: bytes) -> None:
        parse_triton_classification(answer, ensemble, 1)

    def target() -> Target:
        return Target(http, f"/v2/models/{ensemble}/infer", body, headers, check)

    def stop() -> None:
        server.stop(timeout_s=settings.stop_timeout_s)
        LocalTriton(settings).stop()  # nothing runs now: only clears its pid file

    name = "Triton" if precision == "fp32" else f"Triton {precision}"
    return Candidate(name, server, target, server.cpu_seconds, stop, settings.ready_timeout_s, log)


def torchserve_candidate(repo: Path, cpus: set[int], image: bytes, run_dir: Path) -> Candidate:
    """TorchServe (``python -m services.torchserve up --foreground``) on free ports."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TORCHSERVE_")}
    # Generous: every candidate starts at once on one CPU, the JVM the slowest of them.
    base = TorchServeSettings(repository=repo, model=MODEL, start_timeout_s=300)
    settings, env = bench_settings(base, run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / "torchserve-launcher.log"
    server = PinnedProcess(
        "TorchServe launcher",
        [sys.executable, "-m", "services.torchserve", "up", "--foreground"],
        inherited | env | {"TORCHSERVE_MODEL": MODEL, "TORCHSERVE_START_TIMEOUT_S": "300"},
        cpus=cpus,
        ready=lambda: is_ready(settings),
        log=log,
    )

    def target() -> Target:  # the key file exists once TorchServe runs
        headers = {
            "Content-Type": "image/png",
            "Authorization": f"Bearer {read_keys(settings.key_file).inference}",
        }
        port = settings.inference_port
        return Target(port, f"/predictions/{MODEL}", image, headers, _check_torchserve)

    def cpu_seconds() -> float:  # TorchServe leads a process group of its own
        return processes_cpu_seconds([p.pid for p in instance_processes(settings)])

    def stop() -> None:
        # SIGTERM makes the launcher stop TorchServe and exit; `down` for what outlived it.
        server.stop(timeout_s=settings.stop_timeout_s + 15)
        if instance_processes(settings):
            down(settings)

    return Candidate(
        "TorchServe", server, target, cpu_seconds, stop, settings.start_timeout_s + 30, log
    )


# --------------------------------------------------------------------------- load generators


@dataclass
class Run:
    """What one load-generator run measured."""

    requests: int
    errors: int
    seconds: float
    client_cpu_s: float
    histogram: Counter[int]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Wrk:
    """wrk, one thread, ``concurrency`` connections, the prepared request (a Lua script)."""

    def __init__(self, folder: Path, binary: str) -> None:
        self.folder = folder
        self.binary = binary
        self.script = folder / "engines_bench.lua"
        self.script.write_text(WRK_SCRIPT)

    def run(self, target: Target, concurrency: int, seconds: int) -> Run:
        body = self.folder / f"body-{target.port}"
        if not body.exists():
            body.write_bytes(target.body)
        env = os.environ | {
            "ENGINES_BENCH_BODY": str(body),
            "ENGINES_BENCH_HEADERS": "".join(f"{k}: {v}\n" for k, v in target.headers.items()),
        }
        command = [self.binary, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s"]
        cpu0 = children_cpu_seconds()
        done = subprocess.run(
            [*command, "-s", str(self.script), target.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        client_cpu_s = children_cpu_seconds() - cpu0
        line = next(
            (text for text in done.stdout.splitlines() if text.startswith("ENGINES_BENCH ")), None
        )
        if done.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
        data = json.loads(line.split(" ", 1)[1])
        return Run(
            requests=int(data["requests"]),
            errors=int(data["errors"]),
            seconds=int(data["duration_us"]) / 1e6,
            client_cpu_s=client_cpu_s,
            histogram=Counter({int(us): int(n) for us, n in data["histogram"]}),
        )


class HarnessClient:
    """The harness's closed-loop keep-alive client, one connection per caller."""

    def run(self, target: Target, concurrency: int, seconds: int) -> Run:
        request = http_request(target.path, target.body, target.port, target.headers)
        loop, cpu = measure(HttpSender.connector(target.port, [request]), concurrency, {},
                            seconds=float(seconds))  # fmt: skip
        histogram = Counter(round(s * 1e6) for s in loop.latencies)
        return Run(loop.requests, loop.errors, loop.seconds, cpu.seconds["client"], histogram)


LoadGenerator = Wrk | HarnessClient


# --------------------------------------------------------------------------- the run


def start(args: argparse.Namespace, image: bytes, folder: Path) -> list[Candidate]:
    """Every candidate asked for, started at once, then each waited on and checked."""
    cpus = set(args.server_cpu)
    factories: dict[str, list[Callable[[], Candidate]]] = {
        engine: [
            functools.partial(predictor_candidate, args.repo, engine, cpus, image, workers)
            for workers in args.workers
        ]
        for engine in ("torchscript", "onnx")
    }
    factories["triton"] = [
        lambda: triton_candidate(args.repo, cpus, image, folder / "triton", args.triton_instances)
    ]
    factories["onnx-int8"] = [
        functools.partial(
            predictor_candidate, args.repo, "onnx", cpus, image, workers, precision="int8"
        )
        for workers in args.workers
    ]
    factories["triton-int8"] = [
        lambda: triton_candidate(
            args.repo, cpus, image, folder / "triton-int8", args.triton_instances, "int8"
        )
    ]
    factories["torchserve"] = [
        lambda: torchserve_candidate(args.repo, cpus, image, folder / "torchserve" / "run")
    ]
    candidates: list[Candidate] = []
    try:
        for name in args.candidates:
            candidates.extend(factory() for factory in factories[name])
        for candidate in candidates:
            try:
                candidate.server.wait_ready(timeout_s=candidate.ready_timeout_s)
            except BenchError as exc:
                log = candidate.log.read_text(errors="replace") if candidate.log else ""
                raise BenchError(f"{exc}; its output ends with:\n{log[-3000:]}") from None
            candidate.target = candidate.make_target()
            candidate.target.check_once()
    except BaseException:
        stop_all(candidates)
        raise
    return candidates


def stop_all(candidates: list[Candidate]) -> None:
    for candidate in candidates:
        candidate.stop()


def measure_rounds(
    candidates: list[Candidate], generator: LoadGenerator, args: argparse.Namespace
) -> dict[tuple[str, int], Cell]:
    """Rounds over every concurrency; in each, every candidate once, the order rotating."""
    cells = {(c.name, n): Cell(c.name, n) for c in candidates for n in args.concurrency}
    for candidate in candidates:  # warm-up, not measured
        assert candidate.target is not None
        if args.warmup:
            generator.run(candidate.target, WARMUP_CONCURRENCY, args.warmup)
    for round_number in range(args.rounds):
        shift = round_number % len(candidates)
        order = candidates[shift:] + candidates[:shift]
        for concurrency in args.concurrency:
            for candidate in order:
                assert candidate.target is not None
                with CpuMeter({"server": candidate.cpu_seconds}) as cpu:
                    run = generator.run(candidate.target, concurrency, args.seconds)
                cell = cells[(candidate.name, concurrency)]
                cell.requests += run.requests
                cell.errors += run.errors
                cell.seconds += run.seconds
                cell.client_cpu_s += run.client_cpu_s
                cell.server_cpu_s += cpu.seconds["server"]
                cell.histogram.update(run.histogram)
                print(
                    f"round {round_number + 1}: {candidate.name} c={concurrency}: "
                    f"{run.requests / run.seconds if run.seconds else 0:.0f} req/s",
                    file=sys.stderr,
                )
    return cells


def table(cells: Mapping[tuple[str, int], Cell]) -> str:
    rows = [
        "| candidate | concurrency | req/s | p50 ms | p99 ms | errors | server CPU ms/req "
        "| client CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in cells.values():
        rows.append(
            f"| {cell.candidate} | {cell.concurrency} | {cell.rps:.0f} "
            f"| {cell.percentile_ms(50):.2f} | {cell.percentile_ms(99):.2f} | {cell.errors} "
            f"| {cell.server_cpu_ms:.3f} | {cell.client_cpu:.0%} |"
        )
    return "\n".join(rows)


def ratio_lines(cells: Mapping[tuple[str, int], Cell], concurrency: list[int]) -> list[str]:
    """Predictor / Triton req/s per engine and concurrency, beside the issue's targets."""
    lines = []
    predictors = sorted({name for name, _ in cells if name.startswith("predictor")})
    for name in predictors:
        parts = []
        for n in concurrency:
            triton = cells.get(("Triton", n))
            if triton is None:
                continue
            ratio = cells[(name, n)].rps / triton.rps if triton.rps else float("nan")
            target = TARGET_RATIOS.get(n)
            parts.append(f"c={n} {ratio:.2f}x" + (f" (target >= {target}x)" if target else ""))
        if parts:
            lines.append(f"{name} / Triton req/s: " + ", ".join(parts))
    for int8, fp32 in (("predictor (onnx int8)", "predictor (onnx)"), ("Triton int8", "Triton")):
        pairs = [(n, cells.get((int8, n)), cells.get((fp32, n))) for n in concurrency]
        shown = [f"c={n} {a.rps / b.rps:.2f}x" for n, a, b in pairs if a and b and b.rps]
        if shown:
            lines.append(f"{int8} / {fp32} req/s: " + ", ".join(shown))
    return lines


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def run(args: argparse.Namespace) -> int:
    if args.seconds < 1 or args.warmup < 0:
        raise BenchError("--seconds must be at least 1 and --warmup at least 0 (whole seconds)")
    pin_load_generator(set(args.server_cpu), set(args.client_cpu))
    wrk = shutil.which("wrk")
    if args.client == "wrk" and wrk is None:
        try:
            apt_install("wrk", "--client wrk")
        except PackageError as exc:
            raise BenchError(f"{exc}; or use --client harness") from None
        wrk = shutil.which("wrk")
    image = held_out_pngs(1)[0]
    if args.candidates is None:
        args.candidates = default_candidates(args.repo)
    model_only: str | None = None
    if any(name.endswith("-int8") for name in args.candidates):
        # The forward pass alone, fp32 and int8 (the precision bench's measurement), before
        # any server runs on the CPU it is pinned to.
        rates = model_only_images_per_s(
            args.repo, args.server_cpu[0], MODEL_ONLY_BATCHES, args.seconds, args.rounds
        )
        model_only = model_only_table(rates, MODEL_ONLY_BATCHES)
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        folder = Path(tmp)
        use_wrk = wrk is not None and args.client in ("auto", "wrk")
        generator: LoadGenerator = Wrk(folder, wrk) if use_wrk and wrk else HarnessClient()
        load_before = load_average()
        candidates = start(args, image, folder)
        try:
            cells = measure_rounds(candidates, generator, args)
        finally:
            stop_all(candidates)
        load_after = load_average()
    client = "wrk (one thread)" if isinstance(generator, Wrk) else "the harness's client"
    print(
        f"servers pinned to CPU {cpu_list(args.server_cpu)}, {client} pinned to CPU "
        f"{cpu_list(args.client_cpu)}; "
        f"{args.rounds} round(s) of {args.seconds}s per cell after {args.warmup}s warm-up; "
        f"load average {load_before} before, {load_after} after"
    )
    print(serving_line("every engine", args.repo, MODEL))
    if args.triton_instances is not None:
        print(f"Triton runs {args.triton_instances} classifier instance(s) (TRITON_INSTANCE_COUNT)")
    print()
    if model_only is not None:
        print(
            f"model only: ONNX Runtime on CPU {args.server_cpu[0]}, one thread, "
            f"median of {args.rounds} round(s)\n\n{model_only}\n"
        )
    print(table(cells) + "\n")
    for line in ratio_lines(cells, args.concurrency):
        print(line)
    if args.json:
        report = [
            {
                "candidate": c.candidate,
                "concurrency": c.concurrency,
                "requests": c.requests,
                "errors": c.errors,
                "rps": c.rps,
                "p50_ms": c.percentile_ms(50),
                "p99_ms": c.percentile_ms(99),
                "server_cpu_ms": c.server_cpu_ms,
                "client_cpu": c.client_cpu,
            }
            for c in cells.values()
        ]
        args.json.write_text(json.dumps({"load_average": load_after, "cells": report}, indent=2))
    return 0 if all(c.errors == 0 and c.requests > 0 for c in cells.values()) else 1


CANDIDATES = ["torchscript", "onnx", "triton", "torchserve", "onnx-int8", "triton-int8"]
#: Batch sizes of the model-only table (int8 against fp32).
MODEL_ONLY_BATCHES = [1, 8, 32]


def default_candidates(repo: Path) -> list[str]:
    """Every candidate; the int8 ones only when the newest version has an int8 model."""
    from services.common.repository import load_version

    has_int8 = load_version(repo, MODEL).onnx_int8_path is not None
    return [name for name in CANDIDATES if has_int8 or not name.endswith("-int8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.engines_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--server-cpu", type=int, nargs="+", default=[0], help="CPUs of every server"
    )
    parser.add_argument(
        "--client-cpu", type=int, nargs="+", default=[1], help="CPUs of the load generator"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="PREDICTOR_WORKERS: a predictor candidate per count (e.g. 1 2)",
    )
    parser.add_argument(
        "--triton-instances", type=int, help="classifier instances of Triton (default: the model's)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per cell")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured seconds per server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--candidates",
        nargs="+",
        choices=CANDIDATES,
        default=None,
        help="predictor engines (torchscript, onnx), triton, torchserve, and the int8 model "
        "on the predictor (onnx-int8) and Triton (triton-int8); default: all, the int8 ones "
        "only for a version published with --int8 (then also a model-only table per precision)",
    )
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "harness"],
        default="auto",
        help="load generator (auto: wrk where installed)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
