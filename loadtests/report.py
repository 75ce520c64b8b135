"""Turn one bench run's raw files into ``report.md``, ``latency.png`` and ``throughput.png``.

``python -m loadtests.report reports/bench-<timestamp>`` rebuilds the report of a finished run;
``bench.py`` calls :func:`build_report` at the end of each run. Inputs, per backend ``<b>``:

* ``<b>.json``: Locust's final statistics (``--json-file``): request and failure counts, the
  response-time histogram (milliseconds, rounded by Locust) and requests per second. Locust's
  ``<b>_stats.csv`` is kept beside it, but it is rewritten on a one-second timer and not at
  exit, so it misses up to the last second of the run; the JSON is written at exit.
* ``<b>_metrics_before.txt`` / ``<b>_metrics_after.txt``: the gateway's ``/metrics`` scraped
  around the run. The difference of the request-duration histogram for ``backend=<b>`` gives
  server-side percentiles, interpolated inside buckets exactly as Prometheus'
  ``histogram_quantile`` does. Locust rounds latencies (to whole milliseconds below 100 ms,
  two significant digits above), the histogram is limited by its bucket bounds instead: the
  two sides are reported next to each other, not merged.
* ``<b>_cpu.json``: CPU used by the load generator and by the server processes (bench.py).
* ``bench.json``: how the run was made (users, duration, metric name, machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: Server CPU use (share of the cores the servers may run on) above which they count as the
#: bottleneck, and the load generator's share of its one core above which it does.
CPU_BOUND_FRACTION = 0.9
#: Share of one core used by unrelated processes above which a saturated machine is blamed on
#: them rather than on the load generator and servers competing.
OTHERS_FRACTION = 0.25


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class ClientStats:
    """Locust's view of one backend's run (latencies in milliseconds)."""

    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    per_second: list[tuple[int, int]]
    """(seconds since the first request, requests completed in that second)."""

    @property
    def error_percent(self) -> float:
        return 100.0 * self.failures / self.requests if self.requests else 0.0


def locust_percentile(response_times: dict[int, int], count: int, q: float) -> float:
    """Percentile of Locust's rounded response-time histogram, computed the way Locust does
    (``locust.stats.calculate_response_time_percentile``; not imported, because importing
    Locust monkey-patches the whole process with gevent)."""
    wanted = int(count * q)
    processed = 0
    for response_time in sorted(response_times, reverse=True):
        processed += response_times[response_time]
        if count - processed <= wanted:
            return float(response_time)
    return 0.0


def read_locust_json(path: Path) -> ClientStats:
    """Sum every request entry of Locust's ``--json-file`` output (one per request name)."""
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not Locust's --json-file output (a list of entries)")
    response_times: dict[int, int] = defaultdict(int)
    per_second: dict[int, int] = defaultdict(int)
    requests = failures = 0
    total_ms = 0.0
    start, end = math.inf, -math.inf
    for entry in entries:
        requests += int(entry["num_requests"])
        failures += int(entry["num_failures"])
        total_ms += float(entry["total_response_time"])
        for ms, n in entry["response_times"].items():
            response_times[int(float(ms))] += int(n)
        for second, n in entry["num_reqs_per_sec"].items():
            per_second[int(second)] += int(n)
        start = min(start, float(entry["start_time"]))
        if entry.get("last_request_timestamp") is not None:
            end = max(end, float(entry["last_request_timestamp"]))
    timed = sum(response_times.values())
    first = min(per_second) if per_second else 0
    return ClientStats(
        requests=requests,
        failures=failures,
        rps=requests / (end - start) if requests and end > start else 0.0,
        p50_ms=locust_percentile(response_times, timed, 0.50),
        p95_ms=locust_percentile(response_times, timed, 0.95),
        p99_ms=locust_percentile(response_times, timed, 0.99),
        mean_ms=total_ms / requests if requests else 0.0,
        per_second=[(s - first, n) for s, n in sorted(per_second.items())],
    )


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class Histogram:
    """Cumulative Prometheus buckets: (upper bound in seconds, count), +Inf last."""

    buckets: list[tuple[float, float]]
    count: float
    sum: float


def read_histogram(metrics_text: str, metric: str, labels: dict[str, str]) -> Histogram:
    """``metric``'s buckets over every series whose labels include ``labels`` (the other
    labels, such as status or model, are summed over). No matching series: all zero."""
    buckets: dict[float, float] = defaultdict(float)
    count = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            if sample.name == f"{metric}_bucket":
                buckets[float(sample.labels["le"])] += sample.value
            elif sample.name == f"{metric}_count":
                count += sample.value
            elif sample.name == f"{metric}_sum":
                total += sample.value
    return Histogram(sorted(buckets.items()), count, total)


