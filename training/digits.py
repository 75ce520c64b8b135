"""scikit-learn's bundled digits and the split drawn from them, without torch.

Training holds out a test split of every dataset with :func:`split_indices`; the load tests,
the benches and the tests send the digits of that split as PNGs (:func:`held_out_digits`), what
a user would upload. This module imports only numpy and Pillow (scikit-learn when the digits
are loaded), so every Locust process can use it without paying torch's start-up.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from training.errors import DataError

#: Fractions of a dataset held out for validation and for test (TrainConfig's defaults).
DEFAULT_SPLIT_FRACTIONS = (0.1, 0.1)
#: Seed of the split (TrainConfig's default).
DEFAULT_SPLIT_SEED = 0


def split_indices(
    count: int, fractions: tuple[float, float], seed: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """Shuffle ``range(count)`` with ``seed``; return train, val, test index arrays."""
    val_fraction, test_fraction = fractions
    order = np.random.default_rng(seed).permutation(count)
    n_val = max(1, round(count * val_fraction))
    n_test = max(1, round(count * test_fraction)) if test_fraction > 0 else 0
    if count - n_val - n_test < 1:
        raise DataError(f"dataset has only {count} images: too few to split")
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def held_out_indices(
    count: int,
    fractions: tuple[float, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = DEFAULT_SPLIT_SEED,
) -> list[int]:
    """The test split of ``range(count)``: images training never saw."""
    _, _, test = split_indices(count, fractions, seed)
    return [int(i) for i in test]


def digit_pixels() -> tuple[npt.NDArray[np.uint8], npt.NDArray[Any]]:
    """The 8x8 digits as 8-bit grayscale ``[N, 8, 8]`` (values 0..16 -> 0..255), and labels."""
    from sklearn.datasets import load_digits  # only here: scikit-learn takes a while to import

    bunch = load_digits()
    pixels = np.clip(np.asarray(bunch.images) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return pixels, np.asarray(bunch.target)


def png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """One grayscale image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class HeldOutDigit:
    """One digit of the test split, encoded as a user would upload it."""

    index: int
    """Position in scikit-learn's digits (stable across runs)."""
    label: int
    png: bytes = field(repr=False)


def held_out_digits(count: int) -> list[HeldOutDigit]:
    """The first ``count`` digits of the test split as 8-bit grayscale PNGs, with labels: the
    payload of every load test, bench and engine test."""
    pixels, labels = digit_pixels()
    indices = held_out_indices(len(pixels))
    if not 0 <= count <= len(indices):
        raise ValueError(f"the test split holds {len(indices)} digits, not {count}")
    return [HeldOutDigit(i, int(labels[i]), png(pixels[i])) for i in indices[:count]]


def held_out_pngs(count: int) -> list[bytes]:
    """The PNGs of :func:`held_out_digits`."""
    return [digit.png for digit in held_out_digits(count)]
