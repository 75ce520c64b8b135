"""Export parity, the repository layout publish writes, atomicity and integrity checks."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common import publishing
from services.common.repository import (
    IntegrityError,
    list_versions,
    load_version,
    read_manifest,
    sha256_file,
)
from services.common.serving import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGES_PER_REQUEST,
    ServingConfig,
)
from training.data import load_dataset
from training.errors import ParityError
from training.export import check_parity, export_and_check
from training.publish import publish_checkpoint
from training.trainer import load_checkpoint, model_from_checkpoint


def _held_out_batch() -> torch.Tensor:
    splits = load_dataset("digits", seed=0)
    return torch.stack([splits.test[i][0] for i in range(32)])


def test_export_parity_torchscript_and_onnx(trained_checkpoint: Path, tmp_path: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(trained_checkpoint))
    ts_path, onnx_path, report = export_and_check(model, _held_out_batch(), tmp_path)
    assert report.top1_identical
    assert report.torchscript_max_abs_diff <= 1e-4 and report.onnx_max_abs_diff <= 1e-4
    graph = onnx.load(str(onnx_path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    assert onnx.load(str(onnx_path)).opset_import[0].version >= 17
    assert ts_path.name == "model.pt"


def test_parity_failure_is_detected(trained_checkpoint: Path, tmp_path: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(trained_checkpoint))
    batch = _held_out_batch()
    ts_path, onnx_path, _ = export_and_check(model, batch, tmp_path)
    with torch.no_grad():
        model.classifier[-1].bias.add_(1e-2)  # type: ignore[index,union-attr]
    with pytest.raises(ParityError, match="parity failed"):
        check_parity(model, ts_path, onnx_path, batch)


def _parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_publish_layout_twice(trained_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert publish_checkpoint(trained_checkpoint, repo) == 1
    assert publish_checkpoint(trained_checkpoint, repo) == 2
    assert list_versions(repo, "classifier") == [1, 2]

    onnx_cfg = _parse_config(repo / "classifier" / "config.pbtxt")
    assert onnx_cfg.platform == "onnxruntime_onnx"
    # The serving defaults: requests of up to 64 images, merged batches of 32.
    assert onnx_cfg.max_batch_size == DEFAULT_MAX_IMAGES_PER_REQUEST
    assert list(onnx_cfg.dynamic_batching.preferred_batch_size) == [DEFAULT_MAX_BATCH_SIZE]
    assert onnx_cfg.HasField("dynamic_batching")
    assert list(onnx_cfg.input[0].dims) == [3, 32, 32]
    assert list(onnx_cfg.output[0].dims) == [10]
    assert onnx_cfg.output[0].label_filename == "labels.txt"
    ts_cfg = _parse_config(repo / "classifier_torchscript" / "config.pbtxt")
    assert ts_cfg.platform == "pytorch_libtorch" and ts_cfg.HasField("dynamic_batching")
    labels = (repo / "classifier" / "labels.txt").read_text().split()
    assert labels == [str(d) for d in range(10)]

    for version in (1, 2):
        manifest = read_manifest(repo, "classifier", version)
        assert manifest.version == version and manifest.labels == labels
        assert manifest.metrics["test_accuracy"] > 0.9
        assert manifest.dataset["name"] == "digits"
        assert manifest.input["shape"] == [3, 32, 32] and len(manifest.input["mean"]) == 3
        assert manifest.torch_version == torch.__version__ and manifest.created_at
        assert manifest.serving == ServingConfig()
        assert set(manifest.artifacts) == {"onnx", "torchscript", "torchserve_archive"}
        for artifact in manifest.artifacts.values():
            assert sha256_file(repo / artifact.path) == artifact.sha256
        loaded = load_version(repo, "classifier", version)
        assert loaded.onnx_path == repo / "classifier" / str(version) / "model.onnx"
        assert (
            loaded.torchscript_path == repo / "classifier_torchscript" / str(version) / "model.pt"
        )
        scripted = torch.jit.load(str(loaded.torchscript_path))
        assert scripted(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert load_version(repo, "classifier").version == 2
    # The staging folder beside the repository is gone.
    assert not list(tmp_path.glob(".repo.staging-*"))


def test_triton_batch_size_comes_from_the_serving_config_not_the_environment(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    config = repo / "classifier" / "config.pbtxt"
    monkeypatch.setenv("TRITON_MAX_BATCH_SIZE", "8")  # a server's override: publish ignores it
    monkeypatch.setenv("TRITON_PREFERRED_BATCH_SIZES", "[2]")
    publish_checkpoint(trained_checkpoint, repo)
    assert _parse_config(config).max_batch_size == DEFAULT_MAX_IMAGES_PER_REQUEST
    assert list(_parse_config(config).dynamic_batching.preferred_batch_size) == [
        DEFAULT_MAX_BATCH_SIZE
    ]
    assert read_manifest(repo, "classifier", 1).serving == ServingConfig()
    serving = ServingConfig(max_batch_size=16, max_images_per_request=16)
    publish_checkpoint(trained_checkpoint, repo, serving=serving)
    assert _parse_config(config).max_batch_size == 16
    assert read_manifest(repo, "classifier", 2).serving == serving


def test_crash_mid_publish_leaves_previous_version_serving(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    publish_checkpoint(trained_checkpoint, repo)
    real_move = publishing.move_into_place
    moved: list[Path] = []

    def crash_on_commit(staged: Path, final: Path) -> None:
        if final.parent.name == "classifier":  # the manifest folder: the commit point
            raise OSError("simulated crash before the commit rename")
        real_move(staged, final)
        moved.append(final)

    monkeypatch.setattr(publishing, "move_into_place", crash_on_commit)
    with pytest.raises(OSError, match="simulated crash"):
        publish_checkpoint(trained_checkpoint, repo)
    monkeypatch.undo()
    # It got half way: every folder of version 2 but its manifest's.
    half = ["classifier_ensemble/2", "classifier_torchscript/2", "preprocess/2"]
    assert moved == [repo.resolve() / folder for folder in half]
    assert list_versions(repo, "classifier") == [1]
    assert load_version(repo, "classifier").version == 1
    assert not (repo / "classifier" / "2").exists()
    # The next publish never reuses the number the crashed one half-wrote, and removes its half.
    assert publish_checkpoint(trained_checkpoint, repo) == 3
    assert list_versions(repo, "classifier") == [1, 3]
    assert [folder for folder in half if (repo / folder).exists()] == []


def test_tampered_artifact_is_refused(trained_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_checkpoint(trained_checkpoint, repo)
    onnx_path = repo / "classifier" / "1" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        load_version(repo, "classifier", 1)


def test_corrupt_manifest_is_refused(trained_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_checkpoint(trained_checkpoint, repo)
    manifest_path = repo / "classifier" / "1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text()[:100])
    with pytest.raises(Exception, match="unreadable"):
        load_version(repo, "classifier", 1)


def test_keep_prunes_old_versions(trained_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for _ in range(3):
        publish_checkpoint(trained_checkpoint, repo, keep=2)
    assert list_versions(repo, "classifier") == [2, 3]
    assert not (repo / "classifier_torchscript" / "1").exists()
    for name in ("classifier", "classifier_torchscript", "preprocess", "classifier_ensemble"):
        assert sorted(p.name for p in (repo / name).iterdir() if p.is_dir()) == ["2", "3"], name
    manifest = json.loads((repo / "classifier" / "3" / "manifest.json").read_text())
    assert manifest["version"] == 3