def histogram_delta(before: Histogram, after: Histogram) -> Histogram:
    """Observations made between two scrapes. A counter that went down means the gateway
    restarted in between, and the difference would be meaningless."""
    old = dict(before.buckets)
    buckets = [(le, n - old.get(le, 0.0)) for le, n in after.buckets]
    if any(n < 0 for _, n in buckets) or after.count < before.count:
        raise ValueError("the histogram went down between scrapes: did the gateway restart?")
    return Histogram(buckets, after.count - before.count, after.sum - before.sum)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding the
    rank; the lowest bucket starts at 0; a rank in +Inf returns the highest finite bound.
    NaN without observations."""
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        raise ValueError("a histogram needs finite buckets and a +Inf bucket")
    observations = buckets[-1][1]
    if observations <= 0:
        return math.nan
    rank = q * observations
    b = next(i for i, (_, n) in enumerate(buckets) if n >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[b]
    if b == 0 and upper <= 0:
        return upper
    lower, below = buckets[b - 1] if b > 0 else (0.0, 0.0)
    return lower + (upper - lower) * (rank - below) / (count - below)


@dataclass(frozen=True)
class ServerStats:
    """The gateway's request-duration histogram for one backend, over one run (ms)."""

    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    bounds_ms: tuple[float, ...]
    """The histogram's finite bucket bounds: the resolution of the percentiles above."""


def server_stats(delta: Histogram) -> ServerStats:
    return ServerStats(
        requests=round(delta.count),
        p50_ms=1000 * histogram_quantile(0.50, delta.buckets),
        p95_ms=1000 * histogram_quantile(0.95, delta.buckets),
        p99_ms=1000 * histogram_quantile(0.99, delta.buckets),
        mean_ms=1000 * delta.sum / delta.count if delta.count else math.nan,
        bounds_ms=tuple(1000 * le for le, _ in delta.buckets if not math.isinf(le)),
    )


# --------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuUsage:
    """Mean CPU use during one run, in percent of one core (200 = two cores busy)."""

    load_generator: float
    """Locust (one process: it can use at most one core)."""
    servers: float
    """Gateway + engine process trees."""
    server_cores: int
    """Cores the server processes may run on."""
    machine: float
    """All processes on the machine, in percent of all its cores."""
    load_generator_cpus: str
    server_cpus: str
    gateway: float = 0.0
    """The gateway's share of ``servers``."""
    engine: float = 0.0
    """The engine's share of ``servers`` (its whole process tree: workers, stubs)."""
    machine_cores: int = 0
    """CPUs of the machine (0: unknown)."""

    @property
    def others(self) -> float:
        """CPU used by everything else on the machine (other jobs, Prometheus, the bench)."""
        if not self.machine_cores:
            return 0.0
        return max(0.0, self.machine * self.machine_cores - self.load_generator - self.servers)

    def verdict(self) -> str:
        generator_bound = self.load_generator >= 100 * CPU_BOUND_FRACTION
        server_bound = self.servers >= 100 * CPU_BOUND_FRACTION * self.server_cores
        if generator_bound and server_bound:
            return "both CPU-bound"
        if generator_bound:
            return "load generator CPU-bound"
        if server_bound:
            return "server CPU-bound"
        if self.machine >= 100 * CPU_BOUND_FRACTION:
            if self.others >= 100 * OTHERS_FRACTION:
                return "CPU-bound: other processes took CPU"
            return "CPU-bound: generator and servers share the cores"
        return "neither CPU-bound"


def read_cpu(path: Path) -> CpuUsage | None:
    return CpuUsage(**json.loads(path.read_text())) if path.exists() else None


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BackendResult:
    backend: str
    client: ClientStats
    server: ServerStats | None
    server_error: str | None
    cpu: CpuUsage | None


