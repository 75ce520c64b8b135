"""``python -m services.predictor.gpu_check``: engine throughput on a GPU, as a table.

For the newest (or ``--version``) model of the repository, runs the predictor's own engines
(``services.common.runtime``: the code the server uses, host-to-device copy and result copy
back included) at batch sizes 1 to 256 and prints images/s for TorchScript fp32, fp16,
fp16 + channels-last, and ONNX Runtime's CUDA provider (fp32; the published ONNX file is fp32),
plus each variant's largest logit difference from TorchScript fp32 and its top-1 agreement.

Needs torch, onnxruntime(-gpu), numpy, pydantic and Pillow; not FastAPI or uvicorn, so it runs
on a bare CUDA machine. ``--device cpu`` runs the same table on a CPU (a smoke test).

    python -m services.predictor.gpu_check --repo model_repository
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.repository import RepositoryError, load_version
from services.common.runtime import (
    Engine,
    EngineError,
    EngineKind,
    FloatArray,
    create_engine,
    cuda_available,
    set_torch_threads,
    warm_up,
    warmup_sizes,
)

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class Variant:
    name: str
    kind: EngineKind
    fp16: bool = False
    channels_last: bool = False


VARIANTS = [
    Variant("torchscript fp32", "torchscript"),
    Variant("torchscript fp16", "torchscript", fp16=True),
    Variant("torchscript fp16 channels-last", "torchscript", fp16=True, channels_last=True),
    Variant("onnx fp32", "onnx"),
]


def images_per_second(engine: Engine, batch: FloatArray, seconds: float) -> float:
    """Timed runs of ``engine.infer`` for about ``seconds`` (at least 5 runs)."""
    for _ in range(3):
        engine.infer(batch)
    runs = 0
    start = time.perf_counter()
    while runs < 5 or time.perf_counter() - start < seconds:
        engine.infer(batch)  # returns host memory, so each run is synchronised
        runs += 1
    return runs * len(batch) / (time.perf_counter() - start)


def describe_device(device: str) -> str:
    import onnxruntime as ort
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    return (
        f"{name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"onnxruntime {ort.__version__} {ort.get_available_providers()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.predictor.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="classifier")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke test")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed per cell")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not cuda_available():
        print("no CUDA device here; run this on a GPU machine (or pass --device cpu)")
        return 2
    try:
        version = load_version(args.repo, args.model, args.version)
    except RepositoryError as exc:
        print(f"{exc}\n(make train-and-publish writes a model into {args.repo})")
        return 2

    if args.device == "cpu":
        set_torch_threads(1)  # the smoke test shares a small machine; one thread is fastest
    print(f"{args.model} v{version.version} ({version.manifest.arch}) on {args.device}")
    print(describe_device(args.device))
    print()
    rng = np.random.default_rng(0)
    shape = version.manifest.input_spec.shape
    probe = rng.standard_normal((64, *shape)).astype(np.float32)

    columns: list[str] = []
    table: dict[int, list[str]] = {size: [] for size in args.batches}
    notes: list[str] = []
    reference: FloatArray | None = None
    for variant in VARIANTS:
        try:
            path = version.torchscript_path if variant.kind == "torchscript" else version.onnx_path
            engine = create_engine(
                variant.kind,
                path,
                args.device,
                fp16=variant.fp16,
                channels_last=variant.channels_last,
            )
            sizes = warmup_sizes(max(args.batches))
            warm_up(engine, shape, len(version.labels), sizes, 1, variant.name)
        except EngineError as exc:
            notes.append(f"{variant.name}: unavailable ({exc})")
            continue
        columns.append(variant.name)
        logits = engine.infer(probe)
        if reference is None:
            reference = logits
        diff = float(np.abs(logits - reference).max())
        agree = float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean())
        notes.append(
            f"{variant.name}: max |logit - torchscript fp32| = {diff:.2e}, "
            f"top-1 agreement {agree:.0%} on 64 random inputs (device {engine.device})"
        )
        for size in args.batches:
            batch = rng.standard_normal((size, *shape)).astype(np.float32)
            table[size].append(f"{images_per_second(engine, batch, args.seconds):,.0f}")
        del engine

    print("images/s, engine.infer end to end (host -> device -> host)\n")
    print("| batch | " + " | ".join(columns) + " |")
    print("| ---: | " + " | ".join("---:" for _ in columns) + " |")
    for size in args.batches:
        print(f"| {size} | " + " | ".join(table[size]) + " |")
    print()
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
