"""The gateway's FastAPI app: the one service a user talks to (docs/architecture.md "Gateway API").

Request path of ``POST /predict``: request id -> metrics -> API key (when configured, before
any body byte is read) -> body limits (413 from the declared length or the bytes counted, 503
beyond the process's buffer budget) -> JSON shape, image count
and base64 (each image decoded once here) -> routing (:mod:`services.gateway.routing`) ->
engine (:mod:`services.gateway.backends`) -> one answer schema with ``X-Backend`` and
``X-Request-ID``. Nothing that fails validation reaches an engine.

The lifespan owns the pooled engine clients and the readiness poller: the first
round of readiness checks runs before the gateway accepts requests, the poller keeps
``/readyz`` current, and on shutdown the poller stops and every client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from fastapi import FastAPI, Request, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import (
    REQUEST_ID_HEADER,
    BadRequest,
    ServiceError,
)
from services.common.heap import freeze_startup_heap
from services.common.http import NO_FASTAPI_TELEMETRY, FastRoute, install_service_middleware
from services.common.imaging import ImageDecodeError, decode_base64
from services.common.metrics import METRICS_RESPONSES, labelled, metrics_response
from services.common.schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    parse_predict_request,
)
from services.gateway.backends import Backend, EncodedImage, create_backends
from services.gateway.metrics import ALL_BACKENDS, NO_BACKEND, GatewayMetrics
from services.gateway.resilience import EngineGuard
from services.gateway.routing import Router, RoutingError, parse_precision
from services.gateway.settings import BackendName, GatewaySettings

logger = logging.getLogger(__name__)

SERVICE = "gateway"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 409, 413, 415, 422, 503, 504)
}


_PREDICT_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "backend",
            "in": "query",
            "required": False,
            "description": "predictor, torchserve, triton, or all (compare mode); default: "
            "GATEWAY_DEFAULT_BACKEND, or a draw from GATEWAY_WEIGHTS",
            "schema": {"type": "string"},
        },
        {
            "name": "precision",
            "in": "query",
            "required": False,
            "description": "fp32 (default) or int8: the version's int8 model (published with "
            "--int8), served by the predictor and Triton; with backend=all also both (each "
            "engine at each precision, with their top-1 agreement). 400 for any other value; "
            "409 precision_unavailable where the engine or its version has no int8 model",
            "schema": {"type": "string", "enum": ["fp32", "int8", "both"]},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    },
}


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class RequestId:
    """Pure ASGI middleware: every response carries ``X-Request-ID`` (the caller's when it
    sent a sane one, a new one otherwise); handlers read it from ``request.state``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: GatewayMetrics
    backends: dict[BackendName, Backend]
    guards: dict[BackendName, EngineGuard]
    router: Router
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def check_all(self) -> None:
        await asyncio.gather(*(guard.check() for guard in self.guards.values()))

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self.check_all()


def parse_body(
    body: bytes, content_type: str, max_images: int
) -> tuple[PredictRequest, list[EncodedImage]]:
    """Validate a ``/predict`` body; every failure is the caller's and raises a 4xx."""
    request = parse_predict_request(body, content_type)
    texts = request.image_texts(max_images)
    images = []
    for index, text in enumerate(texts):
        try:
            images.append(EncodedImage(decode_base64(text)))
        except ImageDecodeError as exc:
            where = f"images[{index}]: " if request.images is not None else ""
            raise BadRequest(where + exc.message, exc.code) from None
    return request, images


def query_choices(query_string: bytes) -> tuple[str | None, str | None]:
    """``?backend=`` and ``?precision=`` of the query string (None when absent; the last
    one when repeated); most requests have no query."""
    if not query_string:
        return None, None
    query = parse_qs(query_string.decode("latin-1"))
    backend, precision = query.get("backend"), query.get("precision")
    return (backend[-1] if backend else None), (precision[-1] if precision else None)


