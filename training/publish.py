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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from services.common.imaging import InputSpec
from services.common.publishing import Packager, prune, resolve_packagers, stage_version
from services.common.repository import (
    MANIFEST_SCHEMA_VERSION,
    ONNX_NAME,
    TORCHSCRIPT_NAME,
    Artifact,
    Manifest,
)
from services.common.serving import ServingConfig
from training.data import load_dataset
from training.export import INPUT_NAME, OUTPUT_NAME, export_and_check
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
        training_config=checkpoint["config"],
    )


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
    packagers: Iterable[str | Packager] | None = None,
) -> int:
    """Export, check and publish ``checkpoint_path`` as the next version; return its number.

    ``serving`` becomes the manifest's serving block (default: :class:`ServingConfig`'s
    defaults); every engine batches as it says. ``packagers`` default to
    :data:`services.common.publishing.DEFAULT_PACKAGERS` (TorchServe's archive, Triton's
    configs); ``keep`` prunes all but the newest ``keep`` versions afterwards."""
    started = time.perf_counter()
    repo = repo.resolve()
    serving = serving or ServingConfig()
    chosen = resolve_packagers(packagers)  # a packager that cannot be found fails before export
    checkpoint = load_checkpoint(checkpoint_path)
    eager = model_from_checkpoint(checkpoint)
    parity_batch = held_out_batch(checkpoint)

    with stage_version(repo, model) as staged:
        version = staged.version
        ts_path, onnx_path, report = export_and_check(eager, parity_batch, staged.version_dir)
        staged.torchscript_dir.mkdir(parents=True)
        ts_path = ts_path.replace(staged.torchscript_dir / TORCHSCRIPT_NAME)
        assert onnx_path.name == ONNX_NAME
        artifacts = {"onnx": staged.artifact(onnx_path), "torchscript": staged.artifact(ts_path)}
        manifest = build_manifest(model, version, checkpoint, artifacts, report.as_dict(), serving)
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
