"""Which engine answers: explicit choice, weighted split, failover, and compare mode.

* ``?backend=<name>`` picks the engine; without it the default engine answers, or, when
  ``weights`` are set, one drawn by weight (a canary split).
* Failover (on by default): when the chosen engine is unavailable (failed its last readiness
  check, refused, answered 5xx, or its circuit is open) the next available engine in
  ``backends`` order answers, and the answer names it. A caller's mistake is not failed over
  (every engine would refuse the same image), and neither is a timeout: the client's time is
  spent, and an engine that is slow is usually overloaded, so sending the work elsewhere too
  would spread the overload. Repeated timeouts open the breaker, after which requests fail
  over at once.
* ``?backend=all`` sends the request to every available engine at once and reports each answer
  with its latency and model version, and whether its top-1 labels agree with those of the
  engines serving the same version; engines on different versions are reported
  (``version_mismatch``, ``gateway_compare_version_mismatches_total``), not compared.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import BadRequest, ServiceError, Timeout, Unavailable
from services.gateway.backends import (
    Answer,
    BackendError,
    EncodedImage,
    EngineRejected,
    EngineTimeout,
)
from services.gateway.metrics import ALL_BACKENDS, GatewayMetrics
from services.gateway.resilience import EngineGuard
from services.gateway.settings import BackendName, GatewaySettings


class EngineRefusedInput(ServiceError):
    """An engine refused the image as the caller's mistake; its status and code pass through."""

    def __init__(self, exc: EngineRejected) -> None:
        super().__init__(exc.message, exc.code)
        self.status_code = exc.status if 400 <= exc.status < 500 else 400


class RoutingError(ServiceError):
    """No engine answered; ``backend`` is the last one tried (for the X-Backend header)."""

    def __init__(self, error: ServiceError, backend: str | None) -> None:
        super().__init__(error.message, error.code, error.headers)
        self.status_code = error.status_code
        self.backend = backend


@dataclass
class Served:
    """The answer to a routed request and who gave it."""

    answer: Answer
    backend: BackendName
    skipped: list[str] = field(default_factory=list)


