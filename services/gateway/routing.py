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
* ``?precision=int8`` asks for the version's int8 model (``fp32``, the default, for the
  other): the predictor and Triton serve it as ``<model>_int8_ensemble``, TorchServe not at
  all. An engine that cannot serve it answers 409 ``precision_unavailable``; it is not failed
  over to an fp32 answer, nor to another engine (the caller asked for int8, and the other
  engines' int8 is the same published model). In compare mode ``precision=both`` asks every
  engine at both precisions and reports, per engine, the share of images whose int8 top-1
  equals its fp32 top-1 (``precision_agreement``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from services.common.errors import BadRequest, ServiceError, Timeout, Unavailable
from services.common.runtime import Precision
from services.gateway.backends import (
    Answer,
    BackendError,
    EncodedImage,
    EngineRejected,
    EngineTimeout,
    precision_unavailable,
)
from services.gateway.metrics import ALL_BACKENDS, GatewayMetrics
from services.gateway.resilience import EngineGuard
from services.gateway.settings import BackendName, GatewaySettings

#: ``?precision=both``: compare mode at every precision.
BOTH = "both"
#: What ``?precision=`` may say: a precision, or (compare mode only) both.
Requested = Precision | Literal["both"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def parse_precision(value: str | None, *, compare: bool) -> Requested:
    """``?precision=`` checked: fp32 when absent; ``both`` only in compare mode."""
    if value is None:
        return "fp32"
    allowed: tuple[str, ...] = (*PRECISIONS, BOTH) if compare else PRECISIONS
    for name in allowed:
        if value == name:
            return name  # type: ignore[return-value]  # one of the literals, by the loop
    hint = "" if compare or value != BOTH else " (both is for ?backend=all)"
    raise BadRequest(
        f"unknown precision {value!r}; use one of: {', '.join(allowed)}{hint}",
        "unknown_precision",
    )


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

    def choose(self, requested: str | None, precision: Precision = "fp32") -> BackendName:
        """The engine a request is meant for (before failover). Not named by the caller, it
        is one that serves ``precision`` at all (the first in ``backends`` order when the
        default or the drawn one does not)."""
        chosen = self._choose(requested)
        if requested is None and precision not in self.guards[chosen].backend.precisions:
            able = [n for n, g in self.guards.items() if precision in g.backend.precisions]
            if able:
                return able[0]
        return chosen

    def _choose(self, requested: str | None) -> BackendName:
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
        self,
        chosen: BackendName,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Served:
        """The first available candidate's answer; see the module docstring for the rules."""
        skipped: list[str] = []
        reasons: list[str] = []
        last: str | None = None
        candidates = self.candidates(chosen)
        if precision != "fp32":
            # Only engines that can serve it at all; the chosen one must (409 otherwise).
            able = [g for g in candidates if precision in g.backend.precisions]
            if not able or able[0].name != chosen:
                raise RoutingError(
                    EngineRefusedInput(
                        precision_unavailable(f"{chosen} does not serve {precision}")
                    ),
                    chosen,
                )
            candidates = able
        for guard in candidates:
            if not guard.available:
                skipped.append(guard.name)
                reasons.append(
                    f"{guard.name}: not ready ({guard.detail}; breaker {guard.breaker_state})"
                )
                continue
            last = guard.name
            try:
                answer = await guard.predict(images, top_k, request_id, precision)
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
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        *,
        single: bool,
        precision: Requested = "fp32",
    ) -> tuple[int, dict[str, Any]]:
        """Every engine's answer to the same images: (HTTP status, body). ``single``: the
        request used the ``image`` form, so each engine's ``predictions`` is one flat list.
        ``precision`` ``both``: a row per engine and precision (see the module docstring)."""
        precisions = PRECISIONS if precision == BOTH else (cast(Precision, precision),)
        results = await asyncio.gather(
            *(
                self._compare_one(g, images, top_k, request_id, single, p)
                for g in self.guards.values()
                for p in precisions
            )
        )
        answered = [r for r in results if r["status"] == 200]
        agree = self._compare_labels(answered)
        versions = {r["backend"]: r["version"] for r in answered if r["precision"] == "fp32"}
        versions.update(
            (r["backend"], r["version"]) for r in answered if r["backend"] not in versions
        )
        mismatch = len(set(versions.values())) > 1
        if mismatch:
            self.metrics.version_mismatches.inc()
        self.metrics.compare.labels(
            "incomplete" if agree is None else "agree" if agree else "disagree"
        ).inc()
        body: dict[str, Any] = {
            "model": self.settings.model,
            "backend": ALL_BACKENDS,
            "precision": precision,
            "agree": agree,
            "versions": versions,
            "version_mismatch": mismatch,
            "answered": [r["backend"] for r in answered],
            "results": results,
        }
        if precision == BOTH:
            body["precision_agreement"] = precision_agreement(answered)
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
        model version at the same precision (a new version, or int8, may rightly answer
        differently); sets each answer's ``agrees`` (None for an engine alone on its version
        and precision). None when no two answering engines served the same one."""
        by_version: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for result in answered:
            by_version.setdefault((result["version"], result["precision"]), []).append(result)
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
        precision: Precision,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"backend": guard.name, "precision": precision}
        if precision not in guard.backend.precisions:
            error = EngineRefusedInput(
                precision_unavailable(f"{guard.name} does not serve {precision}")
            )
            result.update(
                status=error.status_code, error=error.message, code=error.code, latency_ms=None
            )
            return result
        if not guard.available:
            result.update(
                status=503, error=f"not ready: {guard.detail}", code="not_ready", latency_ms=None
            )
            return result
        start = time.perf_counter()
        try:
            answer = await guard.predict(images, top_k, request_id, precision)
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


def precision_agreement(answered: list[dict[str, Any]]) -> dict[str, float]:
    """Per engine that answered at both precisions on the same version: the share of images
    whose int8 top-1 label equals its fp32 top-1 label (what publish's gate measured on the
    held-out split, here on the caller's images)."""
    rows = {(r["backend"], r["precision"]): r for r in answered}
    shares: dict[str, float] = {}
    for (backend, precision), fp32 in rows.items():
        int8 = rows.get((backend, "int8"))
        if precision != "fp32" or int8 is None or int8["version"] != fp32["version"]:
            continue
        pairs = list(zip(fp32["top1"], int8["top1"], strict=True))
        shares[backend] = sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0
    return shares
