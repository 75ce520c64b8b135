"""Timeouts, retries, circuit breaking and health state around one engine.

An :class:`EngineGuard` wraps a :class:`~services.gateway.backends.Backend`. A request first
meets the engine's :class:`~services.gateway.coalescing.Coalescer`, if it has one (the
predictor: concurrent requests merged into one call); one call then goes through, from the
outside in:

1. the circuit breaker (aiobreaker): after ``breaker_failures`` consecutive failures
   (unreachable, 5xx, timeout) the engine gets no traffic for ``breaker_reset_s``, then one
   trial; a caller's mistake (:class:`EngineRejected`) is not the engine's failure;
2. the deadline (``asyncio.timeout``): everything below, retries included, must finish in the
   engine's timeout, or the call fails with :class:`EngineTimeout` (the client gets 504);
3. retries (tenacity): only after :class:`ConnectFailed` (no connection, or it closed with no
   answer), bounded by ``retries`` and the deadline. Classification has no side effects, so a
   repeat cannot do harm; a timeout is never retried (the engine may still be working on it,
   and a slow engine is usually an overloaded one).

Health: a background poller (the app's lifespan) calls :meth:`EngineGuard.check` every
``health_interval_s``; a refused connection marks the engine down at once. An engine is
*available* when its last check passed and its breaker lets calls through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener
from aiobreaker import CircuitBreakerState as BreakerState
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from services.common.runtime import Precision
from services.gateway.backends import (
    Answer,
    Backend,
    BackendError,
    ConnectFailed,
    EncodedImage,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Readiness,
)
from services.gateway.coalescing import Coalescer
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import BackendName, GatewaySettings

logger = logging.getLogger(__name__)


class _BreakerLog(CircuitBreakerListener):  # type: ignore[misc]  # aiobreaker ships no types
    """Remembers when the breaker opened (monotonic clock) and logs every real change.

    aiobreaker tells its listeners about every ``open()``, also one that finds the breaker
    open already: each call that was in flight when the breaker opened and fails afterwards
    opens it again. Those restart the open period (so ``opened_at`` follows them) but are not
    a change of state, and logging them would give one line per failed call.
    """

    def __init__(self, guard: EngineGuard) -> None:
        self.guard = guard

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        state = getattr(new, "state", None)
        if state == BreakerState.OPEN:
            self.guard.opened_at = time.monotonic()
        previous = getattr(old, "state", None)
        if previous == state:
            return
        logger.warning(
            "circuit breaker of %s: %s -> %s",
            self.guard.name,
            getattr(previous, "name", "?"),
            getattr(state, "name", "?"),
        )


def _pause(seconds: float) -> Callable[[RetryCallState], Awaitable[None]]:
    """tenacity ``before`` hook: the wait before the first retry, which tenacity only
    inserts between its own attempts (the first attempt ran outside its loop)."""

    async def before(state: RetryCallState) -> None:
        if state.attempt_number == 1 and seconds > 0:
            await asyncio.sleep(seconds)

    return before


class EngineGuard:
    """One engine with its deadline, retries, breaker and readiness."""

    def __init__(self, backend: Backend, settings: GatewaySettings, metrics: GatewayMetrics):
        self.backend = backend
        self.name: BackendName = backend.name
        self.timeout_s = settings.timeout_for(backend.name)
        self.reset_s = settings.breaker_reset_s
        self.metrics = metrics
        self.ready = False
        self.detail = "not checked yet"
        self.health_timeouts = settings.health_timeouts
        #: Readiness checks in a row that timed out while the engine counted as ready.
        self.timeouts_in_a_row = 0
        #: The version the engine served at its last readiness check (None: unknown).
        self.version: str | None = None
        self.checked_at: float | None = None
        #: The published versions the engine refused, as its last readiness check reported.
        self.refused_versions: list[dict[str, Any]] = []
        self.opened_at = 0.0
        self.breaker = CircuitBreaker(
            fail_max=settings.breaker_failures,
            timeout_duration=timedelta(seconds=settings.breaker_reset_s),
            exclude=[EngineRejected],
            listeners=[_BreakerLog(self)],
            name=backend.name,
        )
        self.retries = settings.retries
        self.retry_backoff_s = settings.retry_backoff_s
        # Labelled children looked up once: .labels() costs more than the observation.
        self._ready_gauge = metrics.backend_ready.labels(self.name)
        self._ready_gauge.set(0)
        self._published: bool | None = None
        self._durations = {
            outcome: metrics.upstream_duration.labels(self.name, outcome)
            for outcome in ("ok", "rejected", "connect", "unavailable", "fault", "timeout")
        }
        coalesce_calls = settings.coalesce_calls_for(self.name)
        self.coalescer = (
            Coalescer(self.name, self.call, coalesce_calls, settings.max_images, self.timeout_s)
            if coalesce_calls
            else None
        )

    # --- state ---------------------------------------------------------------------------

    @property
    def breaker_state(self) -> str:
        state: BreakerState = self.breaker.current_state
        return str(state.name).lower()

    def _breaker_blocks(self) -> bool:
        return (
            self.breaker.current_state == BreakerState.OPEN
            and time.monotonic() - self.opened_at < self.reset_s
        )

    @property
    def available(self) -> bool:
        """Worth sending a request to: ready at the last check and not cut off by the breaker."""
        return self.ready and not self._breaker_blocks()

    def _set_ready(self, ready: bool, detail: str) -> None:
        if ready and not self.ready:
            logger.info("%s is ready: %s", self.name, detail)
            if self.breaker.current_state != BreakerState.CLOSED:
                # It was down and passes its readiness check again (restarted): let traffic
                # back at once instead of waiting out the breaker.
                self.breaker.close()
        elif not ready and self.ready:
            logger.warning("%s is not ready: %s", self.name, detail)
        self.ready = ready
        self.detail = detail
        self._publish()

    def _publish(self) -> None:
        available = self.available
        if available is not self._published:
            self._ready_gauge.set(1 if available else 0)
            self._published = available

    async def check(self) -> Readiness:
        """Ask the engine whether it is ready (never raises)."""
        try:
            readiness = await self.backend.check_ready()
        except Exception as exc:  # a probe must not kill the poller; the engine is not ready
            logger.exception("readiness check of %s failed", self.name)
            readiness = Readiness(False, f"check failed: {type(exc).__name__}")
        self.checked_at = time.time()
        if readiness.timed_out and self.ready:
            self.timeouts_in_a_row += 1
            if self.timeouts_in_a_row < self.health_timeouts:
                # Busy rather than down: it keeps its state (its calls still have the breaker).
                logger.info(
                    "%s: %s (%d in a row), still counted ready",
                    self.name,
                    readiness.detail,
                    self.timeouts_in_a_row,
                )
                return readiness
        else:
            self.timeouts_in_a_row = 0
        self.version = readiness.version if readiness.ready else None
        self.refused_versions = list(readiness.refused_versions)
        self._set_ready(readiness.ready, readiness.detail)
        return readiness

    def describe(self) -> dict[str, Any]:
        return {
            "ready": self.available,
            "detail": self.detail,
            "version": self.version,
            "breaker": self.breaker_state,
            "checked_at": self.checked_at,
            "refused_versions": self.refused_versions,
        }

    # --- calls ---------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel merged calls still in flight (shutdown)."""
        if self.coalescer is not None:
            self.coalescer.close()

    async def predict(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Answer:
        """The engine's answer, or a :class:`BackendError` saying what went wrong; merged with
        other requests' into one call under load when the engine coalesces (fp32 only: the
        int8 calls go out as they come, never mixed into an fp32 call)."""
        if self.coalescer is not None and precision == "fp32":
            return await self.coalescer.predict(images, top_k, request_id)
        return await self.call(images, top_k, request_id, precision)

    async def call(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Answer:
        """One engine call through the breaker, the deadline and retries, recorded once."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            answer: Answer = await self.breaker.call_async(
                self._call, images, top_k, request_id, precision
            )
            return answer
        except CircuitBreakerError as exc:
            if isinstance(exc.__cause__, BackendError):  # the failure that opened it
                outcome = exc.__cause__.kind
                raise exc.__cause__ from None
            outcome = "circuit_open"
            raise EngineUnavailable(
                f"{self.name}: circuit breaker open after repeated failures", "circuit_open"
            ) from None
        except BackendError as exc:
            outcome = exc.kind
            raise
        finally:
            self._record(outcome, time.perf_counter() - start)

    def _record(self, outcome: str, seconds: float) -> None:
        if outcome != "circuit_open":  # nothing was sent: not an upstream call
            histogram = self._durations.get(outcome)
            if histogram is None:
                histogram = self.metrics.upstream_duration.labels(self.name, outcome)
            histogram.observe(seconds)
        if outcome not in ("ok", "rejected"):
            self.metrics.upstream_errors.labels(self.name, outcome).inc()
        if outcome == "connect":
            self._set_ready(False, "unreachable (seen by a request)")
        else:
            self._publish()  # the breaker may have changed

    async def _call(
        self, images: Sequence[EncodedImage], top_k: int, request_id: str, precision: Precision
    ) -> Answer:
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    return await self.backend.predict(images, top_k, request_id, precision)
                except ConnectFailed:
                    if not self.retries:
                        raise
                # Only now build the retry loop: the first attempt, nearly every request,
                # pays nothing for it.
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(self.retries),
                    # backoff before the first retry (the hook), then 2x, 4x ... backoff
                    wait=wait_exponential(multiplier=2 * self.retry_backoff_s, max=1.0),
                    retry=retry_if_exception_type(ConnectFailed),
                    before=_pause(self.retry_backoff_s),
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        return await self.backend.predict(images, top_k, request_id, precision)
        except TimeoutError:
            raise EngineTimeout(f"{self.name} did not answer within {self.timeout_s:g}s") from None
        raise AssertionError("unreachable")  # pragma: no cover  (reraise=True)
