"""Datasets: ``digits`` (bundled with scikit-learn), ``cifar10`` (local folder), ``imagefolder``.

Every image goes through :func:`services.common.imaging.preprocess`, the function the serving
engines call, so training and serving see identical tensors. Splits are drawn with a fixed seed.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from services.common.imaging import ImageDecodeError, InputSpec, decode_image, preprocess
from training.digits import digit_pixels, split_indices
from training.errors import DataError

DATASETS = ("digits", "cifar10", "imagefolder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Images sampled from the training split to estimate the per-channel mean and std.
STATS_SAMPLE = 2000
#: Pixel limit for the images of an image folder: the user's own files, decoded one at a time,
#: so the bound is against a broken file rather than a hostile one (a request's images get
#: the serving config's much tighter ``max_pixels``).
FOLDER_MAX_PIXELS = 40_000_000


@dataclass
class DataSplits:
    """Train/val/test datasets of ``(tensor CHW float32, int label)`` and what describes them."""

    train: Dataset[tuple[torch.Tensor, int]]
    val: Dataset[tuple[torch.Tensor, int]]
    test: Dataset[tuple[torch.Tensor, int]]
    labels: list[str]
    input_spec: InputSpec
    name: str
    source: str

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "num_train": len(self.train),  # type: ignore[arg-type]
            "num_val": len(self.val),  # type: ignore[arg-type]
            "num_test": len(self.test),  # type: ignore[arg-type]
            "num_classes": len(self.labels),
        }


def channel_stats(images: npt.NDArray[Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of un-normalised [N,3,H,W] images in [0, 1]."""
    mean = images.mean(axis=(0, 2, 3))
    std = images.std(axis=(0, 2, 3)).clip(min=1e-3)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _to_unit_tensors(images: Sequence[Image.Image], height: int, width: int) -> npt.NDArray[Any]:
    """PIL images -> [N,3,H,W] float32 in [0, 1] through the serving preprocessing."""
    identity = InputSpec(height=height, width=width, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return np.stack([preprocess(image, identity) for image in images])


def _in_memory_splits(
    images: Sequence[Image.Image],
    targets: npt.NDArray[Any],
    labels: list[str],
    test_images: Sequence[Image.Image] | None,
    test_targets: npt.NDArray[Any] | None,
    name: str,
    source: str,
    image_size: int,
    fractions: tuple[float, float],
    seed: int,
) -> DataSplits:
    unit = _to_unit_tensors(images, image_size, image_size)
    if test_images is None:
        train_idx, val_idx, test_idx = split_indices(len(unit), fractions, seed)
        test_unit, test_y = unit[test_idx], targets[test_idx]
    else:
        train_idx, val_idx, _ = split_indices(len(unit), (fractions[0], 0.0), seed)
        test_unit, test_y = _to_unit_tensors(test_images, image_size, image_size), test_targets
    mean, std = channel_stats(unit[train_idx[:STATS_SAMPLE]])
    spec = InputSpec(height=image_size, width=image_size, mean=mean, std=std)  # type: ignore[arg-type]
    mean_arr = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    std_arr = np.asarray(std, dtype=np.float32)[None, :, None, None]

    def tensors(unit_images: npt.NDArray[Any], y: npt.NDArray[Any]) -> TensorDataset:
        x = torch.from_numpy(((unit_images - mean_arr) / std_arr).astype(np.float32))
        return TensorDataset(x, torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return DataSplits(
        train=tensors(unit[train_idx], targets[train_idx]),  # type: ignore[arg-type]
        val=tensors(unit[val_idx], targets[val_idx]),  # type: ignore[arg-type]
        test=tensors(test_unit, np.asarray(test_y)),  # type: ignore[arg-type]
        labels=labels,
        input_spec=spec,
        name=name,
        source=source,
    )


def digit_images() -> tuple[list[Image.Image], npt.NDArray[Any]]:
    """scikit-learn's bundled 8x8 digits as 8-bit grayscale images (values 0..16 -> 0..255)."""
    pixels, targets = digit_pixels()
    return [Image.fromarray(p, mode="L") for p in pixels], targets


def load_digits_splits(image_size: int, fractions: tuple[float, float], seed: int) -> DataSplits:
    images, targets = digit_images()
    labels = [str(d) for d in range(10)]
    return _in_memory_splits(
        images,
        targets,
        labels,
        None,
        None,
        "digits",
        "sklearn.datasets.load_digits",
        image_size,
        fractions,
        seed,
    )


def _read_cifar_batches(
    folder: Path, names: Sequence[str]
) -> tuple[list[Image.Image], npt.NDArray[Any]]:
    images: list[Image.Image] = []
    targets: list[int] = []
    for name in names:
        path = folder / name
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        data = (
            np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        images.extend(Image.fromarray(row, mode="RGB") for row in data)
        targets.extend(int(t) for t in batch["labels"])
    return images, np.asarray(targets)


def load_cifar10_splits(
    root: Path, download: bool, image_size: int, fractions: tuple[float, float], seed: int
) -> DataSplits:
    """CIFAR-10 in its python format (``cifar-10-batches-py``) under ``root``."""
    folder = root / "cifar-10-batches-py"
    if download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    if not folder.is_dir():
        raise DataError(
            f"CIFAR-10 not found: expected {folder} (put the python-format batches there, "
            "or pass --download on a machine with internet)"
        )
    train_files = sorted(p.name for p in folder.glob("data_batch_*"))
    if not train_files or not (folder / "test_batch").is_file():
        raise DataError(f"{folder} lacks data_batch_* or test_batch files")
    try:
        with (folder / "batches.meta").open("rb") as handle:
            labels = [str(n) for n in pickle.load(handle, encoding="latin1")["label_names"]]
        images, targets = _read_cifar_batches(folder, train_files)
        test_images, test_targets = _read_cifar_batches(folder, ["test_batch"])
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-10 batches in {folder}: {exc}") from None
    return _in_memory_splits(
        images,
        targets,
        labels,
        test_images,
        test_targets,
        "cifar10",
        str(folder),
        image_size,
        fractions,
        seed,
    )


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """``root/<class>/<image>`` decoded lazily with the serving decoder."""

    def __init__(self, files: list[tuple[Path, int]], spec: InputSpec) -> None:
        self.files = files
        self.spec = spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.files[index]
        try:
            image = decode_image(path.read_bytes(), max_pixels=FOLDER_MAX_PIXELS)
        except (ImageDecodeError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return torch.from_numpy(preprocess(image, self.spec)), target


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders (expected root/<class>/*.png)"
        )
    files = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not files:
        raise DataError(f"image folder {root} has class folders but no images")
    return classes, files


def load_imagefolder_splits(
    root: Path, image_size: int, fractions: tuple[float, float], seed: int
) -> DataSplits:
    labels, files = scan_image_folder(root)
    train_idx, val_idx, test_idx = split_indices(len(files), fractions, seed)
    identity = InputSpec(height=image_size, width=image_size, mean=(0, 0, 0), std=(1, 1, 1))
    sample = ImageFolderDataset([files[i] for i in train_idx[:STATS_SAMPLE]], identity)
    mean, std = channel_stats(np.stack([sample[i][0].numpy() for i in range(len(sample))]))
    spec = InputSpec(height=image_size, width=image_size, mean=mean, std=std)  # type: ignore[arg-type]
    full = ImageFolderDataset(files, spec)
    return DataSplits(
        train=Subset(full, train_idx.tolist()),
        val=Subset(full, val_idx.tolist()),
        test=Subset(full, test_idx.tolist()),
        labels=labels,
        input_spec=spec,
        name="imagefolder",
        source=str(root),
    )


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    *,
    download: bool = False,
    image_size: int = 32,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Load ``name`` and split it with ``seed``; raises :class:`DataError` with a clear message."""
    fractions = (val_fraction, test_fraction)
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError("val and test fractions must be in (0, 1) and sum to less than 1")
    if name == "digits":
        return load_digits_splits(image_size, fractions, seed)
    if name == "cifar10":
        return load_cifar10_splits(data_dir or Path("data"), download, image_size, fractions, seed)
    if name == "imagefolder":
        if data_dir is None:
            raise DataError("the imagefolder dataset needs --data-dir (a folder of class folders)")
        return load_imagefolder_splits(data_dir, image_size, fractions, seed)
    raise DataError(f"unknown dataset {name!r} (choose one of: {', '.join(DATASETS)})")
