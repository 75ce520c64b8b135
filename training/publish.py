"""Publish a checkpoint as a new version of the Triton-style model repository, atomically.

Steps: export TorchScript + ONNX into a staging folder beside the repository, check parity,
write the manifest (sha256 of every artifact, and the ``serving`` block:
:class:`~services.common.serving.ServingConfig`, from the CLI's flags), build the TorchServe
archive and fsync
everything; then, holding the repository lock, rename the TorchScript version folder into place
and finally the ONNX version folder that holds ``manifest.json``: that last rename is the commit
point (:func:`services.common.repository.list_versions` only sees versions with a manifest). A
crash at any step leaves the previous versions untouched and no half version visible; a
leftover TorchScript folder without its manifest only means that version number is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from services.common.imaging import InputSpec
from services.common.repository import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    ONNX_NAME,
    TORCHSCRIPT_NAME,
    TORCHSCRIPT_SUFFIX,
    Artifact,
    Manifest,
    list_versions,
    sha256_file,
)
from services.common.serving import ServingConfig
from services.torchserve.archive import build_archive
from services.triton.model_configs import remove_versions, write_triton_models
from training.data import load_dataset
from training.export import INPUT_NAME, OUTPUT_NAME, export_and_check
from training.trainer import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "classifier"
LOCK_NAME = ".publish.lock"
#: Images of the held-out split used for the export parity check.
PARITY_BATCH = 64


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entry table."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


@contextlib.contextmanager
def repository_lock(repo: Path) -> Iterator[None]:
    """One publisher at a time per repository (an advisory flock on ``.publish.lock``)."""
    repo.mkdir(parents=True, exist_ok=True)
    with (repo / LOCK_NAME).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_version(repo: Path, model: str) -> int:
    """One more than any numbered folder of the model, committed or not: never overwrite."""
    numbers = [0]
    for folder in (repo / model, repo / (model + TORCHSCRIPT_SUFFIX)):
        if folder.is_dir():
            numbers.extend(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    return max(numbers) + 1


def build_manifest(
    model: str,
    version: int,
    checkpoint: dict[str, Any],
    staging: Path,
    artifacts: dict[str, Path],
    parity: dict[str, Any],
    serving: ServingConfig,
) -> Manifest:
    spec = InputSpec.from_dict(checkpoint["input_spec"])
    input_info = spec.to_dict() | {"name": INPUT_NAME}
    return Manifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        model=model,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
        arch=checkpoint["config"]["arch"],
        dataset=checkpoint.get("dataset", {}),
        metrics={k: float(v) for k, v in checkpoint.get("metrics", {}).items()},
        input=input_info,
        output={"name": OUTPUT_NAME, "dtype": "FP32", "shape": [len(checkpoint["labels"])]},
        labels=list(checkpoint["labels"]),
        artifacts={
            key: Artifact(
                path=str(path.relative_to(staging)),
                sha256=sha256_file(path),
                bytes=path.stat().st_size,
            )
            for key, path in artifacts.items()
        },
        serving=serving,
        parity=parity,
        training_config=checkpoint["config"],
    )


def prune(repo: Path, model: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; the manifest folder goes first."""
    removed = []
    for version in list_versions(repo, model)[:-keep]:
        for folder in (
            repo / model / str(version),
            repo / (model + TORCHSCRIPT_SUFFIX) / str(version),
        ):
            if folder.exists():
                doomed = folder.with_name(f".deleted-{folder.name}-{uuid.uuid4().hex[:8]}")
                folder.rename(doomed)
                shutil.rmtree(doomed)
        removed.append(version)
    remove_versions(repo, model, removed)
    return removed


def move_into_place(staged: Path, final: Path) -> None:
    """One atomic rename of a finished version folder into the repository."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(final)
    fsync_path(final.parent)


def _clean_stale_staging(repo: Path) -> None:
    for stale in repo.parent.glob(f".{repo.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def held_out_batch(checkpoint: dict[str, Any]) -> torch.Tensor:
    """Up to ``PARITY_BATCH`` images the checkpoint never trained on (its own test split, else
    its validation split), rebuilt from the dataset settings it carries: the export check's
    input."""
    cfg = checkpoint["config"]
    splits = load_dataset(
        cfg["dataset"],
        Path(cfg["data_dir"]) if cfg.get("data_dir") else None,
        image_size=cfg["image_size"],
        val_fraction=cfg["val_fraction"],
        test_fraction=cfg["test_fraction"],
        seed=cfg["seed"],
    )
    held_out = splits.test if len(splits.test) else splits.val  # type: ignore[arg-type]
    count = min(PARITY_BATCH, len(held_out))  # type: ignore[arg-type]
    return torch.stack([held_out[i][0] for i in range(count)])


def publish_checkpoint(
    checkpoint_path: Path,
    repo: Path,
    model: str = DEFAULT_MODEL_NAME,
    *,
    keep: int | None = None,
    serving: ServingConfig | None = None,
) -> int:
    """Export, check and publish ``checkpoint_path`` as the next version; return its number.

    ``serving`` becomes the manifest's serving block (default: :class:`ServingConfig`'s
    defaults); every engine batches as it says, the Triton configs written here included."""
    started = time.perf_counter()
    repo = repo.resolve()
    serving = serving or ServingConfig()
    checkpoint = load_checkpoint(checkpoint_path)
    eager = model_from_checkpoint(checkpoint)
    parity_batch = held_out_batch(checkpoint)

    repo.mkdir(parents=True, exist_ok=True)
    staging = repo.parent / f".{repo.name}.staging-{uuid.uuid4().hex[:12]}"
    try:
        with repository_lock(repo):
            _clean_stale_staging(repo)
            version = next_version(repo, model)
            onnx_dir = staging / model / str(version)
            ts_dir = staging / (model + TORCHSCRIPT_SUFFIX) / str(version)
            ts_path, onnx_path, report = export_and_check(eager, parity_batch, onnx_dir)
            ts_dir.mkdir(parents=True)
            ts_path = ts_path.replace(ts_dir / TORCHSCRIPT_NAME)
            assert onnx_path.name == ONNX_NAME
            manifest = build_manifest(
                model,
                version,
                checkpoint,
                staging,
                {"onnx": onnx_path, "torchscript": ts_path},
                report.as_dict(),
                serving,
            )
            mar = build_archive(staging, manifest, onnx_dir)
            manifest.artifacts["torchserve_archive"] = Artifact(
                path=str(mar.relative_to(staging)),
                sha256=sha256_file(mar),
                bytes=mar.stat().st_size,
            )
            (onnx_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
            fsync_tree(staging)

            # Configs of the native models, preprocess and the ensemble; they need only the
            # manifest (batching from its serving block), and name no version, so writing them
            # before the commit is safe.
            write_triton_models(repo, manifest)
            for staged in (ts_dir, onnx_dir):  # the manifest's folder last: the commit point
                move_into_place(staged, repo / staged.relative_to(staging))
            if keep is not None:
                removed = prune(repo, model, keep)
                if removed:
                    logger.info("pruned versions %s (keeping %d)", removed, keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    accuracy = manifest.metrics.get("test_accuracy", float("nan"))
    logger.info(
        "published %s version %d to %s (test accuracy %.4f) in %.1fs",
        model,
        version,
        repo,
        accuracy,
        time.perf_counter() - started,
    )
    return version
