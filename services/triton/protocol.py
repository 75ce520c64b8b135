"""What a Triton client of this project needs to know: model and tensor names, error format.

The gateway's Triton backend and the load tests import these instead of repeating them. A
request goes to ``<model>_ensemble`` with one BYTES tensor ``IMAGE`` of shape ``[n, 1]`` (one
encoded image per row) and reads FP32 ``LOGITS`` ``[n, classes]``; asking for ``LOGITS`` with
``class_count=k`` returns Triton's classification strings ``"score:index:label"`` instead.

An image the model cannot use is answered HTTP 400 / gRPC INVALID_ARGUMENT with a message such
as ``in ensemble 'classifier_ensemble', [not_an_image] data is not a recognised image format``:
the bracketed tag is the machine code of :class:`services.common.imaging.ImageDecodeError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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

_TAGGED = re.compile(r"\[(?P<code>[a-z][a-z0-9_]*)\]\s*(?P<message>.*)", re.DOTALL)
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def binary_infer_request(
    images: Sequence[bytes], classification: int, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request for ``images`` in the binary tensor extension.

    The JSON header comes first (its length in ``Inference-Header-Content-Length``), then the
    ``IMAGE`` tensor: each image as a 4-byte little-endian length and its bytes. ``LOGITS``
    comes back as JSON, the ``classification`` best classes of each image as Triton's
    ``"score:index:label"`` strings.
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
    request["outputs"] = [
        {
            "name": LOGITS_OUTPUT,
            "parameters": {"classification": classification, "binary_data": False},
        }
    ]
    header = orjson.dumps(request)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + payload, headers


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
