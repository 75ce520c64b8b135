"""`make gpu-bench` as a smoke run on the CPU (`--device cpu`): a real predictor with two
workers, every cell measured without errors, the server-side p50 read from the predictor's
own histogram, the verdict lines printed. Its figures say nothing about a GPU and are never
checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, PublishedModel
from tests.processes import free_port


def test_every_cell_is_measured_on_the_cpu(published_model: PublishedModel, tmp_path: Path) -> None:
    report = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTOR_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.gpu_bench",
            "--repo",
            str(published_model.repo),
            "--device",
            "cpu",
            "--workers",
            "2",
            "--precision",
            "fp32",
            "--images",
            "1",
            "8",
            "--concurrency",
            "4",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--port",
            str(free_port()),
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
    cells = json.loads(report.read_text())
    assert [(c["workers"], c["images_per_request"]) for c in cells] == [(2, 1), (2, 8)]
    for cell in cells:
        assert cell["errors"] == 0 and cell["requests"] > 0, cell
        assert cell["server_p50_ms"] > 0, cell  # read from the predictor's histogram
    assert "best batched:" in done.stdout and "lowest batch-1 server-side p50:" in done.stdout
