"""`make bench-gateway` end to end, unpinned as `make up` runs the services: a real predictor
and a real gateway, one short round per cell. The table must have both paths at every
concurrency with no failed request, the verdict lines must be there, and both servers must be
gone afterwards. The figures themselves are never checked (performance is measured, not
asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, PublishedModel
from tests.processes import free_ports

CONCURRENCY = [1, 4]


def test_both_paths_are_measured_unpinned_without_errors(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    predictor_port, gateway_port = free_ports(2)
    report = tmp_path / "gateway.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREDICTOR_", "GATEWAY_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.gateway_bench",
            "--repo",
            str(published_model.repo),
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--rounds",
            "1",
            "--concurrency",
            *map(str, CONCURRENCY),
            "--predictor-port",
            str(predictor_port),
            "--gateway-port",
            str(gateway_port),
            "--json",
            str(report),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unpinned" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][2:]
    assert sorted((row.split(" | ")[0][2:], int(row.split(" | ")[1])) for row in rows) == sorted(
        (path, n) for path in ("direct", "gateway") for n in CONCURRENCY
    )
    assert "added p50 at concurrency 1:" in done.stdout
    for n in CONCURRENCY:
        assert f"throughput ratio at concurrency {n}:" in done.stdout
    for cell in json.loads(report.read_text()):
        assert cell["errors"] == 0 and cell["requests"] > 0, cell
    for port in (predictor_port, gateway_port):  # both servers stopped: the ports are free
        probe = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "--max-time", "2", f"http://127.0.0.1:{port}/"],
            check=False,
        )
        assert probe.returncode == 7, f"something still listens on {port}"
