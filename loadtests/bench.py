"""``make bench``: the same Locust load against each backend in turn, through the gateway.

    python -m loadtests.bench --users 8 --spawn-rate 8 --duration 60s

The stack must be up (``make up``). For each backend, one at a time:

1. (once, before any load) ask the gateway about every test image with ``?backend=<b>``,
   one request at a time: the answers every response under load must repeat, and the warm-up;
2. scrape the gateway's ``/metrics``;
3. run ``locust --headless`` with only that backend's gateway user, ``-u/-r/-t`` as given,
   ``--csv`` and ``--json-file`` into the run folder, while a thread samples the CPU time of
   the Locust process and of the gateway's and the engine's process trees (found by their
   listening ports);
4. scrape ``/metrics`` again.

Then :func:`loadtests.report.build_report` writes ``reports/bench-<timestamp>/report.md``,
``latency.png`` and ``throughput.png`` and the table is printed. Exit status: 0 when every
backend ran without a failed request, 1 when some failed, 2 when the run could not start.

On two cores the load generator and the servers compete for the CPU. When the servers are
pinned to a subset of the CPUs (e.g. ``taskset -c 0`` in the stack), ``--locust-cpus auto``
pins Locust to the others (the harness's pinned runner); the report says which side was
CPU-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from loadtests.harness import BenchError, PinnedProcess, cpu_list, cpu_seconds, parse_cpus
from loadtests.report import CpuUsage, build_report
from loadtests.targets import (
    BACKENDS,
    AnswerError,
    GatewayTarget,
    LoadTestSettings,
    Reference,
    compute_reference,
    load_payloads,
    save_references,
)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
#: Locust user class per backend (loadtests/locustfile.py).
USER_CLASSES = {
    "predictor": "GatewayPredictorUser",
    "torchserve": "GatewayTorchServeUser",
    "triton": "GatewayTritonUser",
}
#: The gateway's request-duration histogram and its backend label (services/gateway).
DEFAULT_METRIC = "gateway_request_duration_seconds"
DEFAULT_METRIC_LABEL = "backend"
SAMPLE_INTERVAL_S = 0.5
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def duration_seconds(text: str) -> int:
    """Locust's ``-t`` syntax (``90``, ``90s``, ``1m30s``, ``1h``) in seconds."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 1m or 1m30s")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total < 1:
        raise argparse.ArgumentTypeError("the duration must be at least one second")
    return total


# --------------------------------------------------------------------------- processes


def listening_processes(ports: dict[str, int]) -> dict[str, psutil.Process]:
    """The process listening on each named port (missing when not found or not visible)."""
    wanted = {port: name for name, port in ports.items()}
    found: dict[str, psutil.Process] = {}
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.pid is None:
                continue
            name = wanted.get(conn.laddr.port)
            if name is not None and name not in found:
                with contextlib.suppress(psutil.Error):
                    found[name] = psutil.Process(conn.pid)
    return found


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def _affinity(processes: list[psutil.Process]) -> set[int]:
    cpus: set[int] = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            cpus.update(process.cpu_affinity() or [])
    return cpus


