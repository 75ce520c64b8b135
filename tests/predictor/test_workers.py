"""``PREDICTOR_WORKERS=2``: two real server processes on one port, under uvicorn's supervisor.

Each worker serves on its own (the other one stopped), ``/metrics`` counts every worker's
requests whichever answers, a killed worker is replaced and nothing it counted is lost, a
failed start-up exits with uvicorn's status 3, and SIGTERM ends every process and removes
the shared metrics folder.
"""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PublishedModel, held_out_digit_pngs
from tests.predictor.conftest import PredictorProcess, start_predictor
from tests.processes import wait_for

WORKERS = 2


def workers_of(parent: int) -> list[int]:
    """The parent's worker processes (multiprocessing's spawn children, not its resource
    tracker), from /proc."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(pid))
    return sorted(found)


def metrics_folder(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError(f"worker {pid} has no PROMETHEUS_MULTIPROC_DIR")


def images_counted(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "predictor_images"
        for sample in family.samples
        if sample.name == "predictor_images_total"
    )


def predict_all(url: str, count: int) -> list[int]:
    """``count`` requests, 4 at a time, each on a connection of its own; their status codes."""
    body = {"image": base64.b64encode(held_out_digit_pngs(1)[0]).decode()}

    def one(_: int) -> int:
        with httpx.Client(timeout=60) as client:
            return client.post(url + "/predict", json=body).status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(count)))


@pytest.fixture
def two_workers(published_model: PublishedModel, tmp_path: Path) -> Iterator[PredictorProcess]:
    server = start_predictor(
        published_model.repo, tmp_path / "predictor.log", workers=WORKERS, poll_interval_s=0
    )
    try:
        wait_for(lambda: len(workers_of(server.process.pid)) == WORKERS, 60, "both workers")
        yield server
    finally:
        server.stop()


def test_each_worker_serves_and_metrics_count_them_all(two_workers: PredictorProcess) -> None:
    url = two_workers.url
    first, second = workers_of(two_workers.process.pid)
    folder = metrics_folder(first)
    before = images_counted(url)
    # One worker at a time: the other is stopped, so the one left must answer everything.
    # (Short phases: the supervisor replaces a worker that misses its 5 s health ping.)
    for stopped in (first, second):
        os.kill(stopped, signal.SIGSTOP)
        try:
            assert predict_all(url, 12) == [200] * 12
        finally:
            os.kill(stopped, signal.SIGCONT)
    assert images_counted(url) - before == 24
    # Both wrote their own counters into the one folder /metrics reads.
    written = {path.name for path in folder.iterdir()}
    assert {f"counter_{pid}.db" for pid in (first, second)} <= written


def test_a_killed_worker_is_replaced_and_its_counts_kept(two_workers: PredictorProcess) -> None:
    url = two_workers.url
    assert predict_all(url, 8) == [200] * 8
    counted = images_counted(url)
    victim = workers_of(two_workers.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            len(workers_of(two_workers.process.pid)) == WORKERS
            and victim not in workers_of(two_workers.process.pid)
        ),
        60,
        "a replacement worker",
    )
    assert predict_all(url, 8) == [200] * 8
    assert images_counted(url) == counted + 8  # the dead worker's count stays in the sum
    text = httpx.get(url + "/metrics", timeout=10).text
    in_flight = [
        line for line in text.splitlines() if line.startswith("predictor_http_requests_in_flight ")
    ]
    assert in_flight == ["predictor_http_requests_in_flight 1.0"]  # only this scrape, no ghost


def test_sigterm_ends_every_worker_and_removes_the_metrics_folder(
    two_workers: PredictorProcess,
) -> None:
    pids = workers_of(two_workers.process.pid)
    folder = metrics_folder(pids[0])
    two_workers.process.send_signal(signal.SIGTERM)
    assert two_workers.wait_exit(30) == 0
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert not folder.exists()


def test_a_failed_start_exits_3(tmp_path: Path) -> None:
    empty = tmp_path / "empty-repository"
    empty.mkdir()
    server = PredictorProcess(empty, tmp_path / "predictor.log", workers=WORKERS)
    try:
        assert server.wait_exit(120) == 3
    finally:
        server.stop()
    assert "no servable" in server.log().lower() or "cannot start" in server.log()
