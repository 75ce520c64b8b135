"""The model runtime every engine runs a published version with, written once.

The predictor, the TorchServe handler, Triton's python twins and the export parity check all
load a model file through :func:`create_engine` (TorchScript under torch, or an ONNX Runtime
session with its providers always named), check a file against its manifest's sha256 with
:func:`verify_file`, prove it with :func:`warm_up` before anything is served, and turn logits
into answers with :func:`top_k_predictions`. So the three engines run the same code on the same
bytes, and a change here reaches all of them.

An engine turns a float32 batch ``[N, C, H, W]`` into float32 logits ``[N, classes]``; it is
called from one thread at a time per engine instance, never from an event loop.

This module needs only the standard library, NumPy and :mod:`services.common.errors`; torch and
onnxruntime are imported when an engine of theirs is built. That is what lets it travel, with
:data:`PORTABLE_MODULES`, into TorchServe's archive and into the version folders of Triton's
python models, where the ``services`` package is not installed. :func:`load_model` is the
predictor's entry point: it reads the repository through :mod:`services.common.repository`
(pydantic), imported only when it is called.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from services.common.errors import IntegrityError, RepositoryError, ServiceError

if TYPE_CHECKING:
    from services.common.imaging import InputSpec
    from services.common.repository import ModelVersion
    from services.common.serving import ServingConfig

logger = logging.getLogger(__name__)

EngineKind = Literal["torchscript", "onnx"]
#: ``int8``: the version's int8 ONNX model (``publish --int8``), run by the ONNX engine.
Precision = Literal["fp32", "int8"]
FloatArray = npt.NDArray[np.float32]

#: The modules of ``services/common`` that a model folder carries to run without the project
#: installed (TorchServe's archive, Triton's python models), with the package files above them.
PORTABLE_MODULES = ("errors", "imaging", "runtime")
COMMON_DIR = Path(__file__).resolve().parent


def portable_files() -> dict[str, Path]:
    """Relative path in a carried tree -> source file: ``services/common/runtime.py``, ..."""
    files = {
        "services/__init__.py": COMMON_DIR.parent / "__init__.py",
        "services/common/__init__.py": COMMON_DIR / "__init__.py",
    }
    for name in PORTABLE_MODULES:
        files[f"services/common/{name}.py"] = COMMON_DIR / f"{name}.py"
    return files


def require_carried(version_dir: Path) -> None:
    """Raise unless this module was imported from the copy carried in ``version_dir``: a model
    folder must run its own bytes, not whatever else is importable in that process."""
    here = Path(__file__).resolve()
    if not here.is_relative_to(version_dir.resolve()):
        raise RuntimeError(f"imported {here}, not the copy carried in {version_dir}")


class EngineError(ServiceError):
    """An engine could not be built, or gave a wrong answer while warming up."""

    status_code = 503
    code = "engine_error"


# --- integrity --------------------------------------------------------------------------------


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected_sha256: str, what: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` exists with the recorded sha256.

    ``what`` names the file in the message, the way its reader may be shown it (the artifact's
    path relative to the repository, e.g. ``classifier_torchscript/3/model.pt``): the message
    names no other path, so it can go into ``/readyz`` as it is."""
    if not path.is_file():
        raise IntegrityError(f"{what}: missing")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(
            f"{what}: sha256 mismatch (manifest {expected_sha256[:12]}..., file {actual[:12]}...)"
        )


# --- devices ---------------------------------------------------------------------------------


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


# --- engines ---------------------------------------------------------------------------------


class Engine(Protocol):
    """What a server needs from an inference runtime."""

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
            # them for oneDNN: several times the throughput of the plain module for the CNNs
            # here, with outputs equal to ~1e-6.
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
        # One intra-op thread by default: ORT's own default pins a thread to every core,
        # which escapes `taskset` and competes with request handling for the CPU.
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
    path: Path,
    device: str = "cpu",
    *,
    fp16: bool = False,
    channels_last: bool = False,
    threads: int = 1,
    optimize: bool = True,
) -> Engine:
    """The engine of ``kind`` for the model file ``path`` (verify the file first)."""
    if kind == "torchscript":
        return TorchScriptEngine(path, device, fp16, channels_last, optimize)
    if kind == "onnx":
        return OnnxEngine(path, device, threads)
    raise EngineError(f"unknown engine kind {kind!r} (expected torchscript or onnx)")


