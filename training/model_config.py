"""Triton ``config.pbtxt`` text for the native models, generated from one :class:`ModelSpec`.

The ONNX model keeps the exporter's tensor names (``input``/``logits``); libtorch models have no
tensor names, so Triton's PyTorch backend uses the ``INPUT__0``/``OUTPUT__0`` convention.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.repository import TORCHSCRIPT_SUFFIX

LABELS_FILENAME = "labels.txt"


@dataclass(frozen=True)
class ModelSpec:
    """What every config of one published model shares."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    instance_count: int = 1


def _dims(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _config(spec: ModelSpec, name: str, platform: str, input_name: str, output_name: str) -> str:
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {spec.max_batch_size}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: {_dims(spec.input_shape)}
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: {_dims((spec.num_classes,))}
    label_filename: "{LABELS_FILENAME}"
  }}
]
dynamic_batching {{
  preferred_batch_size: {_dims(spec.preferred_batch_sizes)}
  max_queue_delay_microseconds: {spec.max_queue_delay_us}
}}
instance_group [ {{ kind: KIND_AUTO, count: {spec.instance_count} }} ]
"""


def onnx_config(spec: ModelSpec, input_name: str, output_name: str) -> str:
    return _config(spec, spec.name, "onnxruntime_onnx", input_name, output_name)


def torchscript_config(spec: ModelSpec) -> str:
    return _config(
        spec, spec.name + TORCHSCRIPT_SUFFIX, "pytorch_libtorch", "INPUT__0", "OUTPUT__0"
    )
