"""Dataset loaders: digits (bundled), CIFAR-10 from a local folder, imagefolder; clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import load_dataset
from training.errors import DataError


def test_digits_split_is_seeded_and_complete() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    assert a.labels == [str(d) for d in range(10)]
    sizes = (len(a.train), len(a.val), len(a.test))  # type: ignore[arg-type]
    assert sum(sizes) == 1797 and sizes == (1437, 180, 180)
    x, y = a.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert torch.equal(a.test[5][0], b.test[5][0])
    other = load_dataset("digits", seed=1)
    assert not torch.equal(a.test[5][0], other.test[5][0])
    # Normalised with the training split's own statistics.
    train_x = torch.stack([a.train[i][0] for i in range(200)])
    assert abs(float(train_x.mean())) < 0.3


def _write_cifar(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict[str, object]:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": [i % 3 for i in range(n)],
        }

    for name, n in (("data_batch_1", 30), ("data_batch_2", 30), ("test_batch", 12)):
        with (folder / name).open("wb") as handle:
            pickle.dump(batch(n), handle)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": ["cat", "dog", "ship"]}, handle)


def test_cifar10_from_local_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    splits = load_dataset("cifar10", tmp_path, seed=0)
    assert splits.labels == ["cat", "dog", "ship"]
    assert len(splits.test) == 12  # the official test batch, not a split of train
    assert len(splits.train) + len(splits.val) == 60  # type: ignore[arg-type]
    assert splits.test[0][0].shape == (3, 32, 32)


def test_cifar10_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_dataset("cifar10", tmp_path)


def _write_imagefolder(root: Path, per_class: int = 6) -> None:
    for index, name in enumerate(("apple", "banana")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (200, 30, 30) if index == 0 else (230, 220, 40)
            Image.new("RGB", (40 + i, 30), colour).save(root / name / f"{i}.png")


def test_imagefolder_uses_class_folders_as_labels(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    splits = load_dataset("imagefolder", tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert splits.labels == ["apple", "banana"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12  # type: ignore[arg-type]
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)


@pytest.mark.parametrize(
    ("name", "folder", "message"),
    [
        ("mnist-but-not", None, "unknown dataset"),
        ("imagefolder", "missing", "does not exist"),
        ("imagefolder", "empty", "no class subfolders"),
        ("imagefolder", "no-images", "no images"),
        ("imagefolder", None, "needs --data-dir"),
    ],
)
def test_dataset_errors(tmp_path: Path, name: str, folder: str | None, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-images" / "cls").mkdir(parents=True)
    (tmp_path / "no-images" / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=message):
        load_dataset(name, tmp_path / folder if folder else None)
