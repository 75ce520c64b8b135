"""The load tests against the real local stack (the session's `local_stack` fixture).

* `make bench` with a tiny duration: a report with a row per backend, both
  plots, zero failures, and server-side numbers from the gateway's histogram;
* the direct-to-engine users, selected by tag: every engine answered, every answer checked;
* a wrong expected answer is a Locust failure (the check can fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("predictor", "torchserve", "triton")

pytestmark = pytest.mark.slow


def _env(stack: Any, **extra: str) -> dict[str, str]:
    """Point every load-test setting at the fixture's stack, whatever the defaults are."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOADTEST_")}
    env.update(
        LOADTEST_GATEWAY_URL=stack.gateway_url,
        LOADTEST_PREDICTOR_URL=stack.predictor_url,
        LOADTEST_TORCHSERVE_URL=stack.torchserve_url,
        LOADTEST_TORCHSERVE_TOKEN=stack.torchserve_token,
        LOADTEST_TRITON_URL=stack.triton_url,
        **extra,
    )
    return env


def _locust(stack: Any, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "locust", "-f", "loadtests", "--headless", "--only-summary",
        "--json-file", str(out / "stats"), "--csv", str(out / "stats"), *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=ROOT, env=_env(stack, **env), capture_output=True, text=True, timeout=300
    )


def _entries(out: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in json.loads((out / "stats.json").read_text())}


def test_bench_smoke(local_stack: Any, tmp_path: Path) -> None:
    """`make bench` with a tiny duration, as CI runs it."""
    command = [
        "make", "--no-print-directory", "bench",
        "BENCH_USERS=2", "BENCH_SPAWN_RATE=2", "BENCH_DURATION=5s",
        f"BENCH_ARGS=--out-dir {tmp_path} --gateway-url {local_stack.gateway_url}",
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, env=_env(local_stack), capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (run_dir,) = tmp_path.glob("bench-*")

    report = (run_dir / "report.md").read_text()
    for backend in BACKENDS:
        rows = [line for line in report.splitlines() if line.startswith(f"| {backend} | ")]
        assert rows, f"no {backend} row in report.md"
        row = rows[0]  # the results table comes first, the CPU table after it
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) > 0, row  # requests
        assert cells[-1] == "0.00", row  # errors %
        assert "n/a" not in cells, row  # server-side percentiles were computed
        assert row in run.stdout  # the table is printed too
    for name in ("latency.png", "throughput.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000

    results = {r["backend"]: r for r in json.loads((run_dir / "results.json").read_text())}
    for backend in BACKENDS:
        client, server = results[backend]["client"], results[backend]["server"]
        assert client["failures"] == 0
        # The gateway saw at least every request Locust counted for this backend.
        assert server["requests"] >= client["requests"] > 0
        assert (run_dir / f"{backend}_stats.csv").stat().st_size > 0
        assert json.loads((run_dir / f"{backend}_cpu.json").read_text())["load_generator"] > 0


def test_direct_users_selected_by_tag(local_stack: Any, tmp_path: Path) -> None:
    run = _locust(local_stack, tmp_path, "-T", "direct", "-u", "3", "-r", "3", "-t", "4s")
    assert run.returncode == 0, run.stderr[-3000:]
    entries = _entries(tmp_path)
    assert sorted(entries) == ["direct:predictor", "direct:torchserve", "direct:triton"]
    for name, entry in entries.items():
        assert entry["num_requests"] > 0, name
        assert entry["num_failures"] == 0, name


def test_a_wrong_answer_is_a_failure(local_stack: Any, tmp_path: Path) -> None:
    """Expect, for every image, a class the predictor does not answer: every request fails."""
    from loadtests.targets import (
        LoadTestSettings,
        Reference,
        compute_reference,
        load_payloads,
        make_target,
        save_references,
    )

    settings = LoadTestSettings(predictor_url=local_stack.predictor_url)
    target = make_target("direct:predictor", settings)
    true = compute_reference(target, settings.predictor_url, load_payloads(8), 30.0)
    wrong = Reference(
        true.target,
        true.version,
        {index: (answer + 1) % 10 for index, answer in true.expected.items()},
        true.near_ties,
        true.true_label_agreement,
    )
    save_references(tmp_path / "references.json", {"direct:predictor": wrong})

    run = _locust(
        local_stack,
        tmp_path,
        "-u", "1", "-r", "1", "-t", "3s", "PredictorDirectUser",
        LOADTEST_REFERENCE_FILE=str(tmp_path / "references.json"),
        LOADTEST_IMAGES="8",
    )  # fmt: skip
    assert run.returncode == 1  # Locust's exit status when requests failed
    entry = _entries(tmp_path)["direct:predictor"]
    assert entry["num_requests"] > 0
    assert entry["num_failures"] == entry["num_requests"]
    assert "when idle" in (tmp_path / "stats_failures.csv").read_text()
