"""Dynamic batching: images from concurrent requests share one decode job and one inference call.

Requests put one item per image into a bounded queue and await a future each. One batcher task
takes up to ``max_batch_size`` items; a batch starts when it is full or when its oldest item has
waited ``max_delay`` (Triton's ``max_queue_delay`` semantics), whichever comes first. Under load
no time is spent waiting at all: while one batch runs, the next one fills up.

The delay exists to gather single images from concurrent callers, so two kinds of work never
wait for it: a lone image while nothing suggests concurrent traffic, and a request with a
*batch axis*. This is the one place the rule lives: a request whose images come along a batch
axis (every Open Inference Protocol tensor, ``[N, ...]``, REST or gRPC, and the ``images`` list
of ``/predict``) is a batch its caller formed, even of one image, and runs as soon as a batch
slot is free, together with whatever else is queued by then; only axis-less single images
(``/predict``'s ``image``) wait to be gathered. The gateway coalesces its concurrent callers
into such tensors and has nothing more to send until one returns, so holding them back would
only leave the CPU idle.

A batch is then processed off the event loop in two steps: its encoded images are decoded in
the decode pool (split into one chunk per decode thread), and the tensors go through the
engine in the single inference thread. Decoding per batch rather than per request matters on a
small CPU: handing work to a thread costs about as much as decoding a small image, and this way
it is paid a few times per batch instead of once per image. Two batches may be in flight, so
the decoding of one overlaps the inference of the previous one. An image that fails to decode
fails only its own request; the rest of the batch goes on.

A large image would hold its whole batch (and a decode thread) for as long as it takes to
decode, so the decoder may refuse to decode it inside the batch by raising
:class:`DecodeApart` after reading its header. Its request then leaves the batch, the rest of
the batch goes on, and the image is decoded in one thread of its own (large images one after
the other, which also bounds the memory they take at once); decoded, it joins the next batch.

Every item carries the :class:`LoadedModel` its request started with, and a batch never mixes
two models: after a hot reload, requests admitted before the swap finish on the old version.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image

from services.common.imaging import InputSpec, decoded_bytes, load_image, open_image, preprocess
from services.common.runtime import Engine, FloatArray, LoadedModel
from services.predictor.metrics import PredictorMetrics

logger = logging.getLogger(__name__)

#: Turns one request payload (e.g. a base64 string) into a CHW float32 tensor; may raise.
Decoder = Callable[[object], FloatArray]

#: Batches between taking and answering by default: one decoding while the previous one infers
#: (with more inference threads, one more than there are threads).
IN_FLIGHT_BATCHES = 2


class QueueFull(RuntimeError):
    """The queue cannot take the request's images now; the caller should retry later."""


class BatcherClosed(RuntimeError):
    """The service is shutting down."""


class InferenceFailed(RuntimeError):
    """The engine raised while running a batch (an engine fault, not the caller's)."""


class DecodeApart(Exception):
    """Raised by a :data:`Decoder` for an image too large to decode inside a batch: ``finish``
    decodes it (in the batcher's thread for large images) and returns the tensor."""

    def __init__(self, finish: Callable[[], FloatArray]) -> None:
        super().__init__("decode apart from the batch")
        self.finish = finish


#: An image that decodes to more bytes than this (a 1024 x 1024 RGB one, say; the digits here
#: are 32 x 32) is decoded apart from its batch by :func:`decode_image`.
DECODE_APART_BYTES = 1 << 20


def decode_image(data: bytes, spec: InputSpec, max_pixels: int) -> FloatArray:
    """Encoded image bytes -> model input tensor, the decoding both ``/predict`` and v2's BYTES
    tensors run in the batcher. The header is read and the limits checked first
    (:func:`~services.common.imaging.open_image`); an image that passes them but decodes to
    more than :data:`DECODE_APART_BYTES` raises :class:`DecodeApart` instead of holding the
    batch."""
    image = open_image(data, max_pixels)
    if decoded_bytes(image) > DECODE_APART_BYTES:
        raise DecodeApart(functools.partial(_finish_decode, image, spec))
    return _finish_decode(image, spec)


def _finish_decode(image: Image.Image, spec: InputSpec) -> FloatArray:
    return preprocess(load_image(image), spec)


