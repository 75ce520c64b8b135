"""The training loop on the real digits data: one epoch, resume, and DDP with two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from training import trainer
from training.errors import ConfigError
from training.trainer import TrainConfig, load_checkpoint, train

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_one_epoch_writes_a_best_checkpoint_with_its_config(tmp_path: Path) -> None:
    result = train(TrainConfig(epochs=1, out_dir=str(tmp_path), progress=False))
    assert result.epochs_run == 1
    checkpoint = load_checkpoint(result.best_checkpoint)
    assert checkpoint["config"]["arch"] == "simplecnn"
    assert checkpoint["labels"] == [str(d) for d in range(10)]
    assert checkpoint["input_spec"]["height"] == 32
    assert 0.5 < checkpoint["metrics"]["test_accuracy"] <= 1.0  # one epoch already learns digits
    assert (tmp_path / "last.pt").is_file()


def test_resume_continues_from_the_saved_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(epochs=3, out_dir=str(tmp_path), progress=False, patience=10, seed=3)
    real_evaluate = trainer.evaluate
    calls = 0

    def crash_in_second_epoch(*args: Any, **kwargs: Any) -> tuple[float, float]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # the machine went away after epoch 1 was saved
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0

    result = train(TrainConfig(**{**config.__dict__, "resume": str(tmp_path / "last.pt")}))
    assert result.epochs_run == 3
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2
    assert last["scheduler_state"]["last_epoch"] == 3 * 23  # steps continued, not restarted

    with pytest.raises(ConfigError, match="--resume needs the --epochs"):
        train(TrainConfig(**{**config.__dict__, "epochs": 5, "resume": str(tmp_path / "last.pt")}))


def test_ddp_two_cpu_processes_with_gloo(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "training",
        "train",
        "--epochs",
        "2",
        "--out-dir",
        str(tmp_path),
        "--no-progress",
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)
    assert checkpoint["world_size"] == 2
    assert checkpoint["metrics"]["test_accuracy"] > 0.8
    # Only rank 0 logs epochs: each epoch line appears once, not once per process.
    assert done.stderr.count("epoch 1/2 train_loss") == 1
