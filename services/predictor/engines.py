"""One :class:`Engine` protocol, two implementations: TorchScript (torch) and ONNX Runtime.

An engine turns a float32 batch ``[N, C, H, W]`` into float32 logits ``[N, classes]``. It is
called from one inference thread at a time, never from the event loop. :func:`load_model`
verifies a repository version (sha256 of every artifact), builds the engine and warms it up;
only a :class:`LoadedModel` that went through all three is ever served.

This module imports neither FastAPI nor the settings, so ``gpu_check`` can use it on a machine
that has only torch and onnxruntime.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from services.common.imaging import InputSpec
from services.common.repository import ModelVersion, load_version

logger = logging.getLogger(__name__)

EngineKind = Literal["torchscript", "onnx"]
FloatArray = npt.NDArray[np.float32]


class EngineError(RuntimeError):
    """An engine could not be built or gave a wrong answer while warming up."""


class Engine(Protocol):
    """What the batcher needs from an inference runtime."""

    @property
    def kind(self) -> EngineKind: ...

    @property
    def platform(self) -> str:
        """Open Inference Protocol platform name (``pytorch_torchscript``, ``onnxruntime_onnx``)."""
        ...

    @property
    def device(self) -> str:
        """Where it runs, e.g. ``cpu``, ``cuda:0``."""
        ...

    def infer(self, batch: FloatArray) -> FloatArray:
        """float32 ``[N, C, H, W]`` -> float32 logits ``[N, classes]`` (host memory)."""
        ...


def cuda_available() -> bool:
    """CUDA as torch sees it; without torch, whether ONNX Runtime was built with CUDA."""
    try:
        import torch
    except ImportError:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` or ``cpu``; asking for CUDA where there is none is an error."""
    if device == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if device.startswith("cuda"):
        if not cuda_available():
            raise EngineError(f"device {device!r} requested but CUDA is not available")
        return "cuda:0" if device == "cuda" else device
    return device


def set_torch_threads(threads: int) -> None:
    """Threads of torch's CPU kernels (process-wide, so set once at start-up)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(1)


class TorchScriptEngine:
    """A TorchScript module under ``torch.inference_mode``; fp16 and channels-last on CUDA."""

    kind: EngineKind = "torchscript"
    platform = "pytorch_torchscript"

    def __init__(
        self,
        path: Path,
        device: str,
        fp16: bool = False,
        channels_last: bool = False,
        optimize: bool = True,
    ) -> None:
        import torch

        self._torch = torch
        self.device = device
        on_cuda = device.startswith("cuda")
        if (fp16 or channels_last) and not on_cuda:
            logger.info("fp16/channels_last apply on CUDA only; running fp32 on %s", device)
        self.fp16 = fp16 and on_cuda
        self.channels_last = channels_last and on_cuda
        self._dtype = torch.float16 if self.fp16 else torch.float32
        try:
            with warnings.catch_warnings():
                # torch 2.14 marks torch.jit deprecated; TorchScript is still what
                # TorchServe and Triton's libtorch backend load, so we keep serving it.
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(path), map_location=device
                )
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(f"cannot load TorchScript model {path}: {exc}") from exc
        module = module.eval()
        if self.fp16:
            module = module.half()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if optimize and not on_cuda:
            # Freezing inlines the weights; optimize_for_inference then folds and prepacks
            # them for oneDNN. About 3x the throughput of the plain module for the CNNs here,
            # with outputs equal to ~1e-6.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        self._module = module

    def infer(self, batch: FloatArray) -> FloatArray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.fp16:
                x = x.half()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self._module(x)
            return np.asarray(logits.float().cpu().numpy(), dtype=np.float32)


class OnnxEngine:
    """An ONNX Runtime session; providers are always named (CUDA first when on a GPU)."""

    kind: EngineKind = "onnx"
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, device: str, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads would steal the CPU the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers: list[Any]
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind11 types for a broken file
            raise EngineError(f"cannot load ONNX model {path}: {exc}") from exc
        active = self._session.get_providers()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in active:
            raise EngineError(f"ONNX Runtime could not use CUDA (providers: {active})")
        self.device = device
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def infer(self, batch: FloatArray) -> FloatArray:
        outputs = self._session.run([self._output], {self._input: batch})
        return np.asarray(outputs[0], dtype=np.float32)


def create_engine(
    kind: EngineKind,
    version: ModelVersion,
    device: str,
    fp16: bool = False,
    channels_last: bool = False,
    threads: int = 1,
    optimize: bool = True,
) -> Engine:
    if kind == "torchscript":
        return TorchScriptEngine(version.torchscript_path, device, fp16, channels_last, optimize)
    return OnnxEngine(version.onnx_path, device, threads)


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed-up version and its engine: the unit the server swaps atomically."""

    version: ModelVersion
    engine: Engine
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.version.manifest.model

    @property
    def number(self) -> int:
        return self.version.version

    @property
    def labels(self) -> list[str]:
        return self.version.labels

    @functools.cached_property
    def spec(self) -> InputSpec:  # parsed once: every request needs it
        return self.version.manifest.input_spec

    @property
    def output_name(self) -> str:
        return str(self.version.manifest.output.get("name", "logits"))


def warm_up(model: LoadedModel, batch_sizes: list[int], runs: int) -> None:
    """Run every batch size ``runs`` times and check the output's shape and values.

    Warm-up pays one-time costs (kernel selection, allocator growth, TorchScript's profiling
    runs) before the first caller does, and doubles as a smoke test: a model whose output does
    not fit the manifest's labels is refused here instead of answering garbage.
    """
    classes = len(model.labels)
    for size in batch_sizes:
        batch = np.zeros((size, *model.spec.shape), dtype=np.float32)
        for _ in range(runs):
            logits = model.engine.infer(batch)
            if logits.shape != (size, classes):
                raise EngineError(
                    f"v{model.number} returned shape {list(logits.shape)} for a batch of "
                    f"{size}, expected {[size, classes]} (labels in the manifest: {classes})"
                )
            if not np.isfinite(logits).all():
                raise EngineError(f"v{model.number} returned non-finite logits while warming up")


def warmup_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size``: the sizes the batcher will actually form."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def load_model(
    repo: Path,
    model: str,
    version: int | None,
    kind: EngineKind,
    device: str,
    *,
    fp16: bool = False,
    channels_last: bool = False,
    threads: int = 1,
    optimize: bool = True,
    max_batch_size: int = 1,
    warmup_runs: int = 2,
) -> LoadedModel:
    """Verify, build and warm up; raises RepositoryError or EngineError on any failure."""
    start = time.perf_counter()
    verified = load_version(repo, model, version)
    engine = create_engine(kind, verified, device, fp16, channels_last, threads, optimize)
    loaded = LoadedModel(version=verified, engine=engine)
    warm_up(loaded, warmup_sizes(max_batch_size), warmup_runs)
    logger.info(
        "loaded %s v%d (%s on %s) in %.2fs",
        model,
        loaded.number,
        kind,
        device,
        time.perf_counter() - start,
    )
    return loaded
