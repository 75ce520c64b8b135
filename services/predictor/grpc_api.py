"""The Open Inference Protocol's ``GRPCInferenceService`` on grpcio's asyncio server.

The service definition is the one ``tritonclient`` ships as generated modules
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``, the KServe v2 protocol with Triton's
extensions), so Triton's and KServe's gRPC clients and ``perf_analyzer`` talk to the predictor
as they talk to Triton. The server runs on the event loop uvicorn runs (started and stopped by
the app's lifespan) and calls what the REST routes call (:mod:`services.predictor.v2`): the same
models, the same checks and messages, the same batcher, the same inference statistics. The
metadata, config, statistics and repository-index answers are the REST routes' dictionaries
parsed into the protobuf messages, whose fields have the same names.

Errors are gRPC status codes, decided by the error's HTTP status: a caller's mistake (400, 413,
415, 422) is ``INVALID_ARGUMENT`` with the message REST gives, an unknown model or version
(404) ``NOT_FOUND``, a full queue or a server not ready (503) ``UNAVAILABLE``, a timeout
(504) ``DEADLINE_EXCEEDED``; only a fault of the server is ``INTERNAL``, with an opaque
message (the cause is logged). Messages are limited like REST bodies: one over
``PREDICTOR_MAX_BODY_BYTES`` is ``INVALID_ARGUMENT`` with REST's 413 message; gRPC itself
refuses, without reading it, one over twice that (``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.common.errors import BadRequest, PayloadTooLarge, ServiceError
from services.common.metrics import labelled
from services.predictor import SERVER_NAME, SERVER_VERSION, v2
from services.predictor.state import PredictorState

logger = logging.getLogger(__name__)

Message = Any  # protobuf messages (tritonclient's generated modules carry no type hints)
Handler = Callable[[Any, Message, grpc.aio.ServicerContext], Awaitable[Message]]
HandlerT = TypeVar("HandlerT", bound=Handler)

#: gRPC's own hard limit is this many times the body limit (see the module docstring).
HARD_LIMIT_FACTOR = 2


def status_code(exc: ServiceError) -> grpc.StatusCode:
    """The gRPC status of an error the service answers on purpose, from its HTTP status."""
    status = exc.status_code
    if status == 404:
        return grpc.StatusCode.NOT_FOUND
    if status in (401, 403):
        return grpc.StatusCode.PERMISSION_DENIED
    if status == 503:
        return grpc.StatusCode.UNAVAILABLE
    if status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if 400 <= status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _rpc(method: HandlerT) -> HandlerT:
    """Metrics, error translation and the server's readiness around one RPC."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: InferenceService, request: Message, context: grpc.aio.ServicerContext
    ) -> Message:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight.inc()
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            code = status_code(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.error("gRPC %s failed: %s", name, exc.message)
            await context.abort(code, exc.message)
            raise  # abort raises; this line keeps the type checker sure of it
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("unhandled error in gRPC %s", name)
            await context.abort(code, f"internal error in {name}")
            raise
        finally:
            self.in_flight.dec()
            self.duration(name, code.name).observe(time.perf_counter() - start)

    return wrapper  # type: ignore[return-value]


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The RPCs of the v2 protocol this server implements; the others answer UNIMPLEMENTED
    (shared memory, tracing, logging, model load/unload, streaming)."""

    def __init__(self, state: PredictorState) -> None:
        self.state = state
        self.duration = labelled(state.metrics.grpc_duration)
        self.in_flight = state.metrics.grpc_in_flight
        self.max_message_bytes = state.settings.max_body_bytes

    @_rpc
    async def ServerLive(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        state = self.state
        return service_pb2.ServerReadyResponse(
            ready=state.ready and state.manager.current is not None
        )

    @_rpc
    async def ModelReady(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        try:
            v2.resolve(self.state, request.name, request.version or None)
        except ServiceError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(v2.EXTENSIONS)
        )

    @_rpc
    async def ModelMetadata(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        served, model = v2.resolve(self.state, request.name, request.version or None)
        return json_format.ParseDict(
            v2.model_metadata(served, model), service_pb2.ModelMetadataResponse()
        )

    @_rpc
    async def ModelConfig(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        served, model = v2.resolve(self.state, request.name, request.version or None)
        config = json_format.ParseDict(
            v2.model_config(served, model), model_config_pb2.ModelConfig()
        )
        return service_pb2.ModelConfigResponse(config=config)

    @_rpc
    async def ModelStatistics(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        name = request.name or None
        stats = v2.statistics(self.state, name, request.version or None)
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

    @_rpc
    async def RepositoryIndex(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        entries = v2.repository_index(self.state, request.ready)
        return json_format.ParseDict({"models": entries}, service_pb2.RepositoryIndexResponse())

    @_rpc
    async def ModelInfer(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        state = self.state
        version = request.model_version or None
        served, model = v2.resolve(state, request.model_name, version)
        size = request.ByteSize()
        if size > self.max_message_bytes:
            state.statistics.failure(served.name, str(model.number), 0.0)
            raise PayloadTooLarge(
                f"request body of {size} bytes is over the limit of {self.max_message_bytes} bytes"
            )
        result = await v2.run_infer(state, served, model, functools.partial(parse_infer, request))
        response = service_pb2.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=result.id or ""
        )
        for tensor in result.outputs:
            output = response.outputs.add()
            output.name = tensor.name
            output.datatype = tensor.datatype
            output.shape.extend(tensor.shape)
            response.raw_output_contents.append(tensor.raw())
        return response


def _int_parameter(parameters: Any, key: str) -> int:
    if key not in parameters:
        return 0
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(parameter, kind))
    raise BadRequest(f"parameter {key} must be an integer", "invalid_parameter")


def parse_infer(request: Message) -> v2.InferCall:
    """A ``ModelInferRequest`` as the transport-neutral :class:`~services.predictor.v2.InferCall`
    (tensor bytes in ``raw_input_contents``, one per input, or typed ``contents``)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs",
            "invalid_binary_size",
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            inputs.append(v2.InputTensor(tensor.name, tensor.datatype, shape, raw=raw[index]))
            continue
        contents = tensor.contents
        data: list[Any] | None
        if tensor.datatype == v2.BYTES:
            data = list(contents.bytes_contents)
        elif tensor.datatype == v2.FP32:
            data = list(contents.fp32_contents)
        else:
            data = None
        inputs.append(v2.InputTensor(tensor.name, tensor.datatype, shape, data))
    outputs = [
        v2.OutputRequest(
            output.name, class_count=_int_parameter(output.parameters, v2.CLASSIFICATION)
        )
        for output in request.outputs
    ]
    return v2.InferCall(request.id or None, inputs, outputs)


async def start_grpc_server(state: PredictorState) -> grpc.aio.Server:
    """The service on ``PREDICTOR_HOST``:``PREDICTOR_GRPC_PORT``, started; RuntimeError when
    the port cannot be bound. SO_REUSEPORT is on only with ``PREDICTOR_WORKERS`` above 1, so
    that the workers share the port (the kernel spreads connections over them); a single
    server must not share its port with anything."""
    settings = state.settings
    limit = settings.max_body_bytes * HARD_LIMIT_FACTOR + 64 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", int(settings.workers > 1)),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen for gRPC on {address}: {exc}") from None
    if bound == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server
