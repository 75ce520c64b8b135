"""TorchServe handler: encoded image in, the predictor's JSON answer out, one batch at a time.

A thin adapter between TorchServe and the shared code: the model runs on
:mod:`services.common.runtime` (sha256 check, TorchScript engine, warm-up, top-k) and images
are decoded by :mod:`services.common.imaging`, exactly as in the predictor and Triton. Packed
into ``<model>.mar`` by :mod:`services.torchserve.archive` together with ``model.pt``,
``manifest.json`` and a copy of ``services/common``; TorchServe extracts the archive into a
folder that it puts on the worker's ``PYTHONPATH`` (ahead of site-packages), so the imports
below find the archived copy. Batching (TorchServe's batch size and delay) and the pixel limit
come from the version's serving config in its manifest.

Request body (per request of a batch):

* raw encoded image bytes (``application/octet-stream``, ``image/*`` or no content type);
  ``top_k`` from the ``X-Top-K`` header (default 5);
* or JSON ``{"image": "<base64>", "top_k": k}`` (``application/json``).

A request that is the caller's mistake (a :class:`~services.common.errors.ServiceError`, whose
class decides the status) gets its own 4xx and a JSON body ``{"error", "code"}`` through
``context.set_response_status(code, message, idx=i)``; the other
requests of the batch are answered normally (an unexpected exception while decoding one
request gets that request a 500, logged). Only a fault of the model itself (an exception
from the forward pass) fails the whole batch, which TorchServe answers with 503.

Every batch is counted in the ``HandlerBatches`` metric (label ``BatchSize``; declared in
services/torchserve/metrics.yaml, exported on TorchServe's /metrics) and logged as
``batch_size=N`` in TorchServe's log (``ts_log.log``), so batching can be checked rather
than assumed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from services.common import imaging, runtime
from services.common.errors import BadRequest, ServiceError, Unprocessable, UnsupportedMediaType
from services.common.heap import freeze_startup_heap
from services.common.imaging import decode_and_preprocess, decode_base64
from services.common.repository import MANIFEST_NAME, TORCHSCRIPT_NAME, Manifest
from services.common.schemas import DEFAULT_TOP_K, MAX_TOP_K
from services.common.serving import ServingConfig

logger = logging.getLogger(__name__)

BACKEND = "torchserve"
TOP_K_HEADER = "x-top-k"
#: Custom model metric (declared in the metrics config the launcher writes), one count per
#: batch, labelled with the batch size: proves from /metrics that requests were batched.
BATCH_METRIC = "HandlerBatches"
#: Also logged per batch (TorchServe's log), for a second, metric-independent witness.
BATCH_LOG_PREFIX = "batch_size="

_JSON_TYPES = ("application/json",)
_DIGITS = re.compile(r"\+?[0-9]{1,6}", re.ASCII)
#: TorchScript runs on the worker's one CPU thread pool; warm-up runs per batch size.
WARMUP_RUNS = 2


def reason_phrase(message: str) -> str:
    """The message as an HTTP reason phrase: one line of printable ASCII (the body has it all)."""
    phrase = "".join(ch if " " <= ch <= "~" else " " for ch in message)
    return " ".join(phrase.split())[:200]


def _parse_top_k(value: object, source: str) -> int:
    # bool is an int in Python; `true` is not a number of classes.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            value = int(value.strip())
        else:
            raise Unprocessable(f"{source} must be an integer", "invalid_top_k")
    if not 1 <= value <= MAX_TOP_K:
        raise Unprocessable(f"{source} must be between 1 and {MAX_TOP_K}", "invalid_top_k")
    return value


def _header(headers: dict[str, Any], name: str) -> str | None:
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def parse_request(row: dict[str, Any], headers: dict[str, Any]) -> tuple[bytes, int]:
    """One TorchServe request (``{"body": ...}`` or form fields) -> image bytes and top_k.

    TorchServe's worker has already json-decoded ``application/json`` bodies (falling back to
    the raw bytes when that fails) and utf-8-decoded ``text/*`` bodies.
    """
    if "body" in row:
        name = "body"
    elif "data" in row:
        name = "data"
    elif len(row) == 1:
        name = next(iter(row))
    else:
        raise Unprocessable("send one image per request", "invalid_request")
    value = row[name]
    part_headers = headers.get(name)
    part_type = part_headers.get("content-type", "") if isinstance(part_headers, dict) else ""
    content_type = (part_type or _header(headers, "content-type") or "").split(";")[0].strip()

    # TorchServe decodes JSON only for the exact type "application/json"; a body sent with a
    # charset or as a form post (`curl -d`) arrives as bytes. No image format starts with "{",
    # so such a body is JSON or nothing.
    if isinstance(value, (bytes, bytearray)) and (
        content_type.lower() in _JSON_TYPES or bytes(value[:64]).lstrip().startswith(b"{")
    ):
        try:
            value = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("request body is not valid JSON", "invalid_json") from None
    if isinstance(value, (bytes, bytearray)):
        header_top_k = _header(headers, TOP_K_HEADER)
        top_k = DEFAULT_TOP_K if header_top_k is None else _parse_top_k(header_top_k, "X-Top-K")
        return bytes(value), top_k
    if isinstance(value, str):
        raise UnsupportedMediaType(
            f"content type {content_type or 'text'!r} is not accepted: send the encoded image "
            'as application/octet-stream or JSON {"image": "<base64>"}'
        )
    if not isinstance(value, dict):
        raise Unprocessable("JSON body must be an object")
    unknown = sorted(set(value) - {"image", "top_k"})
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}")
    if "image" not in value:
        raise Unprocessable("field 'image' (base64 string) is required")
    top_k = _parse_top_k(value["top_k"], "top_k") if "top_k" in value else DEFAULT_TOP_K
    return decode_base64(value["image"]), top_k


class ImageClassifierHandler(BaseHandler):  # type: ignore[misc]  # ts ships no type hints
    """Batch-aware classifier: per-request decoding and errors, one forward pass per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.manifest_data: Manifest | None = None
        self.spec = imaging.InputSpec()
        self.labels: list[str] = []
        self.version = ""
        self.serving = ServingConfig()
        self.engine: runtime.Engine | None = None

    def initialize(self, context: Any) -> None:
        """Verify ``model.pt`` against the manifest, build the runtime's engine, warm up."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        on_gpu = torch.cuda.is_available() and gpu_id is not None
        device = f"cuda:{gpu_id}" if on_gpu else "cpu"

        manifest = Manifest.model_validate_json((model_dir / MANIFEST_NAME).read_text())
        model_path = model_dir / TORCHSCRIPT_NAME
        artifact = manifest.artifacts["torchscript"]
        what = f"{manifest.model} v{manifest.version}: torchscript"
        # The archive is built from verified files; re-checking here catches a tampered or
        # truncated .mar before the worker says READY.
        runtime.verify_file(model_path, artifact.sha256, artifact.path)
        self.manifest_data = manifest
        self.spec = manifest.input_spec
        self.labels = list(manifest.labels)
        self.version = str(manifest.version)
        self.serving = manifest.serving
        self.engine = runtime.create_engine("torchscript", model_path, device)
        sizes = runtime.warmup_sizes(self.serving.max_batch_size)
        runtime.warm_up(self.engine, self.spec.shape, len(self.labels), sizes, WARMUP_RUNS, what)
        freeze_startup_heap()
        self.initialized = True
        logger.info(
            "loaded %s v%s on %s (runtime from %s)",
            manifest.model,
            manifest.version,
            device,
            runtime.__file__,
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """Answer every request of the batch; bad ones get their own 4xx."""
        start = time.perf_counter()
        self.context = context
        responses: list[str] = [""] * len(data)
        arrays: list[npt.NDArray[np.float32]] = []
        good: list[tuple[int, int]] = []  # (index in batch, top_k)
        for idx, row in enumerate(data):
            try:
                headers = context.get_all_request_header(idx) or {}
                image, top_k = parse_request(row, headers)
                arrays.append(decode_and_preprocess(image, self.spec, self.serving.max_pixels))
                good.append((idx, top_k))
            except ServiceError as exc:
                self._fail(context, idx, responses, exc.status_code, exc.message, exc.code)
            except Exception:
                # A fault of ours (or of Pillow) on this one input: answer it with 500 and keep
                # the rest of the batch, instead of TorchServe's 503 for every request in it.
                logger.exception("unexpected error decoding request %d of the batch", idx)
                message = "internal error while decoding the image"
                self._fail(context, idx, responses, 500, message, "internal_error")

        if arrays:
            assert self.engine is not None, "initialize() runs before any batch"
            logits = self.engine.infer(np.stack(arrays))
            k_max = max(k for _, k in good)
            predictions = runtime.top_k_predictions(logits, self.labels, k_max)
            model_name = self.manifest_data.model if self.manifest_data else context.model_name
            for (idx, top_k), preds in zip(good, predictions, strict=True):
                context.set_response_content_type(idx, "application/json")
                responses[idx] = json.dumps(
                    {
                        "model": model_name,
                        "version": self.version,
                        "backend": BACKEND,
                        "predictions": preds[:top_k],
                    }
                )
        self._record_batch(context, len(data), len(arrays), time.perf_counter() - start)
        return responses

    @staticmethod
    def _fail(
        context: Any, idx: int, responses: list[str], status: int, message: str, code: str
    ) -> None:
        context.set_response_status(status, reason_phrase(message), idx=idx)
        context.set_response_content_type(idx, "application/json")
        responses[idx] = json.dumps({"error": message, "code": code})

    def _record_batch(self, context: Any, size: int, decoded: int, seconds: float) -> None:
        logger.info(
            "%s%d decoded=%d handler_ms=%.2f", BATCH_LOG_PREFIX, size, decoded, seconds * 1e3
        )
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        metrics.add_counter(
            BATCH_METRIC,
            1,
            None,
            [
                Dimension("ModelName", context.model_name),
                Dimension("Level", "Model"),
                Dimension("BatchSize", str(size)),
            ],
        )