def json_response(
    payload: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics.create(settings.backends)
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    model_label = settings.model
    request_duration = labelled(metrics.request_duration)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = create_backends(settings)
        guards = {name: EngineGuard(b, settings, metrics) for name, b in backends.items()}
        state = GatewayState(settings, metrics, backends, guards, Router(settings, guards, metrics))
        try:
            await state.check_all()
            ready = [name for name, guard in guards.items() if guard.ready]
            logger.info(
                "gateway up; engines ready: %s; default %s%s, failover %s",
                ", ".join(ready) or "none yet",
                settings.default_backend,
                f", weights {settings.weights}" if settings.weights else "",
                "on" if settings.failover else "off",
            )
            state.tasks.append(asyncio.create_task(state.poll_forever(), name="health-poller"))
            app.state.gateway = state
            freeze_startup_heap()
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            for guard in guards.values():
                guard.close()
            await asyncio.gather(*(b.aclose() for b in backends.values()))

    app = FastAPI(
        title="gateway",
        summary="One /predict in front of three engines: the FastAPI predictor, TorchServe and "
        "Triton, with routing, failover, timeouts and metrics.",
        lifespan=lifespan,
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    key_header = settings.api_key_header.lower().encode("latin-1")

    def check_api_key(scope: Scope) -> ServiceError | None:
        """With an API key set, ``POST /predict`` without it is refused before its body is
        read (an unauthenticated client cannot make the gateway buffer anything)."""
        if api_key is None or scope["path"] != "/predict":
            return None
        given = next((v for k, v in scope["headers"] if k == key_header), b"")
        if hmac.compare_digest(given, api_key):
            return None
        metrics.errors.labels("401", Unauthorized.code).inc()
        return Unauthorized(f"missing or wrong API key in the {settings.api_key_header} header")

    install_service_middleware(
        app,
        max_body_bytes=settings.max_body_bytes,
        max_buffered_bytes=settings.max_buffered_bytes,
        duration=metrics.http_duration,
        in_flight=metrics.in_flight,
        check_head=check_api_key,
    )
    app.add_middleware(RequestId)

    def gateway_state(request: Request) -> GatewayState:
        state: GatewayState = request.app.state.gateway
        return state

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_DOC,
        tags=["predict"],
    )
    async def predict(request: Request) -> Response:
        """Classify one base64 image (``image``) or several (``images``) on one engine.

        The body is ``{"image": "<base64>"}`` or ``{"images": [...]}`` with optional ``top_k``;
        the answer is ``{model, version, backend, predictions}`` (a list per image for
        ``images``). With ``?backend=all`` every ready engine answers and the body lists each
        answer with its latency and whether the top-1 labels agree.
        """
        start = time.perf_counter()
        served = NO_BACKEND
        status = 500
        try:
            state = gateway_state(request)
            body, images = parse_body(
                await request.body(), request.headers.get("content-type", ""), settings.max_images
            )
            request_id: str = request.state.request_id
            # Read by hand, not declared as a parameter: FastAPI's parameter machinery costs
            # more per request than the rest of the gateway's own work (see _PREDICT_DOC).
            backend, asked = query_choices(request.scope.get("query_string", b""))
            precision = parse_precision(asked, compare=backend == ALL_BACKENDS)
            if backend == ALL_BACKENDS:
                served = ALL_BACKENDS
                status, payload = await state.router.compare(
                    images,
                    body.top_k,
                    request_id,
                    single=body.image is not None,
                    precision=precision,
                )
                names = ",".join(payload["answered"]) or NO_BACKEND
                if status != 200:
                    metrics.errors.labels(str(status), payload["code"]).inc()
                return json_response(payload, status, {"X-Backend": names})
            assert precision != "both"  # parse_precision allows it in compare mode only
            chosen = state.router.choose(backend, precision)
            try:
                result = await state.router.predict(
                    chosen, images, body.top_k, request_id, precision
                )
            except RoutingError as exc:
                if exc.backend is not None:
                    served = exc.backend
                    exc.headers["X-Backend"] = exc.backend
                raise
            served = result.backend
            answer = result.answer
            payload = {
                "model": answer.model,
                "version": answer.version,
                "backend": result.backend,
                "predictions": answer.predictions[0]
                if body.image is not None
                else answer.predictions,
            }
            if precision != "fp32":
                payload["precision"] = precision
            headers: dict[str, str] = {"X-Backend": result.backend}
            if result.skipped:
                headers["X-Failover-From"] = ",".join(result.skipped)
            status = 200
            return json_response(payload, headers=headers)
        except ServiceError as exc:
            status = exc.status_code
            metrics.errors.labels(str(status), exc.code).inc()
            raise
        finally:
            request_duration(served, model_label, str(status)).observe(time.perf_counter() - start)

    # Requests to /predict are served by a plain Starlette route put in front of FastAPI's,
    # calling the same function: FastAPI's per-request machinery (dependency resolution,
    # endpoint wrapping) cost about a fifth of the gateway's CPU per request. FastAPI's route
    # above stays for the OpenAPI document (/docs).
    app.router.routes.insert(0, FastRoute("/predict", predict, methods=["POST"]))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up (not necessarily able to reach any engine)."""
        return {"status": "ok", "service": SERVICE}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Response:
        """Each engine's readiness (last check, circuit breaker); 200 while one can answer."""
        state = gateway_state(request)
        engines = {name: guard.describe() for name, guard in state.guards.items()}
        payload: dict[str, Any] = {
            "ready": any(entry["ready"] for entry in engines.values()),
            "default_backend": settings.default_backend,
            "failover": settings.failover,
            "backends": engines,
        }
        if payload["ready"]:
            return json_response(payload)
        payload.update(error="no engine is ready", code="not_ready")
        return json_response(payload, 503)

    @app.get("/metrics", tags=["ops"], response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return metrics_response(metrics.registry)

    return app