class Router:
    def __init__(
        self,
        settings: GatewaySettings,
        guards: dict[BackendName, EngineGuard],
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.guards = guards
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._weighted = [(name, w) for name, w in settings.weights.items() if w > 0]

    def choose(self, requested: str | None) -> BackendName:
        """The engine a request is meant for (before failover)."""
        if requested is not None:
            for name in self.guards:
                if name == requested:
                    return name
            known = ", ".join([*self.guards, ALL_BACKENDS])
            raise BadRequest(
                f"unknown backend {requested!r}; use one of: {known}", "unknown_backend"
            )
        if self._weighted:
            names = [name for name, _ in self._weighted]
            weights = [weight for _, weight in self._weighted]
            return self.rng.choices(names, weights)[0]
        return self.settings.default_backend

    def candidates(self, chosen: BackendName) -> list[EngineGuard]:
        if not self.settings.failover:
            return [self.guards[chosen]]
        return [self.guards[chosen]] + [g for n, g in self.guards.items() if n != chosen]

    async def predict(
        self, chosen: BackendName, images: Sequence[EncodedImage], top_k: int, request_id: str
    ) -> Served:
        """The first available candidate's answer; see the module docstring for the rules."""
        skipped: list[str] = []
        reasons: list[str] = []
        last: str | None = None
        for guard in self.candidates(chosen):
            if not guard.available:
                skipped.append(guard.name)
                reasons.append(
                    f"{guard.name}: not ready ({guard.detail}; breaker {guard.breaker_state})"
                )
                continue
            last = guard.name
            try:
                answer = await guard.predict(images, top_k, request_id)
            except EngineRejected as exc:
                raise RoutingError(EngineRefusedInput(exc), guard.name) from None
            except EngineTimeout as exc:
                raise RoutingError(Timeout(exc.message, "timeout"), guard.name) from None
            except BackendError as exc:  # unavailable: try the next one
                skipped.append(guard.name)
                reasons.append(exc.message)
                continue
            if guard.name != chosen:
                self.metrics.failovers.labels(chosen, guard.name).inc()
            return Served(answer, guard.name, skipped)
        what = "no engine could answer" if self.settings.failover else f"{chosen} cannot answer"
        raise RoutingError(
            Unavailable(f"{what}: " + "; ".join(reasons), "no_backend_available"), last
        )

    async def compare(
        self, images: Sequence[EncodedImage], top_k: int, request_id: str, *, single: bool
    ) -> tuple[int, dict[str, Any]]:
        """Every engine's answer to the same images: (HTTP status, body). ``single``: the
        request used the ``image`` form, so each engine's ``predictions`` is one flat list."""
        results = await asyncio.gather(
            *(self._compare_one(g, images, top_k, request_id, single) for g in self.guards.values())
        )
        answered = [r for r in results if r["status"] == 200]
        agree = self._compare_labels(answered)
        versions = {r["backend"]: r["version"] for r in answered}
        mismatch = len(set(versions.values())) > 1
        if mismatch:
            self.metrics.version_mismatches.inc()
        self.metrics.compare.labels(
            "incomplete" if agree is None else "agree" if agree else "disagree"
        ).inc()
        body: dict[str, Any] = {
            "model": self.settings.model,
            "backend": ALL_BACKENDS,
            "agree": agree,
            "versions": versions,
            "version_mismatch": mismatch,
            "answered": [r["backend"] for r in answered],
            "results": results,
        }
        if answered:
            return 200, body
        # Nobody answered. Engines that refused the image say it is the caller's (4xx); else a
        # timeout is a 504 and anything else a 503, as for a routed request.
        called = [r for r in results if r["code"] != "not_ready"]
        first = (called or results)[0]
        if called and all(400 <= r["status"] < 500 for r in called):
            status = first["status"]
        elif any(r["status"] == 504 for r in called):
            status = 504
        else:
            status = 503
        body.update(error=f"no engine answered; first error: {first['error']}", code=first["code"])
        return status, body

    def _compare_labels(self, answered: list[dict[str, Any]]) -> bool | None:
        """Whether the top-1 labels agree, compared only between engines that served the same
        model version (a new version may rightly answer differently); sets each answer's
        ``agrees`` (None for an engine alone on its version). None when no two answering
        engines served the same version."""
        by_version: dict[str, list[dict[str, Any]]] = {}
        for result in answered:
            by_version.setdefault(result["version"], []).append(result)
        agree: bool | None = None
        for group in by_version.values():
            if len(group) < 2:
                group[0]["agrees"] = None
                continue
            reference = next(
                (r for r in group if r["backend"] == self.settings.default_backend), group[0]
            )
            for result in group:
                result["agrees"] = result["top1"] == reference["top1"]
            agree = (agree is not False) and all(r["agrees"] for r in group)
        return agree

    async def _compare_one(
        self,
        guard: EngineGuard,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        single: bool,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"backend": guard.name}
        if not guard.available:
            result.update(
                status=503, error=f"not ready: {guard.detail}", code="not_ready", latency_ms=None
            )
            return result
        start = time.perf_counter()
        try:
            answer = await guard.predict(images, top_k, request_id)
        except EngineRejected as exc:
            error = EngineRefusedInput(exc)
            result.update(status=error.status_code, error=error.message, code=error.code)
        except EngineTimeout as exc:
            result.update(status=504, error=exc.message, code="timeout")
        except BackendError as exc:
            result.update(status=503, error=exc.message, code=exc.code)
        else:
            result.update(
                status=200,
                model=answer.model,
                version=answer.version,
                top1=[preds[0]["label"] if preds else None for preds in answer.predictions],
                predictions=answer.predictions[0] if single else answer.predictions,
            )
        result["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
        return result
