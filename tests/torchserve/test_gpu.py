"""The handler on CUDA gives the CPU's answers (skipped without a GPU; `make gpu-check`).

TorchServe itself needs a JVM; this check needs only the archive, torch and the ``ts`` Python
package. It extracts the archive the way TorchServe does, puts the extracted folder first on
``sys.path`` (so the archived ``services/common`` is the one imported, as in a worker), builds
TorchServe's own ``Context`` with ``gpu_id=0`` and with no GPU, and sends the same batch
(held-out digits plus one broken image) through ``handle`` on both.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from services.torchserve.archive import build_archive
from tests.conftest import PublishedModel
from training.digits import held_out_pngs


def _context(model_dir: Path, gpu_id: int | None, bodies: list[bytes]) -> Any:
    from ts.context import Context, RequestProcessor

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context(
        manifest["model"]["modelName"], str(model_dir), manifest, len(bodies), gpu_id, "check"
    )
    context.request_processor = [
        RequestProcessor({"body": {"content-type": "application/octet-stream"}}) for _ in bodies
    ]
    return context


def _run(handler_cls: Any, model_dir: Path, gpu_id: int | None, bodies: list[bytes]) -> Any:
    handler = handler_cls()
    handler.initialize(_context(model_dir, gpu_id, bodies))
    context = _context(model_dir, gpu_id, bodies)
    rows = [{"body": body} for body in bodies]
    handler.handle(rows, context)  # warm
    if handler.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    context = _context(model_dir, gpu_id, bodies)
    answers = handler.handle(rows, context)
    if handler.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    statuses = [context.get_response_status(i)[0] for i in range(len(bodies))]
    return handler.device, [json.loads(a) for a in answers], statuses, elapsed_ms


def check(mar: Path, batch: int = 32) -> dict[str, Any]:
    """Compare the handler on cuda:0 and on CPU for one batch; ``ok`` says whether they agree."""
    bodies = [*held_out_pngs(batch - 1), b"not an image"]
    with tempfile.TemporaryDirectory(prefix="ts-gpu-check-") as tmp:
        model_dir = Path(tmp)
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(model_dir)
        sys.path.insert(0, str(model_dir))
        # Import the archived services/common, as a worker does, and put the caller's
        # modules back afterwards.
        saved = {
            name: module
            for name, module in sys.modules.items()
            if name == "services" or name.startswith("services.")
        }
        for name in saved:
            del sys.modules[name]
        try:
            handler_module = importlib.import_module("handler")
            handler_cls = handler_module.ImageClassifierHandler
            gpu_device, gpu_answers, gpu_status, gpu_ms = _run(handler_cls, model_dir, 0, bodies)
            cpu_device, cpu_answers, cpu_status, cpu_ms = _run(handler_cls, model_dir, None, bodies)
            imaging_file = sys.modules["services.common.imaging"].__file__
        finally:
            sys.path.remove(str(model_dir))
            for name in [m for m in sys.modules if m == "services" or m.startswith("services.")]:
                del sys.modules[name]
            sys.modules.update(saved)
            sys.modules.pop("handler", None)
    good = range(batch - 1)
    max_score_diff = max(
        abs(g["score"] - c["score"])
        for i in good
        for g, c in zip(gpu_answers[i]["predictions"], cpu_answers[i]["predictions"], strict=True)
    )
    same_top1 = all(
        gpu_answers[i]["predictions"][0]["class_id"] == cpu_answers[i]["predictions"][0]["class_id"]
        for i in good
    )
    report = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_device": str(gpu_device),
        "cpu_device": str(cpu_device),
        "imaging_from_archive": str(imaging_file).startswith(tmp),
        "gpu_statuses_ok": gpu_status == [200] * (batch - 1) + [400],
        "cpu_statuses_ok": cpu_status == [200] * (batch - 1) + [400],
        "same_top1": same_top1,
        "max_score_diff": max_score_diff,
        "gpu_batch_ms": round(gpu_ms, 2),
        "cpu_batch_ms": round(cpu_ms, 2),
        "batch": batch,
    }
    report["ok"] = bool(
        report["gpu_device"] == "cuda:0"
        and report["cpu_device"] == "cpu"
        and report["imaging_from_archive"]
        and report["gpu_statuses_ok"]
        and report["cpu_statuses_ok"]
        and same_top1
        and max_score_diff < 1e-4
    )
    return report


@pytest.mark.gpu
def test_handler_on_cuda_matches_cpu(published_model: PublishedModel, tmp_path: Path) -> None:
    mar = build_archive(published_model.repo, published_model.manifest, tmp_path)
    report = check(mar, batch=32)
    assert report["gpu_device"] == "cuda:0", report
    assert report["ok"], report
