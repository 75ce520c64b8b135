"""Session fixtures shared by every test module.

``published_model`` trains a small digits model once per session (seconds on a CPU), publishes
it into a temporary repository with the real training code, and hands engines PNG test images
together with the eager model's top-1 answer for each, so every engine test can check answers,
not only status codes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.imaging import decode_and_preprocess
from services.common.repository import Manifest, read_manifest
from services.torchserve.config import KEY_FILE_NAME, read_keys
from training.digits import held_out_pngs as held_out_digit_pngs  # tests import it here
from training.publish import publish_checkpoint
from training.trainer import TrainConfig, load_checkpoint, model_from_checkpoint, train

#: Held-out images handed to engine tests.
TEST_IMAGE_COUNT = 64

# Keep torch from oversubscribing the two cores while servers run beside the tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are skipped where no CUDA device exists (they run in `make gpu-check`)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@dataclass
class PublishedModel:
    repo: Path
    model: str
    version: int
    manifest: Manifest
    checkpoint: Path
    images: list[bytes]
    expected_top1: list[int]

    def copy_repository(self, folder: Path) -> Path:
        """A private copy of the repository in ``folder``: the session's is shared, never edit
        it (tests that publish, corrupt or serve a version of their own use a copy)."""
        target = folder / "model_repository"
        ignore = shutil.ignore_patterns(".publish.lock")
        shutil.copytree(self.repo, target, symlinks=True, ignore=ignore)
        return target


@pytest.fixture
def repo_copy(published_model: PublishedModel, tmp_path: Path) -> Path:
    return published_model.copy_repository(tmp_path)


def eager_top1(checkpoint: Path, manifest: Manifest, images: list[bytes]) -> list[int]:
    """The eager PyTorch model's answer through the serving decoder: what every engine must give."""
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    batch = np.stack([decode_and_preprocess(data, manifest.input_spec) for data in images])
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch))
    return [int(i) for i in logits.argmax(dim=1)]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    config = TrainConfig(epochs=6, patience=6, out_dir=str(out), progress=False, seed=0)
    return train(config).best_checkpoint


@pytest.fixture(scope="session")
def published_model(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path
) -> PublishedModel:
    repo = tmp_path_factory.mktemp("published") / "model_repository"
    version = publish_checkpoint(trained_checkpoint, repo)
    manifest = read_manifest(repo, "classifier", version)
    images = held_out_digit_pngs(TEST_IMAGE_COUNT)
    return PublishedModel(
        repo=repo,
        model="classifier",
        version=version,
        manifest=manifest,
        checkpoint=trained_checkpoint,
        images=images,
        expected_top1=eager_top1(trained_checkpoint, manifest, images),
    )


def flip_byte(path: Path) -> None:
    """One byte of ``path`` inverted in the middle: the file is the same size, its sha256 not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@dataclass
class CorruptNewest:
    """A repository with the session's version (good) and a newer one, published the same way,
    whose ``model.pt`` had one byte flipped afterwards (bad): what a disk error or a bad copy
    leaves behind. Shared by the tests that only read it."""

    published: PublishedModel  # the session's model, its ``repo`` this repository
    good: int
    bad: int

    @property
    def repo(self) -> Path:
        return self.published.repo


@pytest.fixture(scope="session")
def corrupt_newest(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> CorruptNewest:
    repo = published_model.copy_repository(tmp_path_factory.mktemp("corrupt-newest"))
    bad = publish_checkpoint(published_model.checkpoint, repo)
    assert bad > published_model.version
    flip_byte(repo / f"{published_model.model}_torchscript" / str(bad) / "model.pt")
    return CorruptNewest(
        published=dataclasses.replace(published_model, repo=repo),
        good=published_model.version,
        bad=bad,
    )


@dataclass
class LocalStack:
    """The whole local stack as `make up` starts it (default ports), for one test session."""

    run_dir: Path
    repository: Path
    env: dict[str, str]
    gateway_url: str = "http://127.0.0.1:8000"
    prometheus_url: str = "http://127.0.0.1:9090"
    predictor_url: str = "http://127.0.0.1:8100"
    torchserve_url: str = "http://127.0.0.1:8180"
    torchserve_management_url: str = "http://127.0.0.1:8181"
    torchserve_metrics_url: str = "http://127.0.0.1:8182"
    triton_url: str = "http://127.0.0.1:8200"
    triton_metrics_url: str = "http://127.0.0.1:8202"

    @property
    def torchserve_key_file(self) -> Path:
        return self.run_dir / "torchserve" / KEY_FILE_NAME

    @property
    def torchserve_token(self) -> str:
        return read_keys(self.torchserve_key_file).inference

    def make(self, target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # The tests run in the installed venv: make's install step is taken as done (a
            # fresh checkout's pyproject.toml is newer than .installed and would reinstall).
            ["make", "--no-print-directory", "-o", ".venv/.installed", target],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=540,  # inside pytest-timeout's 600 s, so the fixture's teardown still runs
        )


REPO_ROOT = Path(__file__).resolve().parents[1]


class StackSlot:
    """The default ports hold one local stack at a time.

    `make up` refuses ports another stack holds, so a test module that needs a stack of its
    own (a corrupt repository, say) takes the slot: the stack holding it is stopped first and
    started again, on the same folders, by the next test that asks for it. Every stop must
    leave no process behind.
    """

    def __init__(self) -> None:
        self.current: LocalStack | None = None

    def hold(self, stack: LocalStack) -> LocalStack:
        """``stack`` up on the default ports (a no-op when it already holds them)."""
        if self.current is stack:
            return stack
        if self.current is not None:
            self.release(self.current)
        started = stack.make("up")
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        self.current = stack
        return stack

    def stopped(self, stack: LocalStack) -> None:
        """``stack`` was stopped by its holder (the README's own `make down`, say): the slot
        is free, and the next test that asks for the stack starts it again."""
        assert self.current is stack, "only the stack holding the slot can have stopped"
        self.current = None

    def release(self, stack: LocalStack) -> None:
        """`make down` of ``stack``; fails when any of its processes survives."""
        from services.stack.settings import StackSettings
        from services.stack.supervisor import stack_processes

        if self.current is stack:
            self.current = None
        stopped = stack.make("down")
        left = stack_processes(StackSettings(run_dir=stack.run_dir, repository=stack.repository))
        assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        assert not left, f"processes left after `make down`: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def stack_slot() -> Iterator[StackSlot]:
    slot = StackSlot()
    try:
        yield slot
    finally:
        if slot.current is not None:
            slot.release(slot.current)


def new_local_stack(base: Path, repository: Path | None = None) -> LocalStack:
    """A stack whose run folder (and, unless given, repository) lie under ``base``; nothing
    of it may be running yet."""
    from services.stack.settings import StackSettings
    from services.stack.supervisor import stack_processes

    repository = repository or base / "model_repository"
    stack = LocalStack(
        run_dir=base / "run",
        repository=repository,
        env={**os.environ, "STACK_RUN_DIR": str(base / "run"), "STACK_REPOSITORY": str(repository)},
    )
    settings = StackSettings(run_dir=stack.run_dir, repository=stack.repository)
    assert not stack_processes(settings), "a stack is already running in this run folder"
    return stack


@pytest.fixture(scope="session")
def _session_stack(tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    return new_local_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture
def local_stack(stack_slot: StackSlot, _session_stack: LocalStack) -> LocalStack:
    """The session's stack, ready: the first `make up` starts from an empty repository (so it
    trains and publishes first); `make down` at the end must leave no process behind."""
    return stack_slot.hold(_session_stack)
