"""Which model version is served, and hot reload of newer ones.

:class:`ModelManager` holds the current :class:`LoadedModel`. Its poller looks at the repository
every ``poll_interval``; a newer version is verified, built and warmed up beside the current one
(in a worker thread, while the current one keeps serving) and then swapped in with a single
assignment, which is atomic for the event loop. Requests hold a reference to the model they
started with, so in-flight work finishes on the old version and it is freed afterwards.

A version that fails verification or warm-up is refused: one error line in the log, an entry in
:attr:`ModelManager.refused` (shown by ``/readyz``, counted by ``predictor_refused_versions``),
and the current version keeps serving. It is not retried: published versions are immutable, so a
broken one stays broken; the next version number will be tried as usual.

At start-up the same rule holds: unless a version is pinned, the manager walks the versions
newest first (:func:`services.common.repository.newest_valid`) and serves the first that loads,
the newer ones refused. A version that went bad after publishing is then no outage on the next
restart; only when every version is refused does the service stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from services.common.repository import (
    RefusedVersion,
    list_versions,
    newest_valid,
    relative_to_repository,
)
from services.common.runtime import LoadedModel
from services.predictor.metrics import PredictorMetrics

logger = logging.getLogger(__name__)

#: Loads and warms up one version (None: the newest); raises on any failure.
Loader = Callable[[int | None], LoadedModel]


class ModelManager:
    def __init__(
        self,
        repo: Path,
        model: str,
        loader: Loader,
        metrics: PredictorMetrics,
        pinned_version: int | None = None,
    ) -> None:
        self.repo = repo
        self.model = model
        self._loader = loader
        self._metrics = metrics
        self.pinned_version = pinned_version
        self._current: LoadedModel | None = None
        self.refused: dict[int, str] = {}
        #: Called with every version swapped in (the batcher follows its serving config).
        self.on_swap: Callable[[LoadedModel], None] | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def _swap(self, loaded: LoadedModel) -> None:
        previous = self._current
        self._current = loaded
        self._metrics.model_version.set(loaded.number)
        if self.on_swap is not None:
            self.on_swap(loaded)
        if previous is not None:
            logger.info("now serving %s v%d (was v%d)", self.model, loaded.number, previous.number)

    def _refuse(self, version: int, reason: str) -> None:
        self.refused[version] = reason
        self._metrics.refused_versions.set(len(self.refused))

    def refused_versions(self) -> list[RefusedVersion]:
        """Every version this server refused (at start-up or on reload), newest first."""
        return [RefusedVersion(v, self.refused[v]) for v in sorted(self.refused, reverse=True)]

    async def load_initial(self) -> LoadedModel:
        """The pinned version, or else the newest version that loads (newer ones that fail are
        refused). Raises when the pinned one fails, or when every version does (a
        :class:`~services.common.repository.NoValidVersion` naming each reason): the service
        stops."""
        if self.pinned_version is not None:
            loaded = await asyncio.to_thread(self._loader, self.pinned_version)
        else:
            # Any failure refuses the version, as in check_once: sha256, a file torch or ORT
            # cannot parse, a serving config this server cannot hold.
            chosen = await asyncio.to_thread(
                newest_valid, self.repo, self.model, self._loader, (Exception,)
            )
            for refusal in chosen.refused:
                self._refuse(refusal.version, refusal.reason)
            loaded = chosen.loaded
        self._swap(loaded)
        return loaded

    async def check_once(self) -> bool:
        """Load a newer version if there is one; True when the served version changed."""
        current = self._current
        if current is None or self.pinned_version is not None:
            return False
        versions = await asyncio.to_thread(list_versions, self.repo, self.model)
        candidates = [v for v in versions if v > current.number and v not in self.refused]
        if not candidates:
            return False
        newest = candidates[-1]
        try:
            loaded = await asyncio.to_thread(self._loader, newest)
        except Exception as exc:
            # Whatever went wrong (sha256, a file torch or ORT cannot parse, a wrong output
            # shape), the rule is the same: refuse it and keep serving what works.
            self._refuse(newest, relative_to_repository(str(exc), self.repo))
            self._metrics.reloads.labels("refused").inc()
            logger.error(
                "refused %s v%d, still serving v%d: %s", self.model, newest, current.number, exc
            )
            return False
        self._metrics.reloads.labels("loaded").inc()
        self._swap(loaded)
        return True

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check_once()
            except Exception:
                # Listing the repository failed (e.g. it is being replaced): try again later.
                logger.exception("checking %s for new versions failed", self.repo)
