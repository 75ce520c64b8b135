"""Triton python-backend twin of a native model: runs a published version's own file.

The local ``tritonserver`` (from the ``nvidia-pytriton`` wheel) has only the python backend,
so the launcher serves ``<model>`` and ``<model>_torchscript`` through this one generic model,
copied as ``<model>/<version>/model.py`` beside links to that version's ``model.onnx`` or
``model.pt`` and its ``manifest.json``. The config's ``runtime`` parameter picks ONNX Runtime
(CPU provider) or TorchScript; the input and output names come from the config, which carries
the native model's names. The artifact's sha256 is checked against the manifest before loading.

Triton's dynamic batcher hands ``execute`` several requests at once; they are concatenated
into one batch, run once, and split back, so batching here is real batching.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

_ARTIFACTS = {"onnxruntime": "onnx", "torchscript": "torchscript"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class TritonPythonModel:
    """Runs one published version of the classifier for a batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.runtime = config["parameters"]["runtime"]["string_value"]
        if self.runtime not in _ARTIFACTS:
            raise ValueError(f"unknown runtime {self.runtime!r} (expected one of {_ARTIFACTS})")
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((version_dir / "manifest.json").read_text())
        artifact = manifest["artifacts"][_ARTIFACTS[self.runtime]]
        path = version_dir / Path(artifact["path"]).name
        actual = _sha256(path)
        if actual != artifact["sha256"]:
            raise RuntimeError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{artifact['sha256'][:12]}..."
            )
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            # One intra-op thread, like the predictor: ORT's default pool pins a thread to every
            # core, which escapes `taskset` and steals the load generator's core in benchmarks.
            # Scale with TRITON_INSTANCE_COUNT instead.
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
            self.session_input = self.session.get_inputs()[0].name
        else:
            import torch

            torch.set_num_threads(1)  # as for ONNX Runtime above
            self.module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location="cpu"
            ).eval()
        pb_utils.Logger.log_info(
            f"{args['model_name']} v{args['model_version']}: {self.runtime} twin of {path.name} "
            f"(sha256 {actual[:12]}...)"
        )
        # Exempt what initialize loaded from every later garbage collection (the stub runs
        # apart from the services package; why: services/common/heap.py).
        gc.collect()
        gc.freeze()

    def _run(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self.runtime == "onnxruntime":
            outputs = self.session.run(None, {self.session_input: batch})
            return np.asarray(outputs[0])
        import torch

        with torch.inference_mode():
            result: npt.NDArray[Any] = self.module(torch.from_numpy(batch)).numpy()
        return result

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [
            pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            for request in requests
        ]
        try:
            outputs = self._run(np.concatenate(arrays)).astype(self.output_dtype, copy=False)
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
