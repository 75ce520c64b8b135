"""The report builder on fixed inputs (tests/loadtests/data, see its README).

Expected numbers are worked out by hand in the comments, from the fixture files, so a change
in how percentiles are computed shows up here and not only as a different-looking report.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.report import (
    CpuUsage,
    Histogram,
    build_report,
    histogram_delta,
    histogram_quantile,
    locust_percentile,
    main,
    read_histogram,
    read_locust_json,
)

DATA = Path(__file__).with_name("data")
METRIC = "gateway_request_duration_seconds"
INF = math.inf


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    target = tmp_path / "bench-20260102-030405"
    shutil.copytree(DATA, target)
    return target


# --------------------------------------------------------------------------- server side


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.005, 40.0), (0.01, 90.0), (0.02, 94.0), (0.05, 98.0), (INF, 98.0)]
    # rank 0.5 * 98 = 49 lies in (0.005, 0.01] holding observations 41..90:
    # 0.005 + 0.005 * (49 - 40) / (90 - 40)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0059)
    # The lowest bucket starts at 0: rank 9.8 of 40 -> 0.005 * 9.8 / 40.
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.001225)
    # rank 98 is reached exactly at the 0.05 bound.
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.05)


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.9, [(0.1, 5.0), (0.2, 6.0), (INF, 10.0)]) == 0.2


def test_histogram_quantile_without_observations_is_nan() -> None:
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]))


def test_histogram_quantile_needs_an_inf_bucket() -> None:
    with pytest.raises(ValueError, match="Inf"):
        histogram_quantile(0.5, [(0.1, 1.0), (0.2, 2.0)])


def test_read_histogram_sums_other_labels_and_keeps_one_backend() -> None:
    after = (DATA / "predictor_metrics_after.txt").read_text()
    predictor = read_histogram(after, METRIC, {"backend": "predictor"})
    # status 200 and status 503 series added up, bucket by bucket.
    assert predictor.buckets == [(0.005, 42), (0.01, 94), (0.02, 98), (0.05, 102), (INF, 102)]
    assert predictor.count == 102
    assert predictor.sum == pytest.approx(0.76)
    triton = read_histogram(after, METRIC, {"backend": "triton"})
    assert triton.count == 3
    assert read_histogram(after, METRIC, {"backend": "nobody"}) == Histogram([], 0.0, 0.0)


def test_histogram_delta_refuses_counters_that_went_down() -> None:
    high = Histogram([(0.1, 5.0), (INF, 5.0)], 5.0, 0.2)
    low = Histogram([(0.1, 1.0), (INF, 1.0)], 1.0, 0.05)
    delta = histogram_delta(low, high)
    assert (delta.buckets, delta.count) == ([(0.1, 4.0), (INF, 4.0)], 4.0)
    assert delta.sum == pytest.approx(0.15)
    with pytest.raises(ValueError, match="restart"):
        histogram_delta(high, low)


# --------------------------------------------------------------------------- client side


def test_locust_percentile_agrees_with_locust() -> None:
    """Same answers as locust.stats.calculate_response_time_percentile, run in a subprocess
    (importing Locust here would monkey-patch this test process with gevent)."""
    cases = [
        ({4: 60, 10: 35, 30: 5}, 100),
        ({9: 10, 20: 38, 120: 2}, 50),
        ({1: 1}, 1),
        ({2: 3, 3: 3, 5: 1, 7: 1, 11: 1, 13: 1, 170: 1}, 11),
    ]
    quantiles = [0.5, 0.66, 0.95, 0.99, 1.0]
    script = (
        "import json, sys\n"
        "from locust.stats import calculate_response_time_percentile as p\n"
        "cases, qs = json.load(sys.stdin)\n"
        "print(json.dumps([[p({int(k): v for k, v in rt.items()}, n, q) for q in qs]"
        " for rt, n in cases]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([cases, quantiles]),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    expected = json.loads(out.stdout)
    ours = [[locust_percentile(rt, n, q) for q in quantiles] for rt, n in cases]
    assert ours == expected


def test_read_locust_json() -> None:
    stats = read_locust_json(DATA / "predictor.json")
    assert (stats.requests, stats.failures) == (100, 0)
    assert stats.rps == pytest.approx(10.0)  # 100 requests between t=1000 and t=1010
    # {4 ms: 60, 10 ms: 35, 30 ms: 5}: half are at most 4 ms, 95% at most 30 (Locust's rule).
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == (4.0, 30.0, 30.0)
    assert stats.mean_ms == pytest.approx(6.4)
    assert stats.per_second[0] == (0, 4)
    assert stats.per_second[-1] == (9, 4)
    assert sum(n for _, n in stats.per_second) == 100


def test_read_locust_json_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="--json-file"):
        read_locust_json(path)


# --------------------------------------------------------------------------- the report


def test_build_report_from_fixed_inputs(run_dir: Path) -> None:
    table, results = build_report(run_dir)
    predictor, triton = results

    assert predictor.backend == "predictor"
    assert predictor.client.requests == 100
    assert predictor.client.error_percent == 0.0
    server = predictor.server
    assert server is not None
    # after - before: buckets 40, 90, 94, 98, 98 (see the histogram_quantile test).
    assert server.requests == 98
    assert server.p50_ms == pytest.approx(5.9)
    # 10 + 10 * (93.1 - 90) / 4 = 17.75, in floating point 17.7499..., shown as 17.7 below
    assert server.p95_ms == pytest.approx(17.75)
    assert server.p99_ms == pytest.approx(42.65)  # 20 + 30 * (97.02 - 94) / 4
    assert server.mean_ms == pytest.approx(1000 * 0.74 / 98)
    assert server.bounds_ms == (5.0, 10.0, 20.0, 50.0)

    assert triton.client.requests == 50
    assert triton.client.error_percent == pytest.approx(4.0)
    assert (triton.client.p50_ms, triton.client.p95_ms, triton.client.p99_ms) == (20, 20, 120)
    assert triton.server is None
    assert triton.server_error is not None and "restart" in triton.server_error

    assert predictor.cpu is not None and triton.cpu is not None
    assert predictor.cpu.verdict() == "load generator CPU-bound"  # 95% of its one core
    assert triton.cpu.verdict() == "server CPU-bound"  # 97% of the servers' one core

    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| backend | requests | req/s | client p50 ms")
    assert rows[2] == ("| predictor | 100 | 10.0 | 4.0 | 30.0 | 30.0 | 5.9 | 17.7 | 42.6 | 0.00 |")
    assert rows[3] == "| triton | 50 | 10.0 | 20.0 | 20.0 | 120 | n/a | n/a | n/a | 4.00 |"

    report = (run_dir / "report.md").read_text()
    assert table in report
    assert "triton: 2 failed requests" in report
    assert "triton: server side unavailable" in report
    assert "The load generator was CPU-bound for predictor" in report
    assert "The servers were CPU-bound for triton" in report
    assert "| predictor | 95 | 60 = 25 + 35 | 1 | 5 | 80 | load generator CPU-bound |" in report
    assert "Locust ran on CPU(s) 1, the servers on CPU(s) 0." in report
    assert "(5, 10, 20, 50 ms)" in report

    for name in ("latency.png", "throughput.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 5000  # a drawn chart, not an empty canvas


def test_report_without_cpu_or_metrics_still_builds(run_dir: Path) -> None:
    (run_dir / "predictor_cpu.json").unlink()
    (run_dir / "predictor_metrics_after.txt").unlink()
    table, (predictor, _) = build_report(run_dir)
    assert predictor.server is None and predictor.cpu is None
    assert "| predictor | 100 | 10.0 | 4.0 | 30.0 | 30.0 | n/a | n/a | n/a | 0.00 |" in table
    report = (run_dir / "report.md").read_text()
    assert "| predictor | n/a | n/a | n/a | n/a | n/a | not measured |" in report


def test_report_cli(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| predictor | 100 |" in out
    assert str(run_dir / "report.md") in out


def test_report_cli_on_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 2
    assert "cannot build the report" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("generator", "servers", "machine", "verdict"),
    [
        (95.0, 60.0, 80.0, "load generator CPU-bound"),
        (40.0, 185.0, 100.0, "server CPU-bound"),  # 90% of the servers' two cores
        (92.0, 190.0, 100.0, "both CPU-bound"),
        (60.0, 130.0, 96.0, "CPU-bound: generator and servers share the cores"),
        (20.0, 100.0, 95.0, "CPU-bound: other processes took CPU"),  # 70% of a core elsewhere
        (30.0, 80.0, 60.0, "neither CPU-bound"),
    ],
)
def test_cpu_verdict(generator: float, servers: float, machine: float, verdict: str) -> None:
    usage = CpuUsage(
        load_generator=generator,
        servers=servers,
        server_cores=2,
        machine=machine,
        load_generator_cpus="0,1",
        server_cpus="0,1",
        machine_cores=2,
    )
    assert usage.verdict() == verdict
