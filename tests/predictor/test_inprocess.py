"""Logic that needs a controlled engine: queue full (503 + Retry-After), request timeout (504),
an engine that fails on purpose (500, logged, server keeps going), batches that never mix two
model versions, and a failed start. The app runs in-process with its lifespan; the model files
are the real published ones, only the engine is swapped for a gated or failing one."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from services.common.repository import RepositoryError, load_version
from services.common.runtime import EngineKind, FloatArray, LoadedModel
from services.predictor.app import StartupError, create_app
from services.predictor.batcher import DecodeApart, DynamicBatcher, ItemFailed, QueueFull
from services.predictor.metrics import PredictorMetrics
from services.predictor.reloader import ModelManager
from services.predictor.settings import PredictorSettings
from tests.conftest import PublishedModel
from tests.images import b64

WAIT_S = 30.0  # safety net for a deadlock, never expected to be reached


class GatedEngine:
    """Blocks every batch until ``release`` is set; records what it was given."""

    kind: EngineKind = "torchscript"
    platform = "test_gated"
    device = "cpu"

    def __init__(self, classes: int = 10, fail: bool = False) -> None:
        self.classes = classes
        self.fail = fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[FloatArray] = []

    def infer(self, batch: FloatArray) -> FloatArray:
        self.entered.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("test engine was never released")
        if self.fail:
            raise RuntimeError("engine failed on purpose")
        self.batches.append(batch.copy())
        logits = np.zeros((len(batch), self.classes), dtype=np.float32)
        logits[:, 3] = 1.0
        return logits


def _loader(published: PublishedModel, engine: GatedEngine) -> Callable[[int | None], LoadedModel]:
    def load(version: int | None) -> LoadedModel:
        verified = load_version(published.repo, published.model, version)
        return LoadedModel(verified, engine, verified.manifest.serving)

    return load


@asynccontextmanager
async def _running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://predictor") as client:
            yield client


def _settings(published: PublishedModel, **overrides: Any) -> PredictorSettings:
    # No gRPC port: the app runs in this process, beside servers that may hold the default one.
    values: dict[str, Any] = {
        "repository": published.repo,
        "poll_interval_s": 0,
        "grpc_port": 0,
    } | overrides
    return PredictorSettings(**values)


async def _wait(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)


async def test_full_queue_answers_503_with_retry_after(published_model: PublishedModel) -> None:
    engine = GatedEngine()
    settings = _settings(
        published_model, max_batch_size=1, max_images=1, queue_size=1, retry_after_s=7
    )
    app = create_app(settings, loader=_loader(published_model, engine))
    image = {"image": b64(published_model.images[0])}
    async with _running(app) as client:
        batcher = app.state.predictor.batcher
        first = asyncio.create_task(client.post("/predict", json=image))
        await asyncio.to_thread(engine.entered.wait, WAIT_S)  # first is inside the engine
        second = asyncio.create_task(client.post("/predict", json=image))
        await _wait(lambda: batcher.in_flight == 2)  # second is decoded, waiting for the engine
        third = asyncio.create_task(client.post("/predict", json=image))
        await _wait(lambda: batcher.depth == 1)  # third fills the queue
        fourth = await client.post("/predict", json=image)
        assert fourth.status_code == 503
        assert fourth.headers["retry-after"] == "7"
        assert fourth.json()["code"] == "overloaded"
        engine.release.set()
        for task in (first, second, third):
            assert (await task).status_code == 200


async def test_slow_inference_answers_504(published_model: PublishedModel) -> None:
    engine = GatedEngine()
    app = create_app(
        _settings(published_model, request_timeout_s=0.2), loader=_loader(published_model, engine)
    )
    async with _running(app) as client:
        response = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert response.status_code == 504
        assert response.json()["code"] == "timeout"
        engine.release.set()
        ok = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert ok.status_code == 200
        assert ok.json()["predictions"][0]["class_id"] == 3


async def test_failing_engine_is_a_500_and_the_server_goes_on(
    published_model: PublishedModel, caplog: pytest.LogCaptureFixture
) -> None:
    engine = GatedEngine()
    engine.release.set()
    app = create_app(_settings(published_model), loader=_loader(published_model, engine))
    async with _running(app) as client:
        engine.fail = True
        response = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert response.status_code == 500
        assert response.json()["code"] == "inference_failed"
        assert "engine failed on purpose" in caplog.text
        engine.fail = False
        again = await client.post("/predict", json={"image": b64(published_model.images[0])})
        assert again.status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_failed_start_stops_the_app(published_model: PublishedModel, tmp_path: Path) -> None:
    app = create_app(_settings(published_model, repository=tmp_path / "empty"))
    with pytest.raises(StartupError, match="no published version of 'classifier'"):
        async with app.router.lifespan_context(app):
            pass


def _model(published: PublishedModel, engine: GatedEngine) -> LoadedModel:
    verified = load_version(published.repo, published.model, None)
    return LoadedModel(verified, engine, verified.manifest.serving)


async def test_batches_are_full_and_never_mix_versions(published_model: PublishedModel) -> None:
    old_engine, new_engine = GatedEngine(), GatedEngine()
    old, new = _model(published_model, old_engine), _model(published_model, new_engine)
    with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(2) as decode_pool:
        batcher = DynamicBatcher(
            pool,
            decode_pool,
            2,
            PredictorMetrics.create(),
            max_batch_size=4,
            max_delay_s=0.0,
            queue_size=20,
        )
        batcher.start()
        try:
            old_engine.release.set()
            new_engine.release.set()
            # Submitted in one go: 6 for the old model, then 3 for the new (a swap between).
            tensors = [np.full((3, 32, 32), i, dtype=np.float32) for i in range(9)]
            old_result, new_result = await asyncio.gather(
                batcher.infer(old, tensors[:6]), batcher.infer(new, tensors[6:])
            )
            with pytest.raises(QueueFull):
                await batcher.infer(old, tensors * 3)  # 27 images > queue of 20
        finally:
            await batcher.stop()
    assert old_result.shape == (6, 10) and new_result.shape == (3, 10)
    old_ids = [[int(x[0, 0, 0]) for x in batch] for batch in old_engine.batches]
    new_ids = [[int(x[0, 0, 0]) for x in batch] for batch in new_engine.batches]
    assert old_ids == [[0, 1, 2, 3], [4, 5]]  # full batch, then the rest (never mixed)
    assert new_ids == [[6, 7, 8]]


async def test_manager_refuses_a_failing_version_and_keeps_the_old(
    published_model: PublishedModel, repo_copy: Path
) -> None:
    engine = GatedEngine()
    engine.release.set()
    good = _loader(published_model, engine)

    def loader(version: int | None) -> LoadedModel:
        if version is not None and version > published_model.version:
            raise RepositoryError(f"v{version} is broken on purpose")
        return good(version)

    manager = ModelManager(repo_copy, published_model.model, loader, PredictorMetrics.create())
    await manager.load_initial()
    assert await manager.check_once() is False  # nothing newer
    (repo_copy / published_model.model / "99").mkdir()
    (repo_copy / published_model.model / "99" / "manifest.json").write_text("{}")
    assert await manager.check_once() is False
    assert manager.refused == {99: "v99 is broken on purpose"}
    assert manager.current is not None and manager.current.number == published_model.version
    assert await manager.check_once() is False  # not retried: still serving the old one


async def test_delay_is_skipped_for_a_lone_request_a_full_batch_and_a_batch_axis_request(
    published_model: PublishedModel,
) -> None:
    """With a one-minute max delay, a lone request, a full batch and a request with a batch
    axis (one its caller batched: the `images` form, a v2 tensor) are still answered at once
    (the test's own timeout is shorter than the delay): the delay only ever waits for
    concurrent single images that can join a batch. A single image that is waiting goes along
    when a batch-axis one arrives."""
    engine = GatedEngine()
    engine.release.set()
    model = _model(published_model, engine)
    tensor = np.zeros((3, 32, 32), dtype=np.float32)
    with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as decode_pool:
        batcher = DynamicBatcher(
            pool,
            decode_pool,
            1,
            PredictorMetrics.create(),
            max_batch_size=4,
            max_delay_s=60.0,
            queue_size=8,
        )
        batcher.start()
        try:
            async with asyncio.timeout(WAIT_S):
                assert (await batcher.infer(model, [tensor])).shape == (1, 10)
                assert (await batcher.infer(model, [tensor] * 4)).shape == (4, 10)
                # A batch its caller formed, even of one image, does not wait...
                assert (await batcher.infer(model, [tensor] * 2, batch_axis=True)).shape == (2, 10)
                assert (await batcher.infer(model, [tensor], batch_axis=True)).shape == (1, 10)
                # ...while after a batch of more than one, a single image waits for company...
                await batcher.infer(model, [tensor] * 2, batch_axis=True)
                waiting = asyncio.create_task(batcher.infer(model, [tensor]))
                await asyncio.sleep(0.2)
                assert not waiting.done()
                # ...and leaves with the next batch-axis request.
                assert (await batcher.infer(model, [tensor] * 2, batch_axis=True)).shape == (2, 10)
                assert (await waiting).shape == (1, 10)
        finally:
            await batcher.stop()
    assert [len(batch) for batch in engine.batches] == [1, 4, 2, 1, 2, 3]


async def test_a_large_image_is_decoded_apart_and_never_holds_its_batch(
    published_model: PublishedModel,
) -> None:
    """A decoder that sends an image apart (DecodeApart) takes it out of its batch: the small
    image batched with it is answered while the large one is still decoding, in a thread of
    its own; decoded, the large one is answered from a later batch. One that fails there
    fails only its own request."""
    engine = GatedEngine()
    engine.release.set()
    model = _model(published_model, engine)
    decoding = threading.Event()
    finish_large = threading.Event()

    def finish(value: float) -> FloatArray:
        decoding.set()
        if not finish_large.wait(WAIT_S):
            raise TimeoutError("the large decode was never released")
        if value < 0:
            raise ValueError("broken large image")
        return np.full((3, 32, 32), value, dtype=np.float32)

    def decode(payload: object) -> FloatArray:
        value = float(cast(Any, payload))
        if abs(value) >= 100:
            raise DecodeApart(functools.partial(finish, value))
        return np.full((3, 32, 32), value, dtype=np.float32)

    with (
        ThreadPoolExecutor(1) as pool,
        ThreadPoolExecutor(1) as decode_pool,
        ThreadPoolExecutor(1, thread_name_prefix="large") as large_pool,
    ):
        batcher = DynamicBatcher(
            pool,
            decode_pool,
            1,
            PredictorMetrics.create(),
            max_batch_size=8,
            max_delay_s=0.2,  # gathers the three requests into one batch
            queue_size=16,
            large_executor=large_pool,
        )
        batcher.start()
        try:
            async with asyncio.timeout(WAIT_S):
                large = asyncio.create_task(batcher.infer(model, [100.0], decode))
                broken = asyncio.create_task(batcher.infer(model, [-100.0], decode))
                small = asyncio.create_task(batcher.infer(model, [1.0], decode))
                assert (await small).shape == (1, 10)
                assert decoding.is_set() and not large.done() and not broken.done()
                finish_large.set()
                assert (await large).shape == (1, 10)
                with pytest.raises(ItemFailed, match="broken large image"):
                    await broken
        finally:
            await batcher.stop()
    ids = [sorted(float(x[0, 0, 0]) for x in batch) for batch in engine.batches]
    assert ids[0] == [1.0]  # the small image's batch, without the two large ones
    assert [100.0] in ids[1:]


async def test_pinned_version_is_served_and_never_reloaded(
    published_model: PublishedModel, repo_copy: Path
) -> None:
    newer = published_model.version + 1
    (repo_copy / published_model.model / str(newer)).mkdir()
    (repo_copy / published_model.model / str(newer) / "manifest.json").write_text("{}")
    app = create_app(
        _settings(published_model, repository=repo_copy, version=published_model.version)
    )
    async with _running(app) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["version"] == published_model.version
        assert await app.state.predictor.manager.check_once() is False
        assert app.state.predictor.manager.refused == {}  # the newer folder was never looked at

    missing = create_app(_settings(published_model, repository=repo_copy, version=newer))
    with pytest.raises(StartupError, match=f"manifest .*{newer}.* is unreadable"):
        async with missing.router.lifespan_context(missing):
            pass


async def test_settings_override_the_models_serving_config_and_say_so(
    published_model: PublishedModel,
) -> None:
    """PREDICTOR_MAX_BATCH_SIZE / _MAX_IMAGES replace the manifest's values for this server:
    the batcher and the request limit follow them and /readyz names them as overrides."""
    engine = GatedEngine()
    engine.release.set()
    settings = _settings(published_model, max_batch_size=2, max_images=3)
    app = create_app(settings, loader=_loader(published_model, engine))
    image = b64(published_model.images[0])
    async with _running(app) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["serving_overrides"] == {"max_batch_size": 2, "max_images_per_request": 3}
        expected = published_model.manifest.serving.model_dump(mode="json") | {
            "max_batch_size": 2,
            "max_images_per_request": 3,
        }
        assert ready["serving"] == expected
        assert app.state.predictor.batcher.max_batch_size == 2
        too_many = await client.post("/predict", json={"images": [image] * 4})
        assert too_many.status_code == 413
        assert too_many.json()["code"] == "too_many_images"
        answered = await client.post("/predict", json={"images": [image] * 3})
        assert answered.status_code == 200
    assert max(len(batch) for batch in engine.batches) <= 2
