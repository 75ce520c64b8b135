"""The KServe Open Inference Protocol v2, with Triton's extensions, over REST.

The predictor answers to the same model names, inputs and outputs as Triton's repository
(:mod:`services.triton.model_configs`), so one client body works against both engines:

* ``<model>`` (``classifier``): FP32 ``input`` ``[N, 3, 32, 32]``, already normalised, in;
  FP32 ``logits`` ``[N, classes]`` out;
* ``<model>_ensemble`` (``classifier_ensemble``): BYTES ``IMAGE`` ``[N, 1]``, one encoded
  image (PNG, JPEG, ...) per row, in; FP32 ``LOGITS`` ``[N, classes]`` out. The images are
  decoded by the shared imaging code inside the batcher, as ``/predict``'s are.

Both are the one loaded version behind the one batcher. This module holds what the two
transports share: the models' metadata and Triton-shaped config, the checking of an inference
request (:func:`prepare`), running it (:func:`run_infer`, inference statistics included) and
its outputs (the classification extension: ``class_count`` -> ``"score:index:label"`` BYTES);
then the REST routes: health, server and model metadata, model readiness and config,
repository index, statistics and ``infer`` with JSON tensors or the binary tensor extension
(``Inference-Header-Content-Length``: a JSON header followed by raw tensor bytes; BYTES
elements each a 4-byte little-endian length and the bytes). The gRPC service
(:mod:`services.predictor.grpc_api`) calls the same functions, so a caller's mistake gets the
same message over both. Errors are ``{"error": ..., "code": ...}``; the protocol's clients read
``error``.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    describe_validation,
)
from services.common.imaging import ImageDecodeError
from services.common.repository import INT8_SUFFIX
from services.common.runtime import FloatArray, LoadedModel
from services.common.schemas import ErrorResponse
from services.predictor import SERVER_NAME, SERVER_VERSION
from services.predictor.batcher import Decoder, RequestTiming, decode_image
from services.predictor.state import PredictorState, StateDep, get_state
from services.triton.model_configs import LABELS_FILE, triton_batching
from services.triton.protocol import IMAGE_INPUT, LOGITS_OUTPUT, ensemble_name

HEADER_LENGTH = "Inference-Header-Content-Length"
FP32: Literal["FP32"] = "FP32"
BYTES: Literal["BYTES"] = "BYTES"
#: The extensions this server implements (Triton's names), as ``GET /v2`` lists them.
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "parameters",
    "statistics",
)
#: Parameters of an output asking for the classification extension.
CLASSIFICATION = "classification"
_LENGTH = struct.Struct("<I")


# --- the models this server answers to -------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """One Open Inference Protocol model of this server, over the loaded version."""

    name: str
    input_name: str
    datatype: Literal["FP32", "BYTES"]
    dims: tuple[int, ...]
    output_name: str

    @property
    def decodes(self) -> bool:
        """Whether its input is encoded images (decoded in the batcher)."""
        return self.datatype == BYTES


def served_models(model: LoadedModel, name: str) -> dict[str, ServedModel]:
    """``name`` (the settings' model) and its ensemble, as Triton's repository names them;
    a predictor serving int8 (``PREDICTOR_PRECISION=int8``) also answers to the int8 pair's
    names (``<name>_int8``, ``<name>_int8_ensemble``), which is how the gateway asks for int8."""
    spec = model.spec
    names = [name, name + INT8_SUFFIX] if model.precision == "int8" else [name]
    served: dict[str, ServedModel] = {}
    for each in names:
        tensor = ServedModel(each, spec.name, FP32, spec.shape, model.output_name)
        images = ServedModel(ensemble_name(each), IMAGE_INPUT, BYTES, (1,), LOGITS_OUTPUT)
        served.update({tensor.name: tensor, images.name: images})
    return served


def resolve(
    state: PredictorState, name: str, version: str | None
) -> tuple[ServedModel, LoadedModel]:
    """The model ``name``/``version`` designate, else 404 (503 before the service is ready)."""
    model = state.model()
    served = served_models(model, state.settings.model).get(name)
    if served is None:
        known = ", ".join(repr(n) for n in served_models(model, state.settings.model))
        raise NotFound(f"unknown model {name!r}; this server has {known}")
    if version not in (None, "", str(model.number)):
        raise NotFound(
            f"{name} version {version} is not loaded; version {model.number} is",
            "version_not_loaded",
        )
    return served, model


def _triton_dtype(datatype: str) -> str:
    return "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}"


def model_metadata(served: ServedModel, model: LoadedModel) -> dict[str, Any]:
    return {
        "name": served.name,
        "versions": [str(model.number)],
        "platform": model.engine.platform,
        "inputs": [
            {"name": served.input_name, "datatype": served.datatype, "shape": [-1, *served.dims]}
        ],
        "outputs": [
            {"name": served.output_name, "datatype": FP32, "shape": [-1, len(model.labels)]}
        ],
    }


def model_config(served: ServedModel, model: LoadedModel) -> dict[str, Any]:
    """Triton's model configuration (``GET .../config``): what ``perf_analyzer`` and
    ``tritonclient`` read. ``max_batch_size`` and ``preferred_batch_size`` are what Triton's
    own configs get for the same serving config (one request may carry up to
    ``max_images_per_request`` images; merged batches stop at ``max_batch_size``)."""
    serving = model.serving
    max_batch_size, preferred = triton_batching(serving)
    kind = "KIND_GPU" if model.engine.device.startswith("cuda") else "KIND_CPU"
    return {
        "name": served.name,
        "platform": model.engine.platform,
        "backend": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch_size,
        "input": [
            {
                "name": served.input_name,
                "data_type": _triton_dtype(served.datatype),
                "format": "FORMAT_NONE" if served.decodes else "FORMAT_NCHW",
                "dims": list(served.dims),
            }
        ],
        "output": [
            {
                "name": served.output_name,
                "data_type": _triton_dtype(FP32),
                "dims": [len(model.labels)],
                "label_filename": LABELS_FILE,
            }
        ],
        "dynamic_batching": {
            "preferred_batch_size": list(preferred),
            "max_queue_delay_microseconds": serving.max_batch_delay_us,
        },
        "instance_group": [
            {"name": f"{served.name}_0", "kind": kind, "count": serving.instance_count}
        ],
        "parameters": {},
    }


def repository_index(state: PredictorState, ready_only: bool) -> list[dict[str, str]]:
    """Every model name at the loaded version (READY), and the versions the reloader refused
    (UNAVAILABLE, with why) unless only ready ones are asked for."""
    model = state.model()
    entries = []
    for name in served_models(model, state.settings.model):
        entries.append({"name": name, "version": str(model.number), "state": "READY"})
        if not ready_only:
            for version, reason in sorted(state.manager.refused.items()):
                entries.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": "UNAVAILABLE",
                        "reason": reason,
                    }
                )
    return entries


def statistics(state: PredictorState, name: str | None, version: str | None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for one model (or every one when ``name`` is None)."""
    model = state.model()
    if name is None:
        names = list(served_models(model, state.settings.model))
    else:
        names = [resolve(state, name, version)[0].name]
    return {"model_stats": state.statistics.select(names, str(model.number))}


# --- an inference request, whichever transport brought it -----------------------------------


@dataclass
class InputTensor:
    """One input as sent: JSON ``data`` (REST) or typed contents (gRPC) in ``data``, or the raw
    little-endian bytes (binary extension, gRPC ``raw_input_contents``) in ``raw``."""

    name: str
    datatype: str
    shape: list[int]
    data: Sequence[Any] | None = None
    raw: bytes | None = None


@dataclass
class OutputRequest:
    name: str
    binary: bool = False  # REST only: in the binary section instead of the JSON
    class_count: int = 0  # > 0: the classification extension


@dataclass
class InferCall:
    """A parsed ``infer`` request (REST body or gRPC ``ModelInferRequest``)."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] = field(default_factory=list)
    binary_default: bool = False  # REST ``binary_data_output``


@dataclass(frozen=True)
class Prepared:
    """A checked request: what the batcher takes, along the batch axis."""

    payloads: list[Any]
    decode: Decoder | None
    outputs: list[OutputRequest]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    binary: bool
    values: FloatArray | list[bytes]

    def raw(self) -> bytes:
        """Its bytes as the binary extension and gRPC's ``raw_output_contents`` carry them."""
        if isinstance(self.values, list):
            return serialize_bytes(self.values)
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()

    def json_data(self) -> Any:
        if isinstance(self.values, list):
            return [value.decode("utf-8", errors="replace") for value in self.values]
        return self.values.ravel()


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """BYTES elements as the protocol's binary form: each a 4-byte little-endian length, then
    the bytes."""
    return b"".join(_LENGTH.pack(len(value)) + value for value in values)


def deserialize_bytes(raw: bytes, count: int) -> list[bytes]:
    """The ``count`` elements of a binary BYTES tensor; a 400 when the bytes do not hold
    exactly that many."""
    values: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            break
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(
                f"BYTES element {len(values)} says {length} bytes, only {len(raw) - offset} "
                "are left",
                "invalid_binary_data",
            )
        values.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(raw) or len(values) != count:
        raise BadRequest(
            f"binary BYTES data holds {len(values)} length-prefixed elements"
            f"{' and stray bytes' if offset != len(raw) else ''}, the shape needs {count}",
            "invalid_binary_data",
        )
    return values


def _decode_image(payload: object, model: LoadedModel) -> FloatArray:
    """Runs in a decode thread (inside the batcher): encoded image bytes -> model input (a
    large image decoded apart from its batch, as ``/predict``'s are)."""
    return decode_image(cast(bytes, payload), model.spec, model.serving.max_pixels)


def _float_tensor(tensor: InputTensor, count: int) -> FloatArray:
    if tensor.raw is not None:
        if len(tensor.raw) != count * 4:
            raise BadRequest(
                f"input {tensor.name!r} carries {len(tensor.raw)} bytes, FP32 {tensor.shape} "
                f"needs {count * 4}",
                "invalid_binary_size",
            )
        flat = np.frombuffer(tensor.raw, dtype="<f4")
    else:
        if tensor.data is None:
            raise BadRequest(f"input {tensor.name!r} has no data", "missing_data")
        try:
            flat = np.asarray(tensor.data, dtype=np.float32).ravel()
        except (ValueError, TypeError):
            raise BadRequest(
                "input data must be a (nested) list of numbers", "invalid_data"
            ) from None
        if flat.size != count:
            raise BadRequest(
                f"input data holds {flat.size} values, shape {tensor.shape} needs {count}",
                "invalid_data",
            )
    if not np.isfinite(flat).all():
        raise BadRequest("input data holds NaN or infinity", "invalid_data")
    return flat.reshape(tensor.shape).astype(np.float32, copy=False)


def _bytes_elements(tensor: InputTensor, count: int) -> list[bytes]:
    if tensor.raw is not None:
        return deserialize_bytes(tensor.raw, count)
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has no data", "missing_data")
    values: list[bytes] = []
    for element in _flatten(tensor.data):
        if isinstance(element, str):
            values.append(element.encode("utf-8"))
        elif isinstance(element, bytes):
            values.append(element)
        else:
            raise BadRequest("BYTES input data must be strings", "invalid_data")
    if len(values) != count:
        raise BadRequest(
            f"input data holds {len(values)} values, shape {tensor.shape} needs {count}",
            "invalid_data",
        )
    return values


def _flatten(data: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for element in data:
        if isinstance(element, list | tuple):
            flat.extend(_flatten(element))
        else:
            flat.append(element)
    return flat


def prepare(served: ServedModel, model: LoadedModel, call: InferCall) -> Prepared:
    """Check a request against ``served`` (one input of its name, datatype and shape, at most
    the serving config's images per request, finite numbers, outputs it has) and turn it into
    the batcher's payloads: one tensor, or one encoded image with its decoder, per row."""
    names = [tensor.name for tensor in call.inputs]
    unknown = [name for name in names if name != served.input_name]
    if unknown:
        raise BadRequest(
            f"unknown input {unknown[0]!r}; {served.name}'s input is {served.input_name!r}",
            "unknown_input",
        )
    if len(call.inputs) != 1:
        raise BadRequest(
            f"expected one input named {served.input_name!r}, got {len(call.inputs)}",
            "invalid_input",
        )
    tensor = call.inputs[0]
    if tensor.datatype != served.datatype:
        raise BadRequest(
            f"input {tensor.name!r} datatype must be {served.datatype}, not {tensor.datatype}",
            "datatype",
        )
    expected = [-1, *served.dims]
    shape = tensor.shape
    if len(shape) != len(expected) or list(shape[1:]) != expected[1:] or shape[0] < 1:
        raise BadRequest(f"input shape must be {expected}, got {shape}", "invalid_shape")
    limit = model.serving.max_images_per_request
    if shape[0] > limit:
        raise PayloadTooLarge(
            f"batch of {shape[0]} is over the limit of {limit} per request", "too_many_images"
        )
    count = int(np.prod(shape))
    payloads: list[Any]
    decode: Decoder | None
    if served.decodes:
        payloads = _bytes_elements(tensor, count)
        decode = functools.partial(_decode_image, model=model)
    else:
        payloads = list(_float_tensor(tensor, count))
        decode = None
    classes = len(model.labels)
    outputs: list[OutputRequest] = []
    for requested in call.outputs:
        if requested.name != served.output_name:
            raise BadRequest(
                f"unknown output {requested.name!r}; {served.name}'s output is "
                f"{served.output_name!r}",
                "unknown_output",
            )
        if requested.class_count < 0:
            raise BadRequest("classification must be a positive count", "invalid_parameter")
        outputs.append(
            OutputRequest(requested.name, requested.binary, min(requested.class_count, classes))
        )
    if not outputs:
        outputs.append(OutputRequest(served.output_name, call.binary_default))
    return Prepared(payloads, decode, outputs)


def classification(logits: FloatArray, labels: Sequence[str], count: int) -> list[bytes]:
    """Triton's classification extension: per row the ``count`` best classes as
    ``"score:index:label"`` (the logit printed as C's ``%f``), best first."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return [
        f"{float(row[index]):f}:{int(index)}:{labels[int(index)]}".encode()
        for row, indices in zip(logits, order, strict=True)
        for index in indices
    ]


def build_outputs(
    model: LoadedModel, outputs: Sequence[OutputRequest], logits: FloatArray
) -> list[OutputTensor]:
    result = []
    for output in outputs:
        if output.class_count:
            strings = classification(logits, model.labels, output.class_count)
            shape = [len(logits), output.class_count]
            result.append(OutputTensor(output.name, BYTES, shape, output.binary, strings))
        else:
            shape = list(logits.shape)
            result.append(OutputTensor(output.name, FP32, shape, output.binary, logits))
    return result


async def run_infer(
    state: PredictorState,
    served: ServedModel,
    model: LoadedModel,
    parse: Callable[[], InferCall],
) -> InferResult:
    """Parse (in the decode pool: big JSON tensors take milliseconds) and check a request,
    run it through the batcher (a request's rows are its batch axis), build its outputs, and
    count it in the inference statistics, failed or not. An image that cannot be decoded is
    refused with its decoder's code in brackets, ``[not_an_image] ...``, as Triton's
    ``preprocess`` model does (:func:`services.triton.protocol.parse_error` reads it)."""
    start = time.perf_counter()
    version = str(model.number)
    try:
        call, prepared = await state.in_decode_pool(_parse_and_prepare, parse, served, model)
        timing = RequestTiming()
        async with state.deadline():
            logits = await state.classify(
                model,
                prepared.payloads,
                prepared.decode,
                what=served.input_name,
                batch_axis=True,
                timing=timing,
            )
        built = time.perf_counter()
        outputs = build_outputs(model, prepared.outputs, logits)
        done = time.perf_counter()
    except ImageDecodeError as exc:
        state.statistics.failure(served.name, version, time.perf_counter() - start)
        # Tagged as Triton's preprocess model tags it: a client reading only the message
        # (tritonclient, the KServe SDK, gRPC) still gets the machine code.
        raise ImageDecodeError(f"[{exc.code}] {exc.message}", exc.code) from None
    except ServiceError:
        state.statistics.failure(served.name, version, time.perf_counter() - start)
        raise
    state.statistics.success(served.name, version, len(logits), done - start, timing, done - built)
    state.metrics.images.labels("v2_infer").inc(len(logits))
    return InferResult(served.name, version, call.id, outputs)


def _parse_and_prepare(
    parse: Callable[[], InferCall], served: ServedModel, model: LoadedModel
) -> tuple[InferCall, Prepared]:
    call = parse()
    return call, prepare(served, model, call)


# --- REST ------------------------------------------------------------------------------------


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
    """``POST /v2/models/{model}/infer`` body (or its JSON header with the binary extension).

    ``model_name`` and ``model_version`` may repeat the URL's (the KServe SDK sends them)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | list[str] | None = None


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


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository_name: str | None = None
    ready: bool = False


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema with ``$ref``s resolved, for ``openapi_extra`` (which has no components)."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve_refs(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return resolve_refs(defs[ref.rsplit("/", 1)[-1]])
            return {key: resolve_refs(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve_refs(value) for value in node]
        return node

    result: dict[str, Any] = resolve_refs(schema)
    return result


def _flag(parameters: dict[str, Any] | None, key: str, default: bool) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key} must be true or false", "invalid_parameter")
    return value


def _count(parameters: dict[str, Any] | None, key: str) -> int:
    value = (parameters or {}).get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"parameter {key} must be a whole number >= 0", "invalid_parameter")
    return value


def parse_rest_infer(
    body: bytes, header_length: str | None, name: str, version: str | None
) -> InferCall:
    """A REST ``infer`` body (JSON, or the binary extension's JSON header and tensor bytes)."""
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
    if request.model_name not in (None, "", name):
        raise BadRequest(
            f"the body names model {request.model_name!r}, the URL {name!r}", "model_mismatch"
        )
    if request.model_version not in (None, "") and version not in (None, request.model_version):
        raise BadRequest(
            f"the body names version {request.model_version}, the URL {version}",
            "model_mismatch",
        )

    inputs: list[InputTensor] = []
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, tensor.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest("binary_data_size must be a whole number", "invalid_binary_size")
        if offset + size > len(binary):
            raise BadRequest(
                f"body carries {len(binary) - offset} tensor bytes for {tensor.name!r}, "
                f"binary_data_size says {size}",
                "invalid_binary_size",
            )
        raw = binary[offset : offset + size]
        offset += size
        inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, raw=raw))
    if offset != len(binary):
        raise BadRequest(
            f"body carries {len(binary)} tensor bytes, the inputs' binary_data_size {offset}",
            "invalid_binary_size",
        )
    binary_default = _flag(request.parameters, "binary_data_output", False)
    outputs = [
        OutputRequest(
            output.name,
            _flag(output.parameters, "binary_data", binary_default),
            _count(output.parameters, CLASSIFICATION),
        )
        for output in request.outputs or []
    ]
    return InferCall(request.id, inputs, outputs, binary_default)


