"""What an Open Inference Protocol client of this project needs to know: model and tensor names,
the binary request and answer, the error format.

The gateway's v2 client (for Triton and the predictor, which answers to the same names) and the
load tests import these instead of repeating them. A request goes to ``<model>_ensemble`` with
one BYTES tensor ``IMAGE`` of shape ``[n, 1]`` (one encoded image per row) and reads FP32
``LOGITS`` ``[n, classes]``; asking for ``LOGITS`` with ``class_count=k`` returns Triton's
classification strings ``"score:index:label"`` instead.

An image the model cannot use is answered HTTP 400 / gRPC INVALID_ARGUMENT with a message such
as ``in ensemble 'classifier_ensemble', [not_an_image] data is not a recognised image format``:
the bracketed tag is the machine code of :class:`services.common.imaging.ImageDecodeError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import orjson

ENSEMBLE_SUFFIX = "_ensemble"
PREPROCESS_MODEL = "preprocess"
#: The ensemble's (and preprocess's) input: encoded image bytes, dims [1] per batch row.
IMAGE_INPUT = "IMAGE"
#: preprocess's output, the classifier's input inside the ensemble.
PREPROCESSED_OUTPUT = "INPUT"
#: The ensemble's output: the classifier's logits, with labels attached.
LOGITS_OUTPUT = "LOGITS"
#: A parameter of the local launcher's ``<model>`` config (``GET /v2/models/<model>/config``):
#: JSON, the published versions it refused to serve, ``[{"version", "reason"}]`` newest first.
REFUSED_VERSIONS_PARAMETER = "refused_versions"

#: The binary tensor extension's header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"

_TAGGED = re.compile(r"\[(?P<code>[a-z][a-z0-9_]*)\]\s*(?P<message>.*)", re.DOTALL)
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def binary_infer_request(
    images: Sequence[bytes], classification: int = 0, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request for ``images`` in the binary tensor extension.

    The JSON header comes first (its length in ``Inference-Header-Content-Length``), then the
    ``IMAGE`` tensor: each image as a 4-byte little-endian length and its bytes. ``LOGITS``
    comes back as raw FP32 bytes after the answer's JSON header (:func:`read_logits`), or, with
    ``classification`` > 0, as JSON: the ``classification`` best classes of each image as
    Triton's ``"score:index:label"`` strings.
    """
    payload = b"".join(len(image).to_bytes(4, "little") + image for image in images)
    request: dict[str, object] = {} if request_id is None else {"id": request_id}
    request["inputs"] = [
        {
            "name": IMAGE_INPUT,
            "shape": [len(images), 1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(payload)},
        }
    ]
    parameters: dict[str, object] = (
        {"classification": classification, "binary_data": False}
        if classification
        else {"binary_data": True}
    )
    request["outputs"] = [{"name": LOGITS_OUTPUT, "parameters": parameters}]
    header = orjson.dumps(request)
    headers = {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
    return header + payload, headers


def read_logits(
    body: bytes, header_length: str | None, rows: int
) -> tuple[str, npt.NDArray[np.float32]]:
    """``(model_version, logits [rows, classes])`` of an answer to :func:`binary_infer_request`
    without classification; ValueError (or KeyError, TypeError) when it is not one."""
    if header_length is None:
        raise ValueError(f"the answer has no {HEADER_LENGTH} header: LOGITS is not binary")
    split = int(header_length)
    header = orjson.loads(body[:split])
    output = next(o for o in header["outputs"] if o["name"] == LOGITS_OUTPUT)
    shape = [int(d) for d in output["shape"]]
    size = int(output["parameters"]["binary_data_size"])
    if output["datatype"] != "FP32" or len(shape) != 2 or shape[0] != rows:
        raise ValueError(f"LOGITS is {output['datatype']} {shape}, expected FP32 [{rows}, C]")
    start = split + sum(
        int(o["parameters"]["binary_data_size"])
        for o in header["outputs"][: header["outputs"].index(output)]
    )
    raw = body[start : start + size]
    if size != rows * shape[1] * 4 or len(raw) != size:
        raise ValueError(f"LOGITS carries {len(raw)} bytes for FP32 {shape}")
    logits = np.frombuffer(raw, dtype="<f4").reshape(shape)
    return str(header.get("model_version", "")), logits


def read_labels(body: bytes, classes: int) -> list[str]:
    """The label of every class, from an answer asking for all ``classes`` of one image with
    :func:`binary_infer_request`'s ``classification`` (the only way Triton tells them)."""
    output = next(o for o in orjson.loads(body)["outputs"] if o["name"] == LOGITS_OUTPUT)
    labels = [""] * classes
    for entry in output["data"]:
        _, index, label = str(entry).split(":", 2)
        labels[int(index)] = label
    if "" in labels:
        raise ValueError(f"the classification named {classes - labels.count('')} of {classes}")
    return labels


def ensemble_name(model: str) -> str:
    return model + ENSEMBLE_SUFFIX


def parse_error(text: str) -> tuple[str, str] | None:
    """``(code, message)`` of an error our python models returned, or None for Triton's own.

    >>> parse_error("in ensemble 'classifier_ensemble', [empty_image] image is empty")
    ('empty_image', 'image is empty')
    >>> parse_error("[request id: <id_unknown>] unexpected shape for input 'IMAGE'") is None
    True
    """
    match = _TAGGED.search(_ENSEMBLE_PREFIX.sub("", text.strip(), count=1))
    if match is None:
        return None
    return match["code"], match["message"].strip()
