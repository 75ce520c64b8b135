"""The CLI: every flag documented, and user mistakes answered on one line without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.repository import read_manifest
from services.common.serving import ServingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
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
    publish = run_cli("publish", "--help")
    defaults = ServingConfig()
    for flag, default in (
        ("--max-batch-size", defaults.max_batch_size),
        ("--max-batch-delay-ms", defaults.max_batch_delay_ms),
        ("--max-images-per-request", defaults.max_images_per_request),
        ("--max-pixels", defaults.max_pixels),
        ("--instance-count", defaults.instance_count),
    ):
        for text in (publish.stdout, sub.stdout):
            assert flag in text
            after = " ".join(text.split(flag, 2)[-1].split()[:40])  # the flag's help text
            assert f"(default {default}" in after, (flag, after)
    assert "--preferred-batch-sizes" in publish.stdout and "--preferred-batch-sizes" in sub.stdout


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
        (
            [
                "publish",
                "--repo",
                "{repo}",
                "--max-batch-size",
                "8",
                "--preferred-batch-sizes",
                "16",
            ],
            "preferred_batch_sizes [16] are outside 1..max_batch_size (8)",
        ),
        (["publish", "--repo", "{repo}", "--max-batch-size", "0"], "--max-batch-size: "),
        (["publish", "--repo", "{repo}", "--keep", "0"], "--keep must be at least 1"),
        # Checked before training starts (no --out-dir: it would train into checkpoints/).
        (
            ["train-and-publish", "--repo", "{repo}", "--preferred-batch-sizes", "64"],
            "preferred_batch_sizes [64]",
        ),
        (["train-and-publish", "--repo", "{repo}", "--instance-count", "0"], "--instance-count"),
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


def test_publish_writes_the_serving_flags_and_ignores_triton_variables(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    flags = ["--max-batch-size", "16", "--max-batch-delay-ms", "2.5"]
    flags += ["--preferred-batch-sizes", "4", "8", "--instance-count", "2"]
    flags += ["--max-images-per-request", "12", "--max-pixels", "100000"]
    # The Triton server's variables no longer reach what publish writes.
    triton_env = {"TRITON_MAX_BATCH_SIZE": "7", "TRITON_INSTANCE_COUNT": "5"}
    done = run_cli(
        "publish", "--checkpoint", str(trained_checkpoint), "--repo", str(repo), *flags,
        env=triton_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"published classifier version 1 to {repo}" in done.stdout
    assert read_manifest(repo, "classifier", 1).serving == ServingConfig(
        max_batch_size=16,
        max_batch_delay_ms=2.5,
        preferred_batch_sizes=(4, 8),
        instance_count=2,
        max_images_per_request=12,
        max_pixels=100_000,
    )
    config = text_format.Parse(
        (repo / "classifier" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert [group.count for group in config.instance_group] == [2]


def test_readme_serving_config_table_matches_the_code() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Serving config", 1)[1].split("\n#", 1)[0]
    rows = {
        cells[0].strip("` "): cells
        for line in section.splitlines()
        if line.startswith("| `")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == set(ServingConfig.model_fields)
    help_text = run_cli("publish", "--help").stdout
    for name, field in ServingConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = list(default) if isinstance(default, tuple) else default
        assert rows[name][1] == f"`{flag}`" and flag in help_text, name
        assert rows[name][2].startswith(f"`{shown}`"), (name, rows[name][2])
