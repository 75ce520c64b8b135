"""loadtests.harness, the parts every bench shares: figures, CPU accounting, the pinned
runner, the closed-loop client, and the serving config a report names."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from loadtests.harness import (
    BenchError,
    CpuMeter,
    HttpSender,
    PinnedProcess,
    closed_loop,
    core_busy_seconds,
    cpu_seconds,
    group_cpu_seconds,
    http_request,
    percentile,
    read_response,
    run_loop,
    serving_line,
)
from services.common.processes import group_members
from tests.conftest import PublishedModel


def burn(seconds: float) -> None:
    """Spend ``seconds`` of this process's CPU time."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_is_numpys(q: float) -> None:
    samples = list(np.random.default_rng(7).exponential(2.0, 1001))
    assert percentile(samples, q) == float(np.percentile(samples, q))
    assert percentile([3.0, 1.0, 2.0, 4.0], q) == float(np.percentile([1, 2, 3, 4], q))


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


# --------------------------------------------------------------------------- CPU accounting


def test_cpu_seconds_reads_a_process_time_from_proc() -> None:
    burn(0.1)
    ours, reference = cpu_seconds(os.getpid()), time.process_time()
    assert abs(ours - reference) < 0.05  # /proc counts in clock ticks (10 ms)


def test_cpu_seconds_of_a_busy_child_and_its_group() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.process_time()"],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        spent = cpu_seconds(child.pid)
        assert spent > 0.1  # it ran for half a second, mostly on a CPU
        assert group_cpu_seconds(child.pid) >= spent
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError):
        cpu_seconds(child.pid)  # gone: no /proc entry


def test_cpu_meter_measures_what_each_source_spent() -> None:
    with CpuMeter({"me": time.process_time, "core": lambda: core_busy_seconds(0)}) as meter:
        burn(0.2)
    assert meter.seconds["me"] == pytest.approx(0.2, abs=0.05)
    assert meter.wall >= 0.2
    assert 0.5 < meter.busy("me") <= 1.05
    assert meter.seconds["core"] >= 0.0


# --------------------------------------------------------------------------- the pinned runner


def group_script(marker: str, trap: str = "") -> list[str]:
    """A shell leading two sleeps; ``marker`` names every process of it on its command line."""
    return ["sh", "-c", f"{trap}sleep 60 & sleep 60 & wait # {marker}", marker]