def encode_rest_infer(result: InferResult) -> Response:
    header: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    if result.id is not None:
        header["id"] = result.id
    blobs: list[bytes] = []
    outputs: list[dict[str, Any]] = []
    for tensor in result.outputs:
        output: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if tensor.binary:
            blob = tensor.raw()
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = tensor.json_data()
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


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


#: What every v2 route may answer besides its success, in the services' error shape: a tensor
#: that does not fit (400), a model or version this server does not have (404), too many
#: images (413), no model ready yet or a full queue (503), the request timeout (504).
_V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 503, 504)
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"], responses=_V2_ERRORS)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(state: StateDep) -> dict[str, bool]:
    state.model()  # 503 unless a model is loaded and warm
    return {"ready": True}


@router.post("/repository/index")
async def repository_index_route(state: StateDep, request: Request) -> Response:
    """Triton's repository index: each model name with its version and state."""
    body = await request.body()
    try:
        parsed = RepositoryIndexRequest.model_validate(orjson.loads(body) if body else {})
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", "invalid_json") from None
    except ValidationError as exc:
        raise BadRequest(describe_validation(exc.errors()), "invalid_request") from None
    return _json(repository_index(state, parsed.ready))


# Before /models/{model_name}: "stats" is not a model name here.
@router.get("/models/stats")
async def all_statistics(state: StateDep) -> Response:
    """Inference statistics of every model (Triton's shape)."""
    return _json(statistics(state, None, None))


