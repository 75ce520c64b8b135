"""Triton python-backend model ``preprocess``: encoded image bytes -> normalised FP32 CHW.

Copied as ``preprocess/<version>/model.py`` by :mod:`services.triton.model_configs`, beside a
copy of the shared decoding code (``services/common/imaging.py`` and what it imports, see
:data:`services.common.runtime.PORTABLE_MODULES`) and ``input_spec.json`` (that version's size
and normalisation, from its manifest). Only NumPy and Pillow are needed, so it runs in the
official Triton image as well as in the local launcher.

A request whose bytes are not a usable image gets its own error response with code
``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT) and a message tagged with the decoder's
machine code, ``[not_an_image] data is not a recognised image format``
(:func:`services.triton.protocol.parse_error` reads it back); the requests batched with it
are unaffected. Raising from ``execute`` instead would fail the whole batch.
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
    from services.common.imaging import InputSpec


class TritonPythonModel:
    """Decode and normalise every image of every request, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sys.path.insert(0, str(version_dir))  # the carried decoder, see require_carried
        from services.common import imaging, runtime

        runtime.require_carried(version_dir)
        self.imaging = imaging
        spec_data = json.loads((version_dir / "input_spec.json").read_text())
        self.spec: InputSpec = self.imaging.InputSpec.from_dict(spec_data)
        config = json.loads(args["model_config"])
        # Tensor names and the output type come from the generated config, written once.
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        max_pixels = config.get("parameters", {}).get("max_pixels", {}).get("string_value")
        self.max_pixels = int(max_pixels) if max_pixels else self.imaging.DEFAULT_MAX_PIXELS
        pb_utils.Logger.log_info(
            f"preprocess v{args['model_version']}: {self.spec.shape} "
            f"mean={self.spec.mean} std={self.spec.std} max_pixels={self.max_pixels}"
        )
        # Exempt what initialize loaded from every later garbage collection (the stub runs
        # apart from the services package; why: services/common/heap.py).
        gc.collect()
        gc.freeze()

    def _preprocess(self, request: Any) -> Any:
        images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        arrays = []
        for index, item in enumerate(images.reshape(-1)):
            data = item if isinstance(item, bytes) else bytes(item)
            try:
                arrays.append(
                    self.imaging.decode_and_preprocess(data, self.spec, max_pixels=self.max_pixels)
                )
            except self.imaging.ImageDecodeError as exc:
                where = f" (image {index})" if images.size > 1 else ""
                return pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=pb_utils.TritonError(
                        f"[{exc.code}] {exc.message}{where}", pb_utils.TritonError.INVALID_ARG
                    ),
                )
        batch = np.stack(arrays).astype(self.output_dtype, copy=False)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, batch)])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._preprocess(request))
            except Exception as exc:  # one request's fault must not fail the batch
                pb_utils.Logger.log_error(f"preprocess failed: {exc!r}")
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(f"[internal_error] preprocessing failed: {exc}"),
                    )
                )
        return responses