def wait_members(pgid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(members := group_members(pgid)) < count:
        assert time.monotonic() < deadline, "the group did not start"
        time.sleep(0.02)
    return members


def test_the_runner_pins_the_server_and_all_it_starts() -> None:
    cpu = min(os.sched_getaffinity(0))
    with PinnedProcess("sleeper", group_script("pin"), os.environ, cpus={cpu}) as server:
        for pid in wait_members(server.pid, 3):
            assert os.sched_getaffinity(pid) == {cpu}


def test_the_runner_stops_the_whole_group_and_leaves_no_process() -> None:
    marker = f"bench-test-{uuid.uuid4()}"
    server = PinnedProcess("sleeper", group_script(marker), os.environ)
    wait_members(server.pid, 3)
    assert server.stop() == []  # all of it went on SIGTERM
    assert group_members(server.pid) == []
    assert server.process.returncode is not None  # the leader is reaped
    assert not processes_naming_marker(marker)


def test_the_runner_kills_what_ignores_sigterm() -> None:
    marker = f"bench-test-{uuid.uuid4()}"
    server = PinnedProcess("stubborn", group_script(marker, trap="trap '' TERM; "), os.environ)
    members = sorted(wait_members(server.pid, 3))
    assert server.stop(timeout_s=0.3) == members
    assert group_members(server.pid) == []
    assert not processes_naming_marker(marker)


def processes_naming_marker(marker: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(entry.name)
        except OSError:
            continue
    return found


def test_wait_ready_polls_the_check_and_notices_an_exit() -> None:
    calls = []

    def ready() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with PinnedProcess("sleeper", ["sleep", "30"], os.environ, ready=ready) as server:
        assert server.wait_ready(timeout_s=10, interval_s=0.01) >= 0
        assert len(calls) == 3
    quitter = PinnedProcess("quitter", ["sh", "-c", "exit 3"], os.environ, ready=lambda: False)
    with pytest.raises(BenchError, match="exited with 3"):
        quitter.wait_ready(timeout_s=10)
    quitter.stop()


# --------------------------------------------------------------------------- the client


class FakeSender:
    """Answers after 1 ms; every fifth answer is wrong."""

    def __init__(self, sent: list[int]) -> None:
        self.sent = sent

    async def send(self) -> bool:
        self.sent.append(1)
        number = len(self.sent)  # the how-manieth request of the run, warm-up included
        # uvloop's timers tick in whole milliseconds from a cached clock, so one sleep(0.001)
        # may end at once: sleep until 1 ms has passed by the clock the harness measures with.
        done = time.perf_counter() + 0.001
        while time.perf_counter() < done:
            await asyncio.sleep(0.0002)
        return number % 5 != 0

    async def close(self) -> None:
        pass


def test_a_loop_of_so_many_requests_after_a_warm_up() -> None:
    sent: list[int] = []

    async def connect(index: int) -> FakeSender:
        return FakeSender(sent)

    loop = run_loop(closed_loop(connect, 3, requests=40, warmup_requests=10))
    assert loop.requests == 40 and loop.completed == 50 == len(sent)
    assert loop.errors == 8  # the 15th, 20th ... 50th: the first ten were the warm-up
    # Each answer takes the fake's 1 ms at least; a busy CI machine may stall any one of them
    # for long, so the ceiling only catches a latency measured across requests.
    assert len(loop.latencies) == 40
    assert min(loop.latencies) >= 0.001 and max(loop.latencies) < 5.0, (
        min(loop.latencies),
        max(loop.latencies),
    )
    assert loop.seconds > 0 and loop.rps == loop.requests / loop.seconds


def test_a_loop_of_so_many_seconds_after_a_warm_up() -> None:
    sent: list[int] = []

    async def connect(index: int) -> FakeSender:
        return FakeSender(sent)

    started = time.perf_counter()
    loop = run_loop(closed_loop(connect, 2, seconds=0.3, warmup_s=0.2))
    assert 0.5 <= time.perf_counter() - started < 2.0
    assert loop.seconds == 0.3
    assert 0 < loop.requests < loop.completed == len(sent)  # the warm-up was not measured


def test_the_http_client_keeps_its_connection_and_reads_both_framings() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nwor\r\n2\r\nld\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
    ]
    received: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for answer in answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            received.append(head + await reader.readexactly(length))
            writer.write(answer)
            await writer.drain()
        writer.close()

    async def scenario() -> list[bool]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        requests = [http_request("/predict", b'{"a": 1}', port, {"X-Top-K": "1"})]
        bodies: list[bytes] = []

        def check(status: int, body: bytes) -> bool:
            bodies.append(body)
            return status == 200

        sender = await HttpSender.connector(port, requests, check)(0)
        results = [await sender.send() for _ in answers]
        await sender.close()
        server.close()
        assert bodies == [b"hello", b"world", b""]
        return results

    assert run_loop(scenario()) == [True, True, False]
    assert connections == 1
    assert received[0].startswith(b"POST /predict HTTP/1.1\r\n")
    assert b"X-Top-K: 1\r\n" in received[0] and received[0].endswith(b'\r\n\r\n{"a": 1}')


def test_read_response_of_a_whole_answer() -> None:
    async def scenario() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno")
        reader.feed_eof()
        return await read_response(reader)

    assert asyncio.run(scenario()) == (404, b"no")


# --------------------------------------------------------------------------- the model


def test_the_report_names_the_serving_config(published_model: PublishedModel) -> None:
    serving = published_model.manifest.serving
    line = serving_line("predictor", published_model.repo, published_model.model)
    assert f"{published_model.model} v{published_model.version}" in line
    assert f"max_batch_size={serving.max_batch_size}" in line
    assert f"max_batch_delay_ms={serving.max_batch_delay_ms}" in line
    overridden = serving_line(
        "predictor", published_model.repo, published_model.model, overrides={"max_batch_size": 1}
    )
    assert overridden.endswith("(this bench overrides max_batch_size=1)")