@router.get("/models/{model_name}", response_model=ModelMetadata)
async def model_meta(state: StateDep, model_name: str) -> dict[str, Any]:
    return model_metadata(*resolve(state, model_name, None))


@router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata)
async def model_version_meta(
    state: StateDep, model_name: str, model_version: str
) -> dict[str, Any]:
    return model_metadata(*resolve(state, model_name, model_version))


@router.get("/models/{model_name}/ready")
async def model_ready(state: StateDep, model_name: str) -> dict[str, Any]:
    served, model = resolve(state, model_name, None)
    return {"name": served.name, "version": str(model.number), "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready")
async def model_version_ready(
    state: StateDep, model_name: str, model_version: str
) -> dict[str, Any]:
    served, model = resolve(state, model_name, model_version)
    return {"name": served.name, "version": str(model.number), "ready": True}


@router.get("/models/{model_name}/config")
async def model_config_route(state: StateDep, model_name: str) -> Response:
    """Triton's model configuration, as JSON."""
    return _json(model_config(*resolve(state, model_name, None)))


@router.get("/models/{model_name}/versions/{model_version}/config")
async def model_version_config(state: StateDep, model_name: str, model_version: str) -> Response:
    return _json(model_config(*resolve(state, model_name, model_version)))


@router.get("/models/{model_name}/stats")
async def model_statistics(state: StateDep, model_name: str) -> Response:
    """Inference statistics of one model (Triton's shape)."""
    return _json(statistics(state, model_name, None))


@router.get("/models/{model_name}/versions/{model_version}/stats")
async def model_version_statistics(
    state: StateDep, model_name: str, model_version: str
) -> Response:
    return _json(statistics(state, model_name, model_version))


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
    served, model = resolve(state, name, version)
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    result = await run_infer(
        state,
        served,
        model,
        functools.partial(parse_rest_infer, body, header_length, name, version),
    )
    return encode_rest_infer(result)


#: The infer route's full path (the router's prefix included), for the app's fast route.
INFER_PATH = "/v2/models/{model_name}/infer"


async def fast_infer(request: Request) -> Response:
    """``infer`` without FastAPI's dependency resolution (see :class:`~services.common.http.
    FastRoute`): the state and the model name read directly."""
    return await _infer(get_state(request), request, request.path_params["model_name"], None)


@router.post("/models/{model_name}/infer", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES)
async def infer(state: StateDep, request: Request, model_name: str) -> Response:
    """Run a model: ``classifier`` on an FP32 ``[N, 3, 32, 32]`` tensor, ``classifier_ensemble``
    on a BYTES ``[N, 1]`` tensor of encoded images; both return logits ``[N, classes]`` (or,
    with ``classification`` on the output, the best classes as ``score:index:label``)."""
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
