"""TorchServe handler: encoded image in, the predictor's JSON answer out, one batch at a time.

Packed into ``<model>.mar`` by :mod:`services.torchserve.archive` together with ``model.pt``,
``manifest.json`` and a copy of ``services/common``. TorchServe extracts the archive into a
folder that it puts on the worker's ``PYTHONPATH`` (ahead of site-packages), so
``import services.common.imaging`` below finds the archived copy: the worker decodes with the
exact bytes-to-tensor code that the predictor and Triton use.

Request body (per request of a batch):

* raw encoded image bytes (``application/octet-stream``, ``image/*`` or no content type);
  ``top_k`` from the ``X-Top-K`` header (default 5);
* or JSON ``{"image": "<base64>", "top_k": k}`` (``application/json``).

A request that is the caller's mistake gets its own 4xx status and a JSON body
``{"error", "code"}`` through ``context.set_response_status(code, message, idx=i)``; the other
requests of the batch are answered normally (an unexpected exception while decoding one
request gets that request a 500, logged). Only a fault of the model itself (an exception
from the forward pass) fails the whole batch, which TorchServe answers with 503.

Every batch is counted in the ``HandlerBatches`` metric (label ``BatchSize``; declared in
services/torchserve/metrics.yaml, exported on TorchServe's /metrics) and logged as
``batch_size=N`` in model_log.log, so batching can be checked rather than assumed.
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

from services.common import imaging
from services.common.heap import freeze_startup_heap
from services.common.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_and_preprocess,
    decode_base64,
    image_error_status,
    top_k_predictions,
)
from services.common.repository import MANIFEST_NAME, Manifest, sha256_file
from services.common.schemas import DEFAULT_TOP_K, MAX_TOP_K

logger = logging.getLogger(__name__)

BACKEND = "torchserve"
TOP_K_HEADER = "x-top-k"
#: Custom model metric (declared in the metrics config the launcher writes), one count per
#: batch, labelled with the batch size: proves from /metrics that requests were batched.
BATCH_METRIC = "HandlerBatches"
#: Also logged per batch (model_log.log), for a second, metric-independent witness.
BATCH_LOG_PREFIX = "batch_size="

_JSON_TYPES = ("application/json",)
_DIGITS = re.compile(r"\+?[0-9]{1,6}", re.ASCII)
_STATUS_FOR_CODE = {  # the handler's own request errors; the image's from imaging
    "unsupported_media_type": 415,
    "invalid_type": 422,
    "invalid_top_k": 422,
    "invalid_request": 422,
}


def request_error(message: str, code: str) -> ImageDecodeError:
    """The caller's mistake in one request; :func:`status_for` gives its HTTP status.

    TorchServe requires the handler module to define exactly one class (it instantiates the
    only class it finds), so errors reuse :class:`ImageDecodeError` instead of a new type.
    """
    return ImageDecodeError(message, code)


def status_for(code: str) -> int:
    return _STATUS_FOR_CODE.get(code) or image_error_status(code)


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
            raise request_error(f"{source} must be an integer", "invalid_top_k")
    if not 1 <= value <= MAX_TOP_K:
        raise request_error(f"{source} must be between 1 and {MAX_TOP_K}", "invalid_top_k")
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
        raise request_error("send one image per request", "invalid_request")
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
            raise request_error("request body is not valid JSON", "invalid_json") from None
    if isinstance(value, (bytes, bytearray)):
        header_top_k = _header(headers, TOP_K_HEADER)
        top_k = DEFAULT_TOP_K if header_top_k is None else _parse_top_k(header_top_k, "X-Top-K")
        return bytes(value), top_k
    if isinstance(value, str):
        raise request_error(
            f"content type {content_type or 'text'!r} is not accepted: send the encoded image "
            'as application/octet-stream or JSON {"image": "<base64>"}',
            "unsupported_media_type",
        )
    if not isinstance(value, dict):
        raise request_error("JSON body must be an object", "invalid_request")
    unknown = sorted(set(value) - {"image", "top_k"})
    if unknown:
        raise request_error(f"unknown field(s): {', '.join(unknown)}", "invalid_request")
    if "image" not in value:
        raise request_error("field 'image' (base64 string) is required", "invalid_request")
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
        self.max_pixels = DEFAULT_MAX_PIXELS

    def initialize(self, context: Any) -> None:
        """Load and verify ``model.pt`` against the manifest, pick the device, warm up."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")

        manifest = Manifest.model_validate_json((model_dir / MANIFEST_NAME).read_text())
        model_path = model_dir / "model.pt"
        expected = manifest.artifacts["torchscript"].sha256
        # The archive is built from verified files; re-checking here catches a tampered or
        # truncated .mar before the worker says READY.
        actual = sha256_file(model_path)
        if actual != expected:
            raise RuntimeError(
                f"model.pt sha256 {actual[:12]}... does not match the manifest's {expected[:12]}..."
            )
        self.manifest_data = manifest
        self.spec = manifest.input_spec
        self.labels = list(manifest.labels)
        self.version = str(manifest.version)
        self.model = torch.jit.load(  # type: ignore[no-untyped-call]
            str(model_path), map_location=self.device
        )
        self.model.eval()
        self._warm_up()
        freeze_startup_heap()
        self.initialized = True
        logger.info(
            "loaded %s v%s on %s (imaging from %s)",
            manifest.model,
            manifest.version,
            self.device,
            imaging.__file__,
        )

    def _warm_up(self) -> None:
        # First calls of a TorchScript module run the profiling executor; do them before READY.
        dummy = torch.zeros((2, *self.spec.shape), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for _ in range(2):
                logits = self.model(dummy)
        if tuple(logits.shape) != (2, len(self.labels)):
            raise RuntimeError(
                f"model output shape {tuple(logits.shape)} does not match {len(self.labels)} labels"
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
                arrays.append(decode_and_preprocess(image, self.spec, self.max_pixels))
                good.append((idx, top_k))
            except ImageDecodeError as exc:
                self._fail(context, idx, responses, status_for(exc.code), exc.message, exc.code)
            except Exception:
                # A fault of ours (or of Pillow) on this one input: answer it with 500 and keep
                # the rest of the batch, instead of TorchServe's 503 for every request in it.
                logger.exception("unexpected error decoding request %d of the batch", idx)
                message = "internal error while decoding the image"
                self._fail(context, idx, responses, 500, message, "internal_error")

        if arrays:
            batch = torch.from_numpy(np.stack(arrays)).to(self.device)
            with torch.inference_mode():
                logits = self.model(batch).float().cpu().numpy()
            k_max = max(k for _, k in good)
            predictions = top_k_predictions(logits, self.labels, k_max)
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
