"""Triton python-backend twin of a native model: runs a published version's own file.

The local ``tritonserver`` (from the ``nvidia-pytriton`` wheel) has only the python backend,
so the launcher serves ``<model>`` and ``<model>_torchscript`` through this one generic model,
copied as ``<model>/<version>/model.py`` beside links to that version's ``model.onnx`` or
``model.pt`` and its ``manifest.json``, and beside a copy of the shared model runtime
(``services/common/runtime.py`` and what it imports, see
:data:`services.common.runtime.PORTABLE_MODULES`). The twin is a thin adapter: the runtime
checks the file's sha256 against the manifest, builds the engine (ONNX Runtime on its CPU
provider, or TorchScript, by the config's ``runtime`` parameter) and warms it up, the same
code the predictor and the TorchServe handler run. Input and output names come from the
config, which carries the native model's names.

Triton's dynamic batcher hands ``execute`` several requests at once; they are concatenated
into one batch, run once, and split back, so batching here is real batching.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:
    from services.common.runtime import EngineKind

#: The config's ``runtime`` parameter -> (the runtime's engine kind, the manifest's artifact).
_RUNTIMES: dict[str, tuple[EngineKind, str]] = {
    "onnxruntime": ("onnx", "onnx"),
    "onnxruntime_int8": ("onnx", "onnx_int8"),
    "torchscript": ("torchscript", "torchscript"),
}
WARMUP_RUNS = 2


class TritonPythonModel:
    """Runs one published version of the classifier for a batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sys.path.insert(0, str(version_dir))  # the carried runtime, see require_carried
        from services.common import runtime

        runtime.require_carried(version_dir)
        config = json.loads(args["model_config"])
        name = config["parameters"]["runtime"]["string_value"]
        if name not in _RUNTIMES:
            raise ValueError(f"unknown runtime {name!r} (expected one of {sorted(_RUNTIMES)})")
        kind, artifact_key = _RUNTIMES[name]
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        manifest = json.loads((version_dir / "manifest.json").read_text())
        artifact = manifest["artifacts"][artifact_key]
        path = version_dir / Path(artifact["path"]).name
        what = f"{args['model_name']} v{args['model_version']}"
        runtime.verify_file(path, artifact["sha256"], artifact["path"])
        if kind == "torchscript":
            runtime.set_torch_threads(1)  # one thread like ORT's; scale with instance_group
        self.engine = runtime.create_engine(kind, path, "cpu", threads=1)
        shape = manifest["input"]["shape"]
        sizes = runtime.warmup_sizes(int(config.get("max_batch_size") or 1))
        runtime.warm_up(self.engine, shape, len(manifest["labels"]), sizes, WARMUP_RUNS, what)
        pb_utils.Logger.log_info(
            f"{what}: {name} twin of {path.name} (sha256 {artifact['sha256'][:12]}..., "
            f"runtime from {runtime.__file__})"
        )
        # Exempt what initialize loaded from every later garbage collection (the stub runs
        # apart from the services package; why: services/common/heap.py).
        gc.collect()
        gc.freeze()

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [
            pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            for request in requests
        ]
        try:
            batch = np.concatenate(arrays).astype(np.float32, copy=False)
            outputs = self.engine.infer(batch).astype(self.output_dtype, copy=False)
        except Exception as exc:  # answer every request; never fail the stub
            pb_utils.Logger.log_error(f"inference failed: {exc!r}")
            error = pb_utils.TritonError(f"[internal_error] inference failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for array in arrays:
            stop = start + len(array)
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(outputs[start:stop]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start = stop
        return responses
