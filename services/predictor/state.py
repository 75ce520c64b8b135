"""What the lifespan builds and the routes use, reached through one FastAPI dependency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from services.common.errors import (
    Overloaded,
    ServiceError,
    Timeout,
    Unavailable,
)
from services.common.imaging import ImageDecodeError
from services.common.runtime import FloatArray, LoadedModel
from services.predictor.batcher import (
    BatcherClosed,
    Decoder,
    DynamicBatcher,
    InferenceFailed,
    ItemFailed,
    QueueFull,
    RequestTiming,
)
from services.predictor.metrics import PredictorMetrics
from services.predictor.reloader import ModelManager
from services.predictor.settings import PredictorSettings
from services.predictor.statistics import InferenceStatistics

T = TypeVar("T")


class InferenceError(ServiceError):
    """The engine failed on a valid input: a server fault, reported as such."""

    status_code = 500
    code = "inference_failed"


@dataclass
class PredictorState:
    settings: PredictorSettings
    metrics: PredictorMetrics
    manager: ModelManager
    batcher: DynamicBatcher
    decode_pool: ThreadPoolExecutor
    ready: bool = False
    background: list[asyncio.Task[None]] = field(default_factory=list)
    statistics: InferenceStatistics = field(default_factory=InferenceStatistics)

    def model(self) -> LoadedModel:
        """The version new requests use (a request keeps it to the end, across reloads)."""
        current = self.manager.current
        if current is None or not self.ready:
            raise Unavailable("the model is not loaded yet", "not_ready")
        return current

    async def in_decode_pool(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, func, *args)

    async def classify(
        self,
        model: LoadedModel,
        payloads: Sequence[object],
        decode: Decoder | None = None,
        what: str = "images",
        batch_axis: bool = False,
        timing: RequestTiming | None = None,
    ) -> FloatArray:
        """Logits through the batcher (``batch_axis``: see :mod:`~services.predictor.batcher`),
        its failures translated to HTTP errors.

        A payload that fails to decode is the caller's mistake (4xx naming its index when the
        request had several); anything else that fails an item is re-raised as it is.
        """
        try:
            return await self.batcher.infer(model, payloads, decode, batch_axis, timing)
        except ItemFailed as failed:
            if isinstance(failed.error, ImageDecodeError):
                where = f"{what}[{failed.index}]: " if len(payloads) > 1 else ""
                raise image_error(failed.error, where) from None
            raise failed.error from None
        except QueueFull as exc:
            raise Overloaded(
                str(exc), headers={"Retry-After": str(self.settings.retry_after_s)}
            ) from None
        except BatcherClosed as exc:
            raise Unavailable(str(exc), "shutting_down") from None
        except InferenceFailed as exc:
            raise InferenceError(str(exc)) from None

    def deadline(self) -> Deadline:
        """The request timeout: 504 instead of waiting forever behind a stuck batch."""
        return Deadline(self.settings.request_timeout_s)


class Deadline:
    """``asyncio.timeout`` that raises the 504 error. A class, not ``@asynccontextmanager``:
    it is entered on every request, and the generator version costs several times more."""

    __slots__ = ("_seconds", "_timeout")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._timeout = asyncio.timeout(seconds)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            raise Timeout(f"no answer within {self._seconds:g}s", "timeout") from None


def image_error(exc: ImageDecodeError, where: str = "") -> ImageDecodeError:
    """A decoding failure of one image of several, its message prefixed with which one (the
    status stays the error's own: 413 for too many pixels, 400 for the rest)."""
    return ImageDecodeError(where + exc.message, exc.code) if where else exc


def get_state(request: Request) -> PredictorState:
    state: PredictorState | None = getattr(request.app.state, "predictor", None)
    if state is None:
        raise Unavailable("the predictor is starting", "not_ready")
    return state


async def _state_dependency(request: Request) -> PredictorState:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, one hop per request.
    return get_state(request)


StateDep = Annotated[PredictorState, Depends(_state_dependency)]
