"""Publish a checkpoint as a new version of the Triton-style model repository, atomically.

The training side of publishing: load the checkpoint, export TorchScript + ONNX into the
version's staging folder, check their parity with the eager model on held-out images and
build the manifest (sha256 of every artifact, and the ``serving`` block:
:class:`~services.common.serving.ServingConfig`, from the CLI's flags). Everything about the
repository's layout (the version number, the staging folder, the lock, fsync, the packagers
that add each engine's files, the commit renames with the manifest's folder last, pruning)
is :mod:`services.common.publishing`'s. So training imports no serving engine: the TorchServe
archive builder and the Triton config writer are packagers found by name at publish time.
A crash at any step leaves the previous versions untouched and no half version visible.

With ``int8`` (``publish --int8``) the version also carries an int8 ONNX model
(:mod:`training.quantize`): calibrated on training images, published only if it passes its
accuracy gate on the held-out split, with its figures in the manifest's ``int8`` block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from services.common.imaging import InputSpec
from services.common.publishing import (
    Packager,
    StagedVersion,
    prune,
    resolve_packagers,
    stage_version,
)
from services.common.repository import (
    INT8_ARTIFACT,
    MANIFEST_SCHEMA_VERSION,
    ONNX_ARTIFACT,
    ONNX_NAME,
    TORCHSCRIPT_ARTIFACT,
    TORCHSCRIPT_NAME,
    Artifact,
    Int8Record,
    Manifest,
)
from services.common.serving import ServingConfig
from training.data import DataSplits, load_dataset
from training.export import INPUT_NAME, OUTPUT_NAME, export_and_check
from training.quantize import (
    GateOptions,
    calibration_images,
    check_gate,
    quantize_onnx,
    stack_images,
)
from training.trainer import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "classifier"
#: Images of the held-out split used for the export parity check.
PARITY_BATCH = 64


def build_manifest(
    model: str,
    version: int,
    checkpoint: dict[str, Any],
    artifacts: dict[str, Artifact],
    parity: dict[str, Any],
    serving: ServingConfig,
    int8: Int8Record | None = None,
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
        artifacts=artifacts,
        serving=serving,
        parity=parity,
        int8=int8,
        training_config=checkpoint["config"],
    )


def checkpoint_splits(checkpoint: dict[str, Any]) -> DataSplits:
    """The splits the checkpoint was trained with, rebuilt from the dataset settings it
    carries (the same seed, so the same images land in each split)."""
    cfg = checkpoint["config"]
    return load_dataset(
        cfg["dataset"],
        Path(cfg["data_dir"]) if cfg.get("data_dir") else None,
        image_size=cfg["image_size"],
        val_fraction=cfg["val_fraction"],
        test_fraction=cfg["test_fraction"],
        seed=cfg["seed"],
    )


def held_out_split(splits: DataSplits) -> Dataset[tuple[torch.Tensor, int]]:
    """The images the checkpoint never trained on: its test split, else its validation split."""
    return splits.test if len(splits.test) else splits.val  # type: ignore[arg-type]


def held_out_batch(checkpoint: dict[str, Any], splits: DataSplits | None = None) -> torch.Tensor:
    """Up to ``PARITY_BATCH`` held-out images: the export check's input."""
    held_out = held_out_split(splits or checkpoint_splits(checkpoint))
    count = min(PARITY_BATCH, len(held_out))  # type: ignore[arg-type]
    return torch.stack([held_out[i][0] for i in range(count)])


def publish_int8(
    staged: StagedVersion, onnx_path: Path, splits: DataSplits, gate: GateOptions
) -> tuple[Artifact, Int8Record]:
    """Quantize the staged ONNX model into ``<model>_int8/<v>/model.onnx`` and gate it on the
    whole held-out split; its artifact and record, or QuantizationError."""
    calibration = calibration_images(splits.train)
    int8_path = quantize_onnx(onnx_path, staged.int8_dir / ONNX_NAME, calibration, INPUT_NAME)
    held_out = held_out_split(splits)
    everything = range(len(held_out))  # type: ignore[arg-type]
    images = stack_images(held_out, everything)
    labels = np.array([held_out[i][1] for i in everything], dtype=np.int64)
    record = check_gate(onnx_path, int8_path, images, labels, len(calibration), gate)
    return staged.artifact(int8_path), record


def publish_checkpoint(
    checkpoint_path: Path,
    repo: Path,
    model: str = DEFAULT_MODEL_NAME,
    *,
    keep: int | None = None,
    serving: ServingConfig | None = None,
    packagers: Iterable[str | Packager] | None = None,
    int8: GateOptions | None = None,
) -> int:
    """Export, check and publish ``checkpoint_path`` as the next version; return its number.

    ``serving`` becomes the manifest's serving block (default: :class:`ServingConfig`'s
    defaults); every engine batches as it says. ``packagers`` default to
    :data:`services.common.publishing.DEFAULT_PACKAGERS` (TorchServe's archive, Triton's
    configs); ``keep`` prunes all but the newest ``keep`` versions afterwards; ``int8`` (the
    gate's options) adds an int8 model that must pass that gate, or nothing is published."""
    started = time.perf_counter()
    repo = repo.resolve()
    serving = serving or ServingConfig()
    chosen = resolve_packagers(packagers)  # a packager that cannot be found fails before export
    checkpoint = load_checkpoint(checkpoint_path)
    eager = model_from_checkpoint(checkpoint)
    splits = checkpoint_splits(checkpoint)
    parity_batch = held_out_batch(checkpoint, splits)

    with stage_version(repo, model, chosen) as staged:
        version = staged.version
        ts_path, onnx_path, report = export_and_check(eager, parity_batch, staged.version_dir)
        staged.torchscript_dir.mkdir(parents=True)
        ts_path = ts_path.replace(staged.torchscript_dir / TORCHSCRIPT_NAME)
        assert onnx_path.name == ONNX_NAME
        artifacts = {
            ONNX_ARTIFACT: staged.artifact(onnx_path),
            TORCHSCRIPT_ARTIFACT: staged.artifact(ts_path),
        }
        int8_record = None
        if int8 is not None:
            artifacts[INT8_ARTIFACT], int8_record = publish_int8(staged, onnx_path, splits, int8)
        manifest = build_manifest(
            model, version, checkpoint, artifacts, report.as_dict(), serving, int8_record
        )
        manifest = staged.commit(manifest, chosen)
        if keep is not None:
            removed = prune(repo, model, keep, chosen)
            if removed:
                logger.info("pruned versions %s (keeping %d)", removed, keep)
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