class ItemFailed(Exception):
    """One image of a request could not be decoded; ``error`` is why, ``index`` which one."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"item {index}: {error}")
        self.index = index
        self.error = error


@dataclass(slots=True, eq=False)
class _Item:
    model: LoadedModel
    payload: object
    decode: Decoder | None  # None: the payload already is the tensor
    future: asyncio.Future[FloatArray]
    enqueued: float
    batch_axis: bool  # its caller batched it already: it never waits for the delay
    tensor: FloatArray | None = None
    started: float = 0.0  # when its batch was taken
    decode_s: float = 0.0  # its batch's decoding
    infer_s: float = 0.0  # its batch's inference call


@dataclass(slots=True)
class RequestTiming:
    """Where one request's time went, filled in by :meth:`DynamicBatcher.infer` (the
    predictor's inference statistics): the longest queue wait of its images, and the decoding
    and inference time of the batch(es) they ran in (a batch's time counts fully for each of
    its requests, as Triton counts it)."""

    queue_s: float = 0.0
    decode_s: float = 0.0
    infer_s: float = 0.0


def _decode_chunk(jobs: list[tuple[Decoder, object]]) -> list[FloatArray | Exception]:
    """Runs in a decode thread. Each failure is returned, to be delivered to its own request
    (a :class:`DecodeApart` too, to be decoded on its own)."""
    results: list[FloatArray | Exception] = []
    for decode, payload in jobs:
        try:
            results.append(decode(payload))
        except Exception as exc:
            results.append(exc)
    return results


def _run_engine(engine: Engine, tensors: list[FloatArray]) -> tuple[FloatArray, float]:
    """Runs in the inference thread: stack, infer, and time both."""
    start = time.perf_counter()
    logits = engine.infer(np.stack(tensors))
    return logits, time.perf_counter() - start


class DynamicBatcher:
    def __init__(
        self,
        infer_executor: Executor,
        decode_executor: Executor,
        decode_threads: int,
        metrics: PredictorMetrics,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        in_flight_batches: int = IN_FLIGHT_BATCHES,
        large_executor: Executor | None = None,
    ) -> None:
        """``large_executor`` decodes the images a decoder sends apart (:class:`DecodeApart`);
        one thread is the intent. None: the decode pool does."""
        self._infer_executor = infer_executor
        self._decode_executor = decode_executor
        self._large_executor = large_executor or decode_executor
        self._decode_threads = decode_threads
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._pending: deque[_Item] = deque()
        self._batch_axis_pending = 0  # items of batch-axis requests in `_pending`
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight_batches)
        self._idle = True
        self._last_batch = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[asyncio.Task[None], list[_Item]] = {}
        self._apart: dict[asyncio.Task[None], _Item] = {}  # large images decoding on their own

    def follow(self, model: LoadedModel) -> None:
        """Batch as the newly served version's serving config says (from the next batch on)."""
        self.max_batch_size = model.serving.max_batch_size
        self.max_delay_s = model.serving.max_batch_delay_ms / 1000.0

    @property
    def depth(self) -> int:
        """Images waiting now (some may belong to requests that already gave up)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Images taken into batches that are decoding or inferring now."""
        return sum(len(batch) for batch in self._in_flight.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        self._closed = True
        tasks = [t for t in (self._task, *self._in_flight, *self._apart) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stranded = [item for batch in self._in_flight.values() for item in batch]
        stranded.extend(self._apart.values())
        for item in [*stranded, *self._pending]:
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the predictor is shutting down"))
        self._pending.clear()
        self._batch_axis_pending = 0
        self._in_flight.clear()
        self._apart.clear()

    async def infer(
        self,
        model: LoadedModel,
        payloads: Sequence[object],
        decode: Decoder | None = None,
        batch_axis: bool = False,
        timing: RequestTiming | None = None,
    ) -> FloatArray:
        """Logits ``[len(payloads), classes]`` from ``model``; all images or none are queued.

        ``payloads`` are encoded images that ``decode`` turns into tensors, or ready tensors
        when ``decode`` is None. ``batch_axis``: they came along the batch axis of the
        caller's request, so they do not wait for others (see the module docstring). A payload
        that fails to decode raises :class:`ItemFailed`. ``timing``, when given, is filled in
        once the logits are there.
        """
        if self._closed:
            raise BatcherClosed("the predictor is shutting down")
        if len(self._pending) + len(payloads) > self.queue_size:
            raise QueueFull(
                f"{len(self._pending)} images are queued (limit {self.queue_size}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [
            _Item(
                model,
                p,
                decode,
                loop.create_future(),
                now,
                batch_axis,
                None if decode else cast(Any, p),
            )
            for p in payloads
        ]
        self._pending.extend(items)
        if batch_axis:
            self._batch_axis_pending += len(items)
        # Wake the batcher only when it sleeps on an empty queue, a batch just filled up or a
        # batch that must not wait arrived; waking it for every image would cost a loop
        # iteration each.
        if self._idle or batch_axis or len(self._pending) >= self.max_batch_size:
            self._wakeup.set()
        rows: list[FloatArray] = []
        try:
            for index, item in enumerate(items):
                try:
                    rows.append(await item.future)
                except (InferenceFailed, BatcherClosed):
                    raise
                except Exception as exc:
                    raise ItemFailed(index, exc) from exc
        except BaseException:
            for item in items:
                if not item.future.done():
                    item.future.cancel()  # timed out or failed: the batcher skips it
                elif not item.future.cancelled():
                    item.future.exception()  # mark retrieved: asyncio would log it at GC
            raise
        if timing is not None:
            timing.queue_s = max(item.started - item.enqueued for item in items)
            timing.decode_s = max(item.decode_s for item in items)
            timing.infer_s = max(item.infer_s for item in items)
        return np.stack(rows)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._idle = True
                self._wakeup.clear()
                await self._wakeup.wait()
                self._idle = False
            await self._wait_to_fill()
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            self._last_batch = len(batch)
            task = asyncio.create_task(self._process(batch), name="batch")
            self._in_flight[task] = batch
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slots.release()

    def _must_wait(self) -> bool:
        """Whether the pending images should wait for more to join their batch.

        Not when the batch is full, nor when a batch-axis request is queued (see the module
        docstring), nor for a lone image while nothing suggests concurrent traffic (the
        previous batch was a single image and no batch is in flight): a client sending one
        request at a time would otherwise pay the whole delay on every request, for a batch
        that never comes.
        """
        if len(self._pending) >= self.max_batch_size or self._batch_axis_pending:
            return False
        return not (len(self._pending) == 1 and self._last_batch <= 1 and not self._in_flight)

    async def _wait_to_fill(self) -> None:
        """Until a batch is full, the oldest item's delay has passed, or waiting is pointless."""
        if self.max_delay_s <= 0 or not self._pending:
            return
        deadline = self._pending[0].enqueued + self.max_delay_s
        while self._pending and self._must_wait():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending[0]
            if batch and item.model is not batch[0].model and not item.future.done():
                break  # a hot reload happened between these two: next batch
            self._pending.popleft()
            self._batch_axis_pending -= item.batch_axis
            if not item.future.done():  # else its request gave up (timeout, disconnect)
                batch.append(item)
        return batch

    async def _decode(self, jobs: list[tuple[_Item, Decoder]]) -> None:
        """Decode in the pool, one chunk per thread; failures go to their own futures."""
        loop = asyncio.get_running_loop()
        size = math.ceil(len(jobs) / self._decode_threads)
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        results = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._decode_executor,
                    _decode_chunk,
                    [(decode, item.payload) for item, decode in chunk],
                )
                for chunk in chunks
            )
        )
        for chunk, outcomes in zip(chunks, results, strict=True):
            for (item, _), outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, DecodeApart):
                    if not item.future.done():
                        self._decode_apart(item, outcome.finish)
                elif isinstance(outcome, Exception):
                    if not item.future.done():
                        item.future.set_exception(outcome)
                else:
                    item.tensor = outcome

    def _decode_apart(self, item: _Item, finish: Callable[[], FloatArray]) -> None:
        """Decode one large image in the large-image thread; it is queued again, ready, for
        the next batch (without waiting for the delay: its request waited long enough)."""

        async def decode() -> None:
            loop = asyncio.get_running_loop()
            try:
                tensor = await loop.run_in_executor(self._large_executor, finish)
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
                return
            if item.future.done():
                return  # its request gave up meanwhile
            item.decode = None
            item.tensor = tensor
            item.decode_s = time.perf_counter() - item.started  # its batch's, then its own
            item.batch_axis = True
            self._batch_axis_pending += 1
            self._pending.appendleft(item)
            self._wakeup.set()

        task = asyncio.create_task(decode(), name="decode-apart")
        self._apart[task] = item
        task.add_done_callback(lambda done: self._apart.pop(done, None))

    async def _process(self, batch: list[_Item]) -> None:
        model = batch[0].model
        start = time.perf_counter()
        # Items decoded apart come back for inference with their wait and decode counted.
        fresh = [item for item in batch if not item.started]
        for item in fresh:
            item.started = start
            self._metrics.queue_time.observe(start - item.enqueued)
        jobs = [(item, item.decode) for item in batch if item.decode is not None]
        if jobs:
            await self._decode(jobs)
            decode_s = time.perf_counter() - start
            for item in fresh:
                item.decode_s = decode_s
        live: list[_Item] = []
        tensors: list[FloatArray] = []
        for item in batch:
            if item.tensor is not None and not item.future.done():
                live.append(item)
                tensors.append(item.tensor)
        if not live:
            return
        self._metrics.batch_size.observe(len(live))
        loop = asyncio.get_running_loop()
        try:
            logits, seconds = await loop.run_in_executor(
                self._infer_executor, _run_engine, model.engine, tensors
            )
        except Exception as exc:
            logger.exception("inference failed for a batch of %d on v%d", len(live), model.number)
            failure = InferenceFailed(f"inference failed on v{model.number}: {exc}")
            for item in live:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        self._metrics.inference_time.observe(seconds)
        for item, row in zip(live, logits, strict=True):
            item.infer_s = seconds
            if not item.future.done():
                item.future.set_result(row)