# --- warm-up ---------------------------------------------------------------------------------


def warmup_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size``: the sizes a dynamic batcher will actually form."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def warm_up(
    engine: Engine,
    input_shape: Sequence[int],
    classes: int,
    batch_sizes: Sequence[int],
    runs: int = 2,
    what: str = "model",
) -> None:
    """Run every batch size ``runs`` times and check the output's shape and values.

    Warm-up pays one-time costs (kernel selection, allocator growth, TorchScript's profiling
    runs) before the first caller does, and doubles as a smoke test: a model whose output does
    not fit the manifest's labels is refused here instead of answering garbage.
    """
    for size in batch_sizes:
        batch = np.zeros((size, *input_shape), dtype=np.float32)
        for _ in range(runs):
            logits = engine.infer(batch)
            if logits.shape != (size, classes):
                raise EngineError(
                    f"{what} returned shape {list(logits.shape)} for a batch of "
                    f"{size}, expected {[size, classes]} (labels in the manifest: {classes})"
                )
            if not np.isfinite(logits).all():
                raise EngineError(f"{what} returned non-finite logits while warming up")


# --- answers ---------------------------------------------------------------------------------


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Row-wise softmax in float64 for stable scores."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float64] = exp / exp.sum(axis=-1, keepdims=True)
    return result


def top_k_predictions(
    logits: npt.NDArray[np.floating[Any]], labels: Sequence[str], top_k: int
) -> list[list[dict[str, Any]]]:
    """Logits [N, C] -> per image a list of ``{"label", "class_id", "score"}``, best first
    (ties by class id)."""
    scores = softmax(np.atleast_2d(logits))
    k = max(1, min(top_k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [
            {"label": labels[int(c)], "class_id": int(c), "score": float(row[int(c)])}
            for c in order_row
        ]
        for row, order_row in zip(scores, order, strict=True)
    ]


# --- a published version, loaded --------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed-up version and its engine: the unit a server swaps atomically.

    ``serving`` is how this server serves it: the manifest's serving block with the server's
    overrides (if any) applied."""

    version: ModelVersion
    engine: Engine
    serving: ServingConfig
    precision: Precision = "fp32"

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


def model_file(version: ModelVersion, kind: EngineKind, precision: Precision) -> Path:
    """The file of ``version`` that an engine of ``kind`` runs at ``precision``."""
    if precision == "fp32":
        return version.torchscript_path if kind == "torchscript" else version.onnx_path
    if kind != "onnx":
        raise EngineError(f"int8 is an ONNX model: the {kind} engine cannot run it (use onnx)")
    if version.onnx_int8_path is None:
        raise RepositoryError(
            f"{version.manifest.model} v{version.version} has no int8 model "
            "(publish it with `python -m training publish --int8`)"
        )
    return version.onnx_int8_path


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
    serving_overrides: Mapping[str, Any] | None = None,
    warmup_runs: int = 2,
    precision: Precision = "fp32",
) -> LoadedModel:
    """Verify (every artifact's sha256, once), build and warm up a version of the repository;
    None is the newest. ``serving_overrides`` replace fields of the version's serving config
    (a server's own settings); warm-up covers the batch sizes up to its ``max_batch_size``.
    ``precision`` ``int8`` runs the version's int8 model, which only the ONNX engine runs.
    Raises RepositoryError or EngineError on any failure."""
    from services.common.repository import load_version
    from services.common.serving import ServingConfigError, with_overrides

    start = time.perf_counter()
    verified = load_version(repo, model, version)
    path = model_file(verified, kind, precision)
    engine = create_engine(
        kind,
        path,
        device,
        fp16=fp16,
        channels_last=channels_last,
        threads=threads,
        optimize=optimize,
    )
    try:
        serving = with_overrides(verified.manifest.serving, serving_overrides or {})
    except ServingConfigError as exc:
        raise EngineError(f"v{verified.version}: {exc}") from None
    loaded = LoadedModel(version=verified, engine=engine, serving=serving, precision=precision)
    sizes = warmup_sizes(serving.max_batch_size)
    warm_up(engine, loaded.spec.shape, len(loaded.labels), sizes, warmup_runs, f"v{loaded.number}")
    logger.info(
        "loaded %s v%d (%s %s on %s) in %.2fs",
        model,
        loaded.number,
        kind,
        precision,
        device,
        time.perf_counter() - start,
    )
    return loaded
