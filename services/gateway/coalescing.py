"""Concurrent predictor requests merged into one call (one tensor of their images) under load.

Up to ``max_calls`` calls go out at once; requests that arrive while they are busy wait and
leave together as one call of all their images when one returns (no added delay when the
engine keeps up), and each caller gets its own slice of the answer back. That spends the
predictor's per-request HTTP work once per batch instead of once per image, which is what a
gateway in front of it otherwise costs.

A :class:`Coalescer` sits between a caller and one guarded call
(:meth:`~services.gateway.resilience.EngineGuard.call`): a merged call is one engine call to the
breaker, the deadline and the upstream metrics, however many requests ride on it. A waiting
request is bounded by its own deadline, queueing included.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.gateway.backends import Answer, EncodedImage, EngineRejected, EngineTimeout

#: One engine call: (images, top_k, request id) -> the answer for all of them.
Call = Callable[[Sequence[EncodedImage], int, str], Awaitable[Answer]]


@dataclass(slots=True)
class _Waiting:
    """A request queued while ``max_calls`` calls are in flight."""

    images: Sequence[EncodedImage]
    top_k: int
    request_id: str
    future: asyncio.Future[Answer]


class Coalescer:
    """Merges requests for ``call`` (see the module docstring)."""

    def __init__(
        self, name: str, call: Call, max_calls: int, max_images: int, timeout_s: float
    ) -> None:
        self.name = name
        self.call = call
        self.max_calls = max_calls
        self.max_images = max_images
        self.timeout_s = timeout_s
        self._calls = 0
        self._waiting: deque[_Waiting] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def predict(self, images: Sequence[EncodedImage], top_k: int, request_id: str) -> Answer:
        if self._calls < self.max_calls and not self._waiting:
            self._calls += 1
            try:
                return await self.call(images, top_k, request_id)  # its own deadline applies
            finally:
                self._calls -= 1
                self._start_next()
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(images, top_k, request_id, future))
        self._start_next()
        try:
            async with asyncio.timeout(self.timeout_s):  # queueing counts against the deadline
                return await future
        except TimeoutError:
            raise EngineTimeout(f"{self.name} did not answer within {self.timeout_s:g}s") from None

    def _start_next(self) -> None:
        """Send the waiting requests (one `top_k` at a time) as one call, if a slot is free."""
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()  # its caller gave up (timeout, disconnect)
        if not self._waiting or self._calls >= self.max_calls:
            return
        top_k = self._waiting[0].top_k
        group: list[_Waiting] = []
        count = 0
        for waiting in list(self._waiting):
            if waiting.top_k != top_k or waiting.future.done():
                continue
            if group and count + len(waiting.images) > self.max_images:
                break
            group.append(waiting)
            count += len(waiting.images)
            self._waiting.remove(waiting)
        self._calls += 1
        task = asyncio.create_task(self._run_group(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_group(self, group: list[_Waiting]) -> None:
        try:
            images = [image for waiting in group for image in waiting.images]
            try:
                answer = await self.call(images, group[0].top_k, group[0].request_id)
            except EngineRejected:
                if len(group) == 1:
                    raise
                # One bad image spoils a merged call: ask again request by request, so only
                # its own request gets the 4xx.
                results = await asyncio.gather(
                    *(self.call(w.images, w.top_k, w.request_id) for w in group),
                    return_exceptions=True,
                )
                for waiting, result in zip(group, results, strict=True):
                    if waiting.future.done():
                        continue
                    if isinstance(result, BaseException):
                        waiting.future.set_exception(result)
                    else:
                        waiting.future.set_result(result)
                return
            start = 0
            for waiting in group:
                end = start + len(waiting.images)
                if not waiting.future.done():
                    waiting.future.set_result(
                        Answer(answer.model, answer.version, answer.predictions[start:end])
                    )
                start = end
        except Exception as exc:  # every member fails the way a lone call would
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        finally:
            self._calls -= 1
            self._start_next()
