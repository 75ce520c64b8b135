"""Export a checkpoint to TorchScript (``model.pt``) and ONNX (``model.onnx``), then prove parity.

Both files are run on a held-out batch beside the eager model, through the engines of the
shared runtime (:mod:`services.common.runtime`) exactly as the servers will run them: the max
absolute logit difference must be at most ``PARITY_ATOL`` and the top-1 classes identical, at
the full batch and at batch 1 (the batch axis is dynamic), or :class:`ParityError` is raised and
nothing is published.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from services.common.runtime import EngineError, create_engine
from training.errors import ParityError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_OPSET = 18
PARITY_ATOL = 1e-4


@dataclass
class ParityReport:
    batch_size: int
    torchscript_max_abs_diff: float
    onnx_max_abs_diff: float
    top1_identical: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "torchscript_max_abs_diff": self.torchscript_max_abs_diff,
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
            "top1_identical": self.top1_identical,
            "atol": PARITY_ATOL,
        }


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Trace on CPU in eval mode (the networks have no data-dependent control flow)."""
    model = model.eval().cpu()
    # TorchScript is deprecated upstream but is what Triton's libtorch backend and TorchServe load.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example.cpu(), check_trace=True)  # type: ignore[no-untyped-call]
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The dynamo exporter with a dynamic batch axis; the file is checked by onnx.checker."""
    model = model.eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example.cpu(),),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ParityError("the ONNX exporter returned no program")
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def check_parity(
    model: nn.Module, torchscript_path: Path, onnx_path: Path, batch: torch.Tensor
) -> ParityReport:
    """Compare eager, TorchScript and ONNX Runtime logits; raise ParityError on disagreement."""
    model = model.eval().cpu()
    try:
        scripted = create_engine("torchscript", torchscript_path, "cpu")
        session = create_engine("onnx", onnx_path, "cpu")
    except EngineError as exc:
        raise ParityError(f"an exported file does not load: {exc}") from None
    worst_ts, worst_onnx, top1_same = 0.0, 0.0, True
    for inputs in (batch.cpu(), batch[:1].cpu()):
        with torch.inference_mode():
            eager = model(inputs).numpy()
        array = np.ascontiguousarray(inputs.numpy(), dtype=np.float32)
        traced = scripted.infer(array)
        exported = session.infer(array)
        worst_ts = max(worst_ts, float(np.abs(eager - traced).max()))
        worst_onnx = max(worst_onnx, float(np.abs(eager - exported).max()))
        top1 = eager.argmax(axis=1)
        top1_same &= bool((top1 == traced.argmax(axis=1)).all())
        top1_same &= bool((top1 == exported.argmax(axis=1)).all())
    report = ParityReport(len(batch), worst_ts, worst_onnx, top1_same)
    if worst_ts > PARITY_ATOL or worst_onnx > PARITY_ATOL or not top1_same:
        raise ParityError(
            f"export parity failed: TorchScript max|diff| {worst_ts:.2e}, "
            f"ONNX max|diff| {worst_onnx:.2e} (limit {PARITY_ATOL:.0e}), "
            f"top-1 identical: {top1_same}"
        )
    logger.info(
        "parity ok on %d images: TorchScript %.2e, ONNX %.2e, top-1 identical",
        len(batch),
        worst_ts,
        worst_onnx,
    )
    return report


def export_and_check(
    model: nn.Module, batch: torch.Tensor, out_dir: Path
) -> tuple[Path, Path, ParityReport]:
    """Write ``model.pt`` and ``model.onnx`` under ``out_dir`` and check them."""
    torchscript_path = export_torchscript(model, batch[:2], out_dir / "model.pt")
    onnx_path = export_onnx(model, batch[:2], out_dir / "model.onnx")
    report = check_parity(model, torchscript_path, onnx_path, batch)
    return torchscript_path, onnx_path, report
