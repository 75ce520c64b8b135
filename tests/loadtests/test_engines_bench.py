"""`make bench-engines` end to end: every engine started for real, every cell measured.

One short round (a second per cell) against the real predictor (both engines), tritonserver and
TorchServe, driven by wrk: the table must have every candidate at every concurrency, no request
may have failed, and every server the bench started must be gone. The figures themselves are
never checked (performance is measured, not asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO_ROOT, PublishedModel
from tests.processes import processes_naming
from training.publish import publish_checkpoint
from training.quantize import GateOptions

CANDIDATES = ["predictor (torchscript)", "predictor (onnx)", "Triton", "TorchServe"]
CONCURRENCY = [1, 8, 32]


def test_every_engine_is_measured_at_every_concurrency_without_errors(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    repo = published_model.copy_repository(tmp_path)
    # The bench's temporary folder (run folders, logs, wrk's files), short: TorchServe's worker
    # sockets live under it, and a socket path has at most 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        check_bench(repo, work, tmp_path / "engines.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_version_with_int8_gets_a_row_per_precision(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """On a version published with --int8: the int8 model on the predictor and on Triton
    measured beside fp32, and the model-only table at batch 1, 8 and 32."""
    repo = tmp_path / "model_repository"
    publish_checkpoint(published_model.checkpoint, repo, int8=GateOptions())
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        stdout = check_bench(
            repo,
            work,
            tmp_path / "engines.json",
            ["onnx", "onnx-int8", "triton-int8"],
            ["predictor (onnx)", "predictor (onnx int8)", "Triton int8"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "predictor (onnx int8) / predictor (onnx) req/s: c=1 " in stdout
    table = stdout.split("| batch | fp32 images/s | int8 images/s | int8 / fp32 |\n", 1)[1]
    rows = [line.split(" | ") for line in table.split("\n\n", 1)[0].splitlines()[1:]]
    assert [int(row[0][2:]) for row in rows] == [1, 8, 32], stdout
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


def check_bench(
    repo: Path,
    work: Path,
    report: Path,
    candidates: list[str] | None = None,
    names: list[str] = CANDIDATES,
) -> str:
    """Run the bench (every candidate, or ``candidates``) and check its table has ``names``
    at every concurrency without an error; its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREDICTOR_", "TRITON_"))}
    env["TMPDIR"] = str(work)
    cpus = sorted(os.sched_getaffinity(0))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.engines_bench",
            "--repo",
            str(repo),
            "--seconds",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--server-cpu",
            str(cpus[0]),
            "--client-cpu",
            str(cpus[-1]),
            "--client",
            "wrk",
            "--json",
            str(report),
            *(["--candidates", *candidates] if candidates else []),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    left = processes_naming(work)
    assert not left, f"processes left by the bench: {left}"
    assert done.returncode == 0, done.stdout + done.stderr
    engines_table = done.stdout[done.stdout.index("| candidate |") :]
    rows = [line for line in engines_table.splitlines() if line.startswith("| ")][2:]
    assert sorted((row.split(" | ")[0][2:], int(row.split(" | ")[1])) for row in rows) == sorted(
        (name, n) for name in names for n in CONCURRENCY
    )
    cells = json.loads(report.read_text())["cells"]
    assert len(cells) == len(names) * len(CONCURRENCY)
    for cell in cells:
        assert cell["errors"] == 0 and cell["requests"] > 0, cell
    if candidates is None:
        for engine in ("torchscript", "onnx"):
            assert f"predictor ({engine}) / Triton req/s: c=1 " in done.stdout
    assert "load average" in done.stdout
    return done.stdout
