"""The KServe Open Inference Protocol v2 over HTTP, as far as one image classifier needs it.

Enough for Triton's own client (``tritonclient.http``) to work against the predictor: health,
server and model metadata, model readiness, and ``infer`` with JSON tensors or with the binary
tensor extension (``Inference-Header-Content-Length``: a JSON header followed by raw
little-endian tensor bytes), which ``tritonclient`` uses by default. The input is the model's
own tensor, FP32 ``[N, 3, 32, 32]`` already normalised; the output is its logits. Errors are
``{"error": ..., "code": ...}``; clients of the protocol read ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import BadRequest, NotFound, PayloadTooLarge, describe_validation
from services.common.imaging import InputSpec
from services.common.runtime import FloatArray, LoadedModel
from services.predictor import SERVER_NAME, SERVER_VERSION
from services.predictor.state import PredictorState, StateDep

HEADER_LENGTH = "Inference-Header-Content-Length"
FP32 = "FP32"


class TensorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(min_length=1, max_length=8)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{model}/infer`` body (or its JSON header with the binary extension)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class ParsedInfer:
    """A checked request: the batch tensor and how each output should be returned."""

    id: str | None
    tensor: FloatArray
    outputs: list[tuple[str, bool]]  # (name, binary)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema with ``$ref``s resolved, for ``openapi_extra`` (which has no components)."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return resolve(defs[ref.rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    result: dict[str, Any] = resolve(schema)
    return result


def _flag(parameters: dict[str, Any] | None, key: str, default: bool) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key} must be true or false", "invalid_parameter")
    return value


def parse_infer(
    body: bytes,
    header_length: str | None,
    spec: InputSpec,
    output_name: str,
    max_images: int,
) -> ParsedInfer:
    """Body -> checked batch. Runs in the decode pool: big JSON tensors take milliseconds."""
    binary = b""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} is not an integer", "invalid_header") from None
        if not 0 < split <= len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes",
                "invalid_header",
            )
        body, binary = body[:split], body[split:]
    try:
        request = InferRequest.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", "invalid_json") from None
    except ValidationError as exc:
        message = "invalid inference request: " + describe_validation(exc.errors())
        raise BadRequest(message, "invalid_request") from None

    if len(request.inputs) != 1:
        raise BadRequest(f"expected one input named {spec.name!r}", "invalid_input")
    tensor_in = request.inputs[0]
    if tensor_in.name != spec.name:
        raise BadRequest(
            f"unknown input {tensor_in.name!r}; the model's input is {spec.name!r}",
            "unknown_input",
        )
    if tensor_in.datatype != FP32:
        raise BadRequest(f"input datatype must be {FP32}, not {tensor_in.datatype}", "datatype")
    expected = [-1, *spec.shape]
    shape = tensor_in.shape
    if len(shape) != len(expected) or list(shape[1:]) != expected[1:] or shape[0] < 1:
        raise BadRequest(f"input shape must be {expected}, got {shape}", "invalid_shape")
    if shape[0] > max_images:
        raise PayloadTooLarge(
            f"batch of {shape[0]} is over the limit of {max_images} per request",
            "too_many_images",
        )
    count = int(np.prod(shape))

    size = (tensor_in.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count * 4:
            raise BadRequest(
                f"binary_data_size must be {count * 4} for FP32 {shape}", "invalid_binary_size"
            )
        if len(binary) != size:
            raise BadRequest(
                f"body carries {len(binary)} tensor bytes, binary_data_size says {size}",
                "invalid_binary_size",
            )
        flat = np.frombuffer(binary, dtype="<f4")
    else:
        if tensor_in.data is None:
            raise BadRequest("input has neither data nor binary_data_size", "missing_data")
        try:
            flat = np.asarray(tensor_in.data, dtype=np.float32).ravel()
        except (ValueError, TypeError):
            raise BadRequest(
                "input data must be a (nested) list of numbers", "invalid_data"
            ) from None
        if flat.size != count:
            raise BadRequest(
                f"input data holds {flat.size} values, shape {shape} needs {count}",
                "invalid_data",
            )
    if not np.isfinite(flat).all():
        raise BadRequest("input data holds NaN or infinity", "invalid_data")
    tensor = flat.reshape(shape).astype(np.float32, copy=False)

    binary_default = _flag(request.parameters, "binary_data_output", False)
    outputs: list[tuple[str, bool]] = []
    for requested in request.outputs or []:
        if requested.name != output_name:
            raise BadRequest(
                f"unknown output {requested.name!r}; the model's output is {output_name!r}",
                "unknown_output",
            )
        outputs.append((requested.name, _flag(requested.parameters, "binary_data", binary_default)))
    if not outputs:
        outputs.append((output_name, binary_default))
    return ParsedInfer(id=request.id, tensor=tensor, outputs=outputs)


def encode_infer(model: LoadedModel, parsed: ParsedInfer, logits: FloatArray) -> Response:
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.number)}
    if parsed.id is not None:
        header["id"] = parsed.id
    logits = np.ascontiguousarray(logits, dtype="<f4")
    blobs: list[bytes] = []
    outputs: list[dict[str, Any]] = []
    for name, binary in parsed.outputs:
        output: dict[str, Any] = {"name": name, "datatype": FP32, "shape": list(logits.shape)}
        if binary:
            blob = logits.tobytes()
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = logits.ravel()
        outputs.append(output)
    header["outputs"] = outputs
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def resolve_model(state: PredictorState, name: str, version: str | None) -> LoadedModel:
    """The served model if ``name``/``version`` designate it, else 404 (503 before ready)."""
    if name != state.settings.model:
        raise NotFound(f"unknown model {name!r}; this server has {state.settings.model!r}")
    model = state.model()
    if version is not None and version != str(model.number):
        raise NotFound(
            f"{name} version {version} is not loaded; version {model.number} is",
            "version_not_loaded",
        )
    return model


def model_metadata(model: LoadedModel) -> ModelMetadata:
    spec = model.spec
    return ModelMetadata(
        name=model.name,
        versions=[str(model.number)],
        platform=model.engine.platform,
        inputs=[TensorMetadata(name=spec.name, datatype=FP32, shape=[-1, *spec.shape])],
        outputs=[
            TensorMetadata(name=model.output_name, datatype=FP32, shape=[-1, len(model.labels)])
        ],
    )


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


@router.get("")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(
        name=SERVER_NAME, version=SERVER_VERSION, extensions=["binary_tensor_data"]
    )


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(state: StateDep) -> dict[str, bool]:
    state.model()  # 503 unless a model is loaded and warm
    return {"ready": True}


@router.get("/models/{model_name}")
async def model_meta(state: StateDep, model_name: str) -> ModelMetadata:
    return model_metadata(resolve_model(state, model_name, None))


@router.get("/models/{model_name}/versions/{model_version}")
async def model_version_meta(state: StateDep, model_name: str, model_version: str) -> ModelMetadata:
    return model_metadata(resolve_model(state, model_name, model_version))


@router.get("/models/{model_name}/ready")
async def model_ready(state: StateDep, model_name: str) -> dict[str, Any]:
    model = resolve_model(state, model_name, None)
    return {"name": model.name, "version": str(model.number), "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready")
async def model_version_ready(
    state: StateDep, model_name: str, model_version: str
) -> dict[str, Any]:
    model = resolve_model(state, model_name, model_version)
    return {"name": model.name, "version": str(model.number), "ready": True}


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor extension: JSON header of {HEADER_LENGTH} bytes, "
                "then the raw tensor bytes",
            },
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"model": InferResponse}}


async def _infer(
    state: PredictorState, request: Request, name: str, version: str | None
) -> Response:
    model = resolve_model(state, name, version)
    async with state.deadline():
        body = await request.body()
        parsed = await state.in_decode_pool(
            parse_infer,
            body,
            request.headers.get(HEADER_LENGTH),
            model.spec,
            model.output_name,
            model.serving.max_images_per_request,
        )
        tensors = list(parsed.tensor)
        logits = await state.classify(model, tensors, prebatched=len(tensors) > 1)
    state.metrics.images.labels("v2_infer").inc(len(logits))
    return encode_infer(model, parsed, logits)


@router.post("/models/{model_name}/infer", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES)
async def infer(state: StateDep, request: Request, model_name: str) -> Response:
    """Run the model on an FP32 ``[N, 3, 32, 32]`` tensor; returns its logits ``[N, classes]``."""
    return await _infer(state, request, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
async def infer_version(
    state: StateDep, request: Request, model_name: str, model_version: str
) -> Response:
    """As ``infer``, for the version given (it must be the one loaded)."""
    return await _infer(state, request, model_name, model_version)