@dataclass
class CpuSeries:
    """Cumulative CPU seconds of a group of process trees, sampled over time."""

    roots: list[psutil.Process]
    points: list[tuple[float, float]] = field(default_factory=list)
    _base: dict[int, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)

    def sample(self, now: float) -> None:
        for root in self.roots:
            for process in _tree(root):
                try:
                    used = cpu_seconds(process.pid)
                except OSError:
                    continue  # exited between listing and reading: its last sample stays
                self._base.setdefault(process.pid, used)
                self._last[process.pid] = used
        self.points.append((now, sum(self._last[p] - self._base[p] for p in self._last)))

    def percent(self, start: float, end: float) -> float:
        """Mean CPU use between ``start`` and ``end`` in percent of one core."""
        inside = [(t, c) for t, c in self.points if start <= t <= end]
        if len(inside) < 2:
            inside = self.points[:1] + self.points[-1:]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        return 100.0 * (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


class CpuSampler:
    """A thread sampling CPU time of Locust, the gateway, the engine and the whole machine."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.series = {name: CpuSeries(roots) for name, roots in groups.items()}
        self.machine: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            now = time.time()
            for series in self.series.values():
                series.sample(now)
            times = psutil.cpu_times()
            self.machine.append((now, times.user + times.system + getattr(times, "nice", 0.0)))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def machine_percent(self, start: float, end: float) -> float:
        """Busy share of all the machine's cores between ``start`` and ``end``."""
        series = CpuSeries([], points=self.machine)
        return series.percent(start, end) / (psutil.cpu_count() or 1)


# --------------------------------------------------------------------------- bench


@dataclass
class BenchConfig:
    users: int
    spawn_rate: float
    duration: str
    backends: list[str]
    gateway_url: str
    out_dir: Path
    metric: str
    metric_label: str
    locust_cpus: str


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{psutil.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def _scrape(client: httpx.Client, url: str, into: Path, notes: list[str]) -> None:
    """Save the gateway's /metrics; a failure is noted (the report then lacks server side)."""
    try:
        response = client.get(f"{url}/metrics")
        response.raise_for_status()
    except httpx.HTTPError as exc:
        notes.append(f"{into.name}: gateway /metrics could not be read: {exc}")
        return
    into.write_text(response.text)


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def references(config: BenchConfig, settings: LoadTestSettings) -> dict[str, Reference]:
    """Every backend's idle answers through the gateway (also the warm-up of each engine)."""
    payloads = load_payloads(settings.images)
    found: dict[str, Reference] = {}
    for backend in config.backends:
        target = GatewayTarget(settings, backend)
        try:
            found[target.name] = compute_reference(
                target, config.gateway_url, payloads, settings.reference_timeout_s
            )
        except AnswerError as exc:
            raise BenchError(
                f"{backend} does not answer correctly through the gateway, so there is nothing "
                f"to measure: {exc}. Is the stack up (`make up`)? To leave a backend out: "
                "--backends predictor,triton"
            ) from None
    return found


def placement(
    config: BenchConfig, servers: dict[str, psutil.Process]
) -> tuple[set[int] | None, set[int]]:
    """(CPUs to pin Locust to or None, CPUs the servers may use)."""
    available = set(os.sched_getaffinity(0))
    server_cpus = _affinity([p for root in servers.values() for p in _tree(root)]) or available
    if config.locust_cpus == "none":
        return None, server_cpus
    if config.locust_cpus == "auto":
        rest = available - server_cpus
        return (rest or None), server_cpus
    return parse_cpus(config.locust_cpus), server_cpus


def run_backend(
    config: BenchConfig,
    settings: LoadTestSettings,
    backend: str,
    run_dir: Path,
    notes: list[str],
) -> int:
    """One backend's Locust run; returns Locust's exit status."""
    engine_port = _port(settings.engine_url(backend))
    servers = listening_processes({"gateway": _port(config.gateway_url), backend: engine_port})
    for name in ("gateway", backend):
        if name not in servers:
            notes.append(f"{backend}: no process seen listening for {name}: its CPU is not counted")
    pin, server_cpus = placement(config, servers)

    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(config.users), "-r", str(config.spawn_rate), "-t", config.duration,
        "--host", config.gateway_url, "--stop-timeout", "10", "--only-summary",
        "--csv", str(run_dir / backend), "--json-file", str(run_dir / backend),
        USER_CLASSES[backend],
    ]  # fmt: skip
    env = {
        **os.environ,
        "LOADTEST_GATEWAY_URL": config.gateway_url,
        "LOADTEST_REFERENCE_FILE": str(run_dir / "references.json"),
        "LOADTEST_SHAPE": "none",  # -u/-r/-t decide, whatever the caller's environment says
        "LOADTEST_IMAGES": str(settings.images),
        "LOADTEST_TOP_K": str(settings.top_k),
        "LOADTEST_MIN_MARGIN": str(settings.min_margin),
    }
    with httpx.Client(timeout=10.0) as client:
        _scrape(client, config.gateway_url, run_dir / f"{backend}_metrics_before.txt", notes)

        where = f"Locust on CPU {cpu_list(pin)}" if pin else "Locust not pinned"
        print(f"bench: {backend}: {config.users} users for {config.duration} ({where})...",
              flush=True)  # fmt: skip
        log = run_dir / f"{backend}_locust.log"
        with PinnedProcess("locust", command, env, cpus=pin, log=log) as locust:
            groups = {"load_generator": [psutil.Process(locust.pid)]}
            groups.update({"gateway": [servers["gateway"]]} if "gateway" in servers else {})
            groups.update({"engine": [servers[backend]]} if backend in servers else {})
            with CpuSampler(groups) as sampler:
                try:
                    rc = locust.process.wait(timeout=duration_seconds(config.duration) + 120)
                except subprocess.TimeoutExpired:
                    notes.append(f"{backend}: Locust did not stop in time and was killed")
                    rc = -9

        _scrape(client, config.gateway_url, run_dir / f"{backend}_metrics_after.txt", notes)

    if rc not in (0, 1):
        notes.append(f"{backend}: Locust exited with status {rc} (see {log.name})")
    if "CPU usage above" in log.read_text(errors="replace"):
        notes.append(f"{backend}: Locust warned that its CPU usage was above 90%")
    window = _request_window(run_dir / f"{backend}.json")
    if window is not None:
        start, end = window
        series = sampler.series
        usage = CpuUsage(
            load_generator=series["load_generator"].percent(start, end),
            servers=sum(
                series[g].percent(start, end) for g in ("gateway", "engine") if g in series
            ),
            server_cores=len(server_cpus),
            machine=sampler.machine_percent(start, end),
            load_generator_cpus=cpu_list(pin) if pin else cpu_list(os.sched_getaffinity(0)),
            server_cpus=cpu_list(server_cpus),
            gateway=series["gateway"].percent(start, end) if "gateway" in series else 0.0,
            engine=series["engine"].percent(start, end) if "engine" in series else 0.0,
            machine_cores=psutil.cpu_count() or 1,
        )
        (run_dir / f"{backend}_cpu.json").write_text(json.dumps(asdict(usage), indent=2))
    return rc


def _request_window(stats_json: Path) -> tuple[float, float] | None:
    """From the first to the last request of a Locust run, less its first second of ramp-up."""
    try:
        entries = json.loads(stats_json.read_text())
        start = min(float(e["start_time"]) for e in entries)
        end = max(float(e["last_request_timestamp"]) for e in entries)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (min(start + 1.0, (start + end) / 2), end) if end > start else None


def run(config: BenchConfig) -> int:
    settings = LoadTestSettings(gateway_url=config.gateway_url)
    try:
        httpx.get(f"{config.gateway_url}/healthz", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise BenchError(
            f"the gateway at {config.gateway_url} does not answer ({exc}): start the stack "
            "with `make up` (or pass --gateway-url)"
        ) from None
    started = datetime.now()
    run_dir = config.out_dir / f"bench-{started:%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True)
    print(f"bench: reference answers and warm-up for {', '.join(config.backends)}...", flush=True)
    found = references(config, settings)
    save_references(run_dir / "references.json", found)

    notes: list[str] = []
    codes: dict[str, int] = {}
    for backend in config.backends:
        codes[backend] = run_backend(config, settings, backend, run_dir, notes)

    meta = {
        "started": started.isoformat(timespec="seconds"),
        "users": config.users,
        "spawn_rate": config.spawn_rate,
        "duration": config.duration,
        "backends": config.backends,
        "gateway_url": config.gateway_url,
        "metric": config.metric,
        "metric_label": config.metric_label,
        "images": settings.images,
        "top_k": settings.top_k,
        "machine": _machine(),
        "commit": _git_commit(),
        "locust_exit_codes": codes,
        "true_label_agreement": {
            name.partition(":")[2]: ref.true_label_agreement for name, ref in found.items()
        },
        "notes": notes,
    }
    (run_dir / "bench.json").write_text(json.dumps(meta, indent=2))
    table, results = build_report(run_dir)
    print()
    print(table)
    print(f"\nbench: report in {run_dir / 'report.md'}")
    failed = [r.backend for r in results if r.client.failures or not r.client.requests]
    if failed or any(codes.values()):
        print(f"bench: failed requests or Locust errors for {', '.join(failed) or 'some backends'}"
              " (see the report)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--users", "-u", type=int, default=8, help="Locust users (default 8)")
    parser.add_argument(
        "--spawn-rate", "-r", type=float, default=8.0, help="users started per second (default 8)"
    )
    parser.add_argument(
        "--duration", "-t", default="30s", help="per backend, Locust syntax: 30s, 1m (default 30s)"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated (default: all three)"
    )
    parser.add_argument(
        "--gateway-url", default=None, help="default: LOADTEST_GATEWAY_URL or http://127.0.0.1:8000"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="default: reports")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="gateway histogram to read")
    parser.add_argument("--metric-label", default=DEFAULT_METRIC_LABEL, help="its backend label")
    parser.add_argument(
        "--locust-cpus",
        default="auto",
        help="CPUs for Locust: auto (the ones the servers are not pinned to, if any), none, "
        "or a list such as 1",
    )
    args = parser.parse_args(argv)
    try:
        duration_seconds(args.duration)
        if args.locust_cpus not in ("auto", "none"):
            parse_cpus(args.locust_cpus)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        parser.error(f"--backends takes some of {', '.join(BACKENDS)}; got {args.backends!r}")
    if args.users < 1 or args.spawn_rate <= 0:
        parser.error("--users must be at least 1 and --spawn-rate above 0")
    gateway_url = (args.gateway_url or LoadTestSettings().gateway_url).rstrip("/")
    config = BenchConfig(
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration=args.duration,
        backends=backends,
        gateway_url=gateway_url,
        out_dir=args.out_dir,
        metric=args.metric,
        metric_label=args.metric_label,
        locust_cpus=args.locust_cpus,
    )
    try:
        return run(config)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