def load_result(run_dir: Path, backend: str, metric: str, label: str) -> BackendResult:
    client = read_locust_json(run_dir / f"{backend}.json")
    server: ServerStats | None = None
    server_error: str | None = None
    try:
        before = (run_dir / f"{backend}_metrics_before.txt").read_text()
        after = (run_dir / f"{backend}_metrics_after.txt").read_text()
        delta = histogram_delta(
            read_histogram(before, metric, {label: backend}),
            read_histogram(after, metric, {label: backend}),
        )
        if delta.count > 0:
            server = server_stats(delta)
        else:
            server_error = f"no {metric}{{{label}={backend!r}}} observations"
    except (OSError, ValueError) as exc:
        server_error = str(exc)
    cpu = read_cpu(run_dir / f"{backend}_cpu.json")
    return BackendResult(backend, client, server, server_error, cpu)


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def results_table(results: list[BackendResult]) -> str:
    """The headline table: one row per backend."""
    rows = [
        "| backend | requests | req/s | client p50 ms | client p95 ms | client p99 ms "
        "| server p50 ms | server p95 ms | server p99 ms | errors % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        c, s = r.client, r.server
        rows.append(
            f"| {r.backend} | {c.requests} | {c.rps:.1f} | {_ms(c.p50_ms)} | {_ms(c.p95_ms)} "
            f"| {_ms(c.p99_ms)} | {_ms(s.p50_ms if s else None)} | {_ms(s.p95_ms if s else None)} "
            f"| {_ms(s.p99_ms if s else None)} | {c.error_percent:.2f} |"
        )
    return "\n".join(rows)


def cpu_table(results: list[BackendResult]) -> str:
    rows = [
        "| backend | Locust CPU % (1 core max) | servers CPU % = gateway + engine "
        "| server cores | other processes CPU % | machine busy % | bottleneck |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        u = r.cpu
        if u is None:
            rows.append(f"| {r.backend} | n/a | n/a | n/a | n/a | n/a | not measured |")
            continue
        rows.append(
            f"| {r.backend} | {u.load_generator:.0f} "
            f"| {u.servers:.0f} = {u.gateway:.0f} + {u.engine:.0f} | {u.server_cores} "
            f"| {u.others:.0f} | {u.machine:.0f} | {u.verdict()} |"
        )
    return "\n".join(rows)


def cpu_summary(results: list[BackendResult]) -> str:
    """One paragraph naming the side that limited the run."""
    measured = [r for r in results if r.cpu is not None]
    if not measured:
        return "CPU use was not measured."
    verdicts = {r.backend: r.cpu.verdict() for r in measured if r.cpu is not None}
    first = measured[0].cpu
    assert first is not None
    placement = (
        f"Locust ran on CPU(s) {first.load_generator_cpus}, the servers on CPU(s) "
        f"{first.server_cpus}."
    )
    generator = [b for b, v in verdicts.items() if v.startswith(("load generator", "both"))]
    servers = [b for b, v in verdicts.items() if v.startswith(("server", "both"))]
    shared = [b for b, v in verdicts.items() if v.endswith("share the cores")]
    disturbed = [b for b, v in verdicts.items() if v.endswith("other processes took CPU")]
    lines = [placement]
    if generator:
        lines.append(
            f"The load generator was CPU-bound for {', '.join(generator)}: Locust used 90% or "
            "more of its one core, so those throughputs are lower bounds on what the server "
            "can do (more Locust processes, `--processes`, or a second machine would push "
            "harder)."
        )
    if servers:
        lines.append(
            f"The servers were CPU-bound for {', '.join(servers)}: they used 90% or more of "
            "the cores they may run on, so those numbers measure the serving stack."
        )
    if shared:
        lines.append(
            f"For {', '.join(shared)} the machine was saturated with neither side alone at its "
            "limit: Locust and the servers competed for the same cores, so the server "
            "figures include time spent waiting for a CPU."
        )
    if disturbed:
        lines.append(
            f"For {', '.join(disturbed)} the machine was saturated and other processes (not "
            "Locust, not the stack's servers) used a noticeable share of it: those numbers "
            "are disturbed; rerun on a quiet machine."
        )
    if not (generator or servers or shared or disturbed):
        lines.append(
            "Neither side was CPU-bound: latency comes from waiting (batching delays, "
            "queues), not from a saturated CPU; more users would raise throughput."
        )
    return " ".join(lines)


def write_plots(results: list[BackendResult], run_dir: Path) -> tuple[Path, Path]:
    """latency.png (percentiles, client and server side) and throughput.png (over time)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    backends = [r.backend for r in results]
    width = 0.12
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: list[tuple[str, Callable[[BackendResult], float]]] = [
        ("client p50", lambda r: r.client.p50_ms),
        ("client p95", lambda r: r.client.p95_ms),
        ("client p99", lambda r: r.client.p99_ms),
        ("server p50", lambda r: r.server.p50_ms if r.server else math.nan),
        ("server p95", lambda r: r.server.p95_ms if r.server else math.nan),
        ("server p99", lambda r: r.server.p99_ms if r.server else math.nan),
    ]
    for i, (name, value) in enumerate(series):
        xs = [x + (i - 2.5) * width for x in range(len(backends))]
        ax.bar(xs, [value(r) for r in results], width, label=name, hatch="//" if i >= 3 else None)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency by backend: Locust (client) and gateway histogram (server)")
    ax.legend(ncols=2, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    latency = run_dir / "latency.png"
    fig.savefig(latency, dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(1, 2))
    left.bar(backends, [r.client.rps for r in results], color="tab:blue")
    left.set_ylabel("requests/s (mean)")
    left.set_title("Throughput")
    left.grid(axis="y", alpha=0.3)
    for r in results:
        # The first and the last second are partial (the run starts and stops mid-second).
        points = r.client.per_second[1:-1] if len(r.client.per_second) > 3 else r.client.per_second
        right.plot([s for s, _ in points], [n for _, n in points], label=r.backend, marker=".")
    right.set_xlabel("seconds since the first request")
    right.set_ylabel("requests completed per second")
    right.set_title("Throughput over time")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    throughput = run_dir / "throughput.png"
    fig.savefig(throughput, dpi=100)
    plt.close(fig)
    return latency, throughput


def build_report(run_dir: Path) -> tuple[str, list[BackendResult]]:
    """Write report.md and both plots into ``run_dir``; return the table and the results."""
    meta: dict[str, Any] = json.loads((run_dir / "bench.json").read_text())
    metric, label = meta["metric"], meta["metric_label"]
    results = [load_result(run_dir, b, metric, label) for b in meta["backends"]]
    write_plots(results, run_dir)
    table = results_table(results)
    measured = next((r.server for r in results if r.server is not None), None)
    bounds = ", ".join(f"{b:g}" for b in measured.bounds_ms) if measured else ""

    lines = [
        f"# Backend comparison through the gateway ({meta.get('started', '')})",
        "",
        f"- Load: {meta['users']} Locust users (closed loop, no think time) spawned at "
        f"{meta['spawn_rate']}/s, {meta['duration']} per backend, one backend at a time, "
        f"all through `{meta['gateway_url']}/predict?backend=<backend>`.",
        f"- Payload: {meta['images']} held-out digits from scikit-learn's digits test split, "
        f"PNG, top_k={meta['top_k']}; every answer checked (schema, answering engine, top-1 "
        "equal to the engine's idle answer).",
        f"- Machine: {meta.get('machine', 'unknown')}; commit {meta.get('commit', 'unknown')}.",
        "",
        table,
        "",
        "Client side: Locust's final statistics (latencies rounded by Locust: whole ms below "
        "100 ms, two significant digits above; requests/s = requests / time between the first "
        "and the last request). Server side: "
        f"`{metric}{{{label}=...}}` from the gateway's /metrics, scraped before and after each "
        "backend's run; percentiles interpolated inside buckets like PromQL's "
        "`histogram_quantile`, so they are only as fine as the bucket bounds"
        + (f" ({bounds} ms)." if bounds else "."),
        "",
    ]
    problems = [f"- {r.backend}: server side unavailable: {r.server_error}" for r in results
                if r.server_error]  # fmt: skip
    problems += [
        f"- {r.backend}: {r.client.failures} failed requests (see `{r.backend}_failures.csv`)"
        for r in results
        if r.client.failures
    ]
    problems += [f"- {note}" for note in meta.get("notes", [])]
    if problems:
        lines += ["## Problems", "", *problems, ""]
    agreement = meta.get("true_label_agreement", {})
    if agreement:
        shown = ", ".join(f"{b} {100 * a:.1f}%" for b, a in agreement.items())
        lines += [f"Top-1 answers equal to the true digit (idle, per backend): {shown}.", ""]
    lines += [
        "## CPU: which side was the bottleneck",
        "",
        cpu_table(results),
        "",
        "CPU % is of one core (200 = two cores busy), averaged from the first second after "
        "the ramp-up to the last request; machine busy % is of all the machine's cores. "
        "Locust is one process: it cannot use more than one core.",
        "",
        cpu_summary(results),
        "",
        "## Files",
        "",
        "- `latency.png`, `throughput.png`: the plots of this table.",
        "- `<backend>.json`: Locust's final statistics; `<backend>_stats.csv`, "
        "`<backend>_stats_history.csv`, `<backend>_failures.csv`, `<backend>_exceptions.csv`: "
        "Locust's CSVs; `<backend>_locust.log`: its log.",
        "- `<backend>_metrics_before.txt`, `<backend>_metrics_after.txt`: gateway /metrics; "
        "`<backend>_cpu.json`: CPU use; `references.json`: the idle answers every response "
        "was checked against; `bench.json`: the run's settings.",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    (run_dir / "results.json").write_text(
        json.dumps([asdict(r) for r in results], indent=2, default=str)
    )
    return table, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.report", description="Rebuild the report of a bench run."
    )
    parser.add_argument("run_dir", type=Path, help="a reports/bench-<timestamp> folder")
    args = parser.parse_args(argv)
    try:
        table, _ = build_report(args.run_dir)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: cannot build the report of {args.run_dir}: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nreport: {args.run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
