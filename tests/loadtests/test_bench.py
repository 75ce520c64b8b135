"""bench.py's parts that need no stack: arguments, CPU accounting, finding server processes,
and a clear refusal when the gateway is not there."""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from loadtests.bench import CpuSeries, duration_seconds, listening_processes, main, parse_cpus
from tests.processes import free_port


@pytest.mark.parametrize(
    ("text", "seconds"), [("5", 5), ("5s", 5), ("1m", 60), ("1m30s", 90), ("1h", 3600)]
)
def test_duration_seconds(text: str, seconds: int) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "ten", "5 minutes", "-3s"])
def test_duration_seconds_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration_seconds(text)


def test_parse_cpus() -> None:
    assert parse_cpus("1") == {1}
    assert parse_cpus("0,2") == {0, 2}
    assert parse_cpus("2-4,7") == {2, 3, 4, 7}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_cpus("one")


def test_cpu_series_percent_over_a_window() -> None:
    # 0.5 CPU-seconds per second from t=10 to t=14, then idle.
    points = [(10.0, 0.0), (11.0, 0.5), (12.0, 1.0), (13.0, 1.5), (14.0, 2.0), (16.0, 2.0)]
    series = CpuSeries([], points=points)
    assert series.percent(11.0, 14.0) == pytest.approx(50.0)
    assert series.percent(10.0, 16.0) == pytest.approx(100.0 * 2.0 / 6.0)
    assert CpuSeries([]).percent(0.0, 1.0) == 0.0


def test_cpu_series_counts_the_process_tree() -> None:
    series = CpuSeries([psutil.Process(os.getpid())])
    series.sample(1.0)
    spent = time.process_time() + 0.05  # CPU time to account for, over the clock's 10 ms ticks
    while time.process_time() < spent:
        pass
    series.sample(2.0)
    assert series.points[0] == (1.0, 0.0)  # measured from the first sample
    assert series.points[1][1] > 0.0


def test_listening_processes_finds_the_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = listening_processes({"me": port})
    assert found["me"].pid == os.getpid()


def test_bench_without_a_gateway_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--gateway-url", url, "--duration", "1s", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"the gateway at {url} does not answer" in err
    assert "make up" in err
    assert list(tmp_path.iterdir()) == []  # no half-made report folder


@pytest.mark.parametrize(
    "args",
    [
        ["--duration", "soon"],
        ["--backends", "predictor,tensorflow"],
        ["--users", "0"],
        ["--locust-cpus", "first"],
    ],
)
def test_bench_rejects_bad_arguments(args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
