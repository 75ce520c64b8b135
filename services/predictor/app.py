"""The predictor's FastAPI app: lifespan, ``/predict``, health, metrics and the v2 router.

The lifespan owns every resource: it resolves the device, loads, verifies and warms up the
model through the shared runtime (a failure stops the service with one clear log line), sizes
the batcher from the model's serving config (with this server's overrides), starts it, the
gRPC server (:mod:`services.predictor.grpc_api`, on the same event loop and batcher) and the
hot-reload poller, and on shutdown stops them and the thread pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import orjson
from fastapi import FastAPI, Request, Response

from services.common.errors import Unavailable
from services.common.heap import freeze_startup_heap
from services.common.http import NO_FASTAPI_TELEMETRY, FastRoute, install_service_middleware
from services.common.imaging import InputSpec, decode_base64
from services.common.metrics import METRICS_RESPONSES, MULTIPROCESS_ENV, metrics_response
from services.common.repository import RepositoryError
from services.common.runtime import (
    EngineError,
    FloatArray,
    LoadedModel,
    load_model,
    resolve_device,
    set_torch_threads,
    top_k_predictions,
)
from services.common.schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    parse_predict_request,
)
from services.common.serving import ServingConfigError, with_overrides
from services.predictor import SERVER_NAME, SERVER_VERSION, v2
from services.predictor.batcher import DynamicBatcher, decode_image
from services.predictor.grpc_api import start_grpc_server
from services.predictor.metrics import PredictorMetrics
from services.predictor.reloader import Loader, ModelManager
from services.predictor.settings import PredictorSettings
from services.predictor.state import PredictorState, get_state

logger = logging.getLogger(__name__)

BACKEND = "predictor"
#: Seconds the gRPC server lets calls in flight finish on shutdown.
GRPC_GRACE_S = 5.0
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503, 504)
}


class StartupError(RuntimeError):
    """The service cannot serve (no verified, working model): it stops instead."""


def _decode(text: object, spec: InputSpec, max_pixels: int) -> FloatArray:
    """Runs in a decode thread (inside the batcher): base64 text -> model input tensor (or
    :class:`~services.predictor.batcher.DecodeApart` for a large image)."""
    return decode_image(decode_base64(cast(str, text)), spec, max_pixels)


_PREDICT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": v2.inline_schema(PredictRequest)}},
    }
}


async def read_predict_request(request: Request) -> PredictRequest:
    """The body as a :class:`PredictRequest`, through the parser the gateway uses too
    (:func:`~services.common.schemas.parse_predict_request`), so both answer the same bytes
    with the same status and code.

    Done by hand instead of declaring a body parameter: FastAPI would decode the JSON into
    Python objects first and then validate them, which costs a measurable share of a request
    at thousands of requests per second.
    """
    return parse_predict_request(await request.body(), request.headers.get("content-type", ""))


def serve_as_configured(load: Loader, settings: PredictorSettings) -> Loader:
    """``load``, then this server's overrides applied to the version's serving config and a
    version refused whose batches or requests could never fit the queue."""

    def configured(version: int | None) -> LoadedModel:
        loaded = load(version)
        try:
            serving = with_overrides(loaded.serving, settings.serving_overrides())
        except ServingConfigError as exc:
            raise EngineError(f"v{loaded.number}: {exc}") from None
        return check_serving(dataclasses.replace(loaded, serving=serving), settings.queue_size)

    return configured


def check_serving(model: LoadedModel, queue_size: int) -> LoadedModel:
    """Refuse a version whose batches or requests could never fit the queue."""
    serving = model.serving
    most = max(serving.max_batch_size, serving.max_images_per_request)
    if most > queue_size:
        raise EngineError(
            f"v{model.number} asks for batches of {serving.max_batch_size} and requests of "
            f"{serving.max_images_per_request} images, more than PREDICTOR_QUEUE_SIZE "
            f"({queue_size}) can hold"
        )
    return model


def default_loader(settings: PredictorSettings, device: str) -> Loader:
    def load(version: int | None) -> LoadedModel:
        return load_model(
            settings.repository,
            settings.model,
            version,
            settings.engine,
            device,
            fp16=settings.fp16,
            channels_last=settings.channels_last,
            threads=settings.cpu_threads(),
            optimize=settings.jit_optimize,
            serving_overrides=settings.serving_overrides(),  # warm-up sizes follow them
            warmup_runs=settings.warmup_runs,
            precision=settings.precision,
        )

    return load


async def _report_queue_depth(metrics: PredictorMetrics, batcher: DynamicBatcher) -> None:
    while True:
        metrics.queue_depth.set(batcher.depth)
        await asyncio.sleep(1.0)


def create_app(settings: PredictorSettings | None = None, loader: Loader | None = None) -> FastAPI:
    """The app; ``loader`` replaces the repository loader (tests use a failing one)."""
    settings = settings or PredictorSettings()
    metrics = PredictorMetrics.create()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: PredictorState | None = None
        infer_pool: ThreadPoolExecutor | None = None
        decode_pool: ThreadPoolExecutor | None = None
        large_pool: ThreadPoolExecutor | None = None
        batcher: DynamicBatcher | None = None
        grpc_server: grpc.aio.Server | None = None
        try:
            try:
                load = loader
                if load is None:
                    device = resolve_device(settings.device)
                    if settings.engine == "torchscript":
                        set_torch_threads(settings.cpu_threads())
                    load = default_loader(settings, device)
                manager = ModelManager(
                    settings.repository,
                    settings.model,
                    serve_as_configured(load, settings),
                    metrics,
                    settings.version,
                )
                model = await manager.load_initial()
            except (RepositoryError, EngineError) as exc:
                logger.error("predictor cannot start: %s", exc)
                raise StartupError(f"predictor cannot start: {exc}") from None
            # Instances are threads sized at start; batch size and delay follow each version.
            instances = model.serving.instance_count
            infer_pool = ThreadPoolExecutor(instances, thread_name_prefix="infer")
            decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
            # Large images one at a time, beside the batches (see batcher.DecodeApart).
            large_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-large")
            batcher = DynamicBatcher(
                infer_pool,
                decode_pool,
                settings.decode_threads,
                metrics,
                max_batch_size=model.serving.max_batch_size,
                max_delay_s=model.serving.max_batch_delay_ms / 1000.0,
                queue_size=settings.queue_size,
                in_flight_batches=instances + 1,
                large_executor=large_pool,
            )
            manager.on_swap = batcher.follow
            queue = batcher
            batcher.start()
            state = PredictorState(settings, metrics, manager, batcher, decode_pool)
            if os.environ.get(MULTIPROCESS_ENV):
                # One of several workers: /metrics reads the workers' shared files, which a
                # callback gauge never writes, so this worker writes its depth every second.
                state.background.append(
                    asyncio.create_task(_report_queue_depth(metrics, queue), name="queue-depth")
                )
            else:
                metrics.queue_depth.set_function(lambda: queue.depth)
            if settings.grpc_port:
                try:
                    grpc_server = await start_grpc_server(state)
                except RuntimeError as exc:
                    logger.error("predictor cannot start: %s", exc)
                    raise StartupError(f"predictor cannot start: {exc}") from None
            if settings.poll_interval_s > 0 and settings.version is None:
                state.background.append(
                    asyncio.create_task(
                        manager.poll_forever(settings.poll_interval_s), name="hot-reload"
                    )
                )
            app.state.predictor = state
            freeze_startup_heap()
            state.ready = True
            overrides = settings.serving_overrides()
            logger.info(
                "ready: %s v%d on %s (%s), max batch %d, delay %gms, %d instance(s), gRPC %s%s",
                model.name,
                model.number,
                model.engine.device,
                model.engine.kind,
                model.serving.max_batch_size,
                model.serving.max_batch_delay_ms,
                instances,
                f"on port {settings.grpc_port}" if settings.grpc_port else "off",
                f"; PREDICTOR_* overrides of the model's serving config: {overrides}"
                if overrides
                else "",
            )
            yield
        finally:
            if state is not None:
                state.ready = False
                for task in state.background:
                    task.cancel()
                await asyncio.gather(*state.background, return_exceptions=True)
            if grpc_server is not None:
                await grpc_server.stop(GRPC_GRACE_S)
            if batcher is not None:
                await batcher.stop()
            for pool in (infer_pool, decode_pool, large_pool):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="predictor",
        version=SERVER_VERSION,
        summary="Image classifier on TorchScript or ONNX Runtime with dynamic batching.",
        lifespan=lifespan,
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    app.state.settings = settings
    install_service_middleware(
        app,
        max_body_bytes=settings.max_body_bytes,
        max_buffered_bytes=settings.max_buffered_bytes,
        duration=metrics.http_duration,
        in_flight=metrics.in_flight,
    )

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_DOC,
        tags=["predict"],
    )
    async def predict(request: Request) -> Response:
        """Classify one base64 image (``image``) or several (``images``).

        ``predictions`` is a list of ``{label, class_id, score}`` (best first, ``top_k`` long)
        for ``image``, and one such list per image for ``images``.
        """
        # The state is read directly rather than through StateDep: on the hottest route,
        # FastAPI's dependency resolution is a noticeable share of the per-request CPU.
        state = get_state(request)
        body = await read_predict_request(request)
        model = state.model()
        images = body.image_texts(model.serving.max_images_per_request)
        decode = functools.partial(_decode, spec=model.spec, max_pixels=model.serving.max_pixels)
        async with state.deadline():
            logits = await state.classify(model, images, decode, batch_axis=body.images is not None)
        metrics.images.labels("predict").inc(len(images))
        predictions = top_k_predictions(logits, model.labels, body.top_k)
        payload = {
            "model": model.name,
            "version": str(model.number),
            "backend": BACKEND,
            "predictions": predictions[0] if body.image is not None else predictions,
        }
        return Response(
            orjson.dumps(payload), media_type="application/json", headers={"X-Backend": BACKEND}
        )

    @app.post("/noop", tags=["ops"])
    async def noop() -> Response:
        """Does nothing: the HTTP ceiling of this server, for the benchmark."""
        return Response(b'{"ok":true}', media_type="application/json")

    # After /predict and /noop: routes are matched in order, and the hot ones go first.
    app.include_router(v2.router)
    # The two hot routes, /predict and v2 infer (the gateway's hop), also as plain Starlette
    # routes in front of FastAPI's, calling the same code (FastRoute says why).
    app.router.routes[:0] = [
        FastRoute("/predict", predict, methods=["POST"]),
        FastRoute(v2.INFER_PATH, v2.fast_infer, methods=["POST"]),
    ]

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up (not necessarily ready)."""
        return {"status": "ok", "service": SERVER_NAME}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> dict[str, Any]:
        """200 once a verified model is warm; lists refused versions."""
        state: PredictorState | None = getattr(request.app.state, "predictor", None)
        if state is None or not state.ready or state.manager.current is None:
            raise Unavailable("the predictor is not ready", "not_ready")
        model = state.manager.current
        return {
            "ready": True,
            "model": model.name,
            "version": model.number,
            "engine": model.engine.kind,
            "precision": model.precision,
            "device": model.engine.device,
            "serving": model.serving.model_dump(mode="json"),
            "serving_overrides": settings.serving_overrides(),
            "grpc_port": settings.grpc_port or None,
            "refused": {str(v): reason for v, reason in state.manager.refused.items()},
            "refused_versions": [r.as_dict() for r in state.manager.refused_versions()],
        }

    @app.get("/metrics", tags=["ops"], response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return metrics_response(metrics.registry)

    return app
