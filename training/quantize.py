"""An int8 variant of the exported ONNX model, published only when it keeps the fp32 answers.

Static post-training quantization with ONNX Runtime's quantization tools: QDQ format (the graph
keeps its float inputs and outputs, so every engine feeds it what it feeds the fp32 model),
int8 weights quantized per output channel, int8 activations whose ranges are calibrated on a
fixed-seed sample of the *training* split (never the held-out images the gate is judged on).

Instead of the fp32 export's logit parity, which int8 cannot meet by design, the int8 model
passes an accuracy gate on the held-out split (:func:`check_gate`): its accuracy within
``margin_pp`` percentage points of the fp32 model's, and its top-1 equal to the fp32 model's on
at least ``min_agreement`` of the images. A model that fails is never published
(:class:`~training.errors.QuantizationError`, exit status 2 from the CLI).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from services.common.repository import Int8Record
from services.common.runtime import EngineError, create_engine
from training.errors import QuantizationError

logger = logging.getLogger(__name__)

#: Training images the activation ranges are calibrated on, and the seed that draws them.
CALIBRATION_IMAGES = 256
CALIBRATION_SEED = 0
#: The gate's defaults: accuracy within half a percentage point, top-1 agreement >= 99%.
DEFAULT_MARGIN_PP = 0.5
DEFAULT_MIN_AGREEMENT = 0.99
_CALIBRATION_BATCH = 32

Images = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GateOptions:
    """How strict the int8 gate is (``margin_pp`` in percentage points, ``min_agreement`` a
    fraction of the held-out images)."""

    margin_pp: float = DEFAULT_MARGIN_PP
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin_pp <= 100.0:
            raise QuantizationError(f"the int8 accuracy margin must be 0-100 points, got {self}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise QuantizationError(f"the int8 top-1 agreement must be 0-1, got {self}")


def stack_images(dataset: Dataset[tuple[torch.Tensor, int]], indices: Any) -> Images:
    """The images of ``dataset`` at ``indices`` as one contiguous float32 [N,C,H,W] array."""
    return np.ascontiguousarray(
        np.stack([dataset[int(i)][0].numpy() for i in indices]), dtype=np.float32
    )


def calibration_images(
    train: Dataset[tuple[torch.Tensor, int]],
    count: int = CALIBRATION_IMAGES,
    seed: int = CALIBRATION_SEED,
) -> Images:
    """A fixed-seed sample of up to ``count`` training images (the same on every run)."""
    size = len(train)  # type: ignore[arg-type]
    if size == 0:
        raise QuantizationError("int8 calibration needs training images; the split is empty")
    picked = np.random.default_rng(seed).choice(size, min(count, size), replace=False)
    return stack_images(train, np.sort(picked))


def quantize_onnx(source: Path, target: Path, calibration: Images, input_name: str) -> Path:
    """Write the int8 QDQ model of ``source`` to ``target``, calibrated on ``calibration``."""
    # Imported here: the quantization tools pull in sympy and more, needed only by --int8.
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, Images]] = iter(
                {input_name: calibration[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(calibration), _CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, Images] | None:
            return next(self._batches, None)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    return target


def _top1(path: Path, images: Images) -> npt.NDArray[np.int64]:
    try:
        engine = create_engine("onnx", path, "cpu")
    except EngineError as exc:
        raise QuantizationError(f"the int8 model does not load: {exc}") from None
    answers = [engine.infer(images[i : i + 256]).argmax(axis=1) for i in range(0, len(images), 256)]
    top1: npt.NDArray[np.int64] = np.concatenate(answers).astype(np.int64)
    return top1


def check_gate(
    fp32_path: Path,
    int8_path: Path,
    images: Images,
    labels: npt.NDArray[np.int64],
    calibration_count: int,
    options: GateOptions,
) -> Int8Record:
    """Run both models on the held-out ``images``; the record, or QuantizationError."""
    if len(images) == 0:
        raise QuantizationError("the int8 gate needs held-out images; the split is empty")
    fp32, int8 = _top1(fp32_path, images), _top1(int8_path, images)
    record = Int8Record(
        accuracy_fp32=float((fp32 == labels).mean()),
        accuracy_int8=float((int8 == labels).mean()),
        top1_agreement=float((fp32 == int8).mean()),
        margin_pp=options.margin_pp,
        min_agreement=options.min_agreement,
        held_out_images=len(images),
        calibration_images=calibration_count,
        calibration_seed=CALIBRATION_SEED,
    )
    drop_pp = 100.0 * (record.accuracy_fp32 - record.accuracy_int8)
    if drop_pp > options.margin_pp or record.top1_agreement < options.min_agreement:
        raise QuantizationError(
            f"int8 gate failed on {len(images)} held-out images: accuracy "
            f"{record.accuracy_int8:.4f} vs fp32 {record.accuracy_fp32:.4f} "
            f"(limit {options.margin_pp} points), top-1 agreement "
            f"{record.top1_agreement:.4f} (limit {options.min_agreement}); nothing published"
        )
    logger.info(
        "int8 gate passed on %d images: accuracy %.4f (fp32 %.4f), top-1 agreement %.4f",
        len(images),
        record.accuracy_int8,
        record.accuracy_fp32,
        record.top1_agreement,
    )
    return record
