"""The CLI: every flag documented, and user mistakes answered on one line without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_every_command_and_flag() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("train", "export", "publish", "train-and-publish"):
        assert command in top.stdout
    sub = run_cli("train-and-publish", "--help")
    for flag in (
        "--dataset",
        "--data-dir",
        "--arch",
        "--epochs",
        "--resume",
        "--keep",
        "--repo",
        "--tensorboard",
        "--deterministic",
        "--schedule",
        "--label-smoothing",
    ):
        assert flag in sub.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "imagenet-22k"], "unknown dataset 'imagenet-22k'"),
        (["train", "--arch", "transformer-xxl"], "unknown arch 'transformer-xxl'"),
        (
            ["train", "--dataset", "imagefolder", "--data-dir", "/nonexistent/images"],
            "does not exist",
        ),
        (["train", "--dataset", "imagefolder", "--data-dir", "{empty}"], "no class subfolders"),
        (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
        (["publish", "--checkpoint", "/nonexistent/best.pt", "--repo", "{repo}"], "does not exist"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", repo=tmp_path / "repo") for a in args]
    done = run_cli(*args, "--out-dir", str(tmp_path)) if args[0] == "train" else run_cli(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "repo").exists()  # nothing published


def test_export_writes_both_artifacts_after_the_parity_check(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    result = run_cli("export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'top1_identical': True" in result.stdout
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "model.onnx").is_file()
