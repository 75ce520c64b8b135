"""Which model version is served, and hot reload of newer ones.

:class:`ModelManager` holds the current :class:`LoadedModel`. Its poller looks at the repository
every ``poll_interval``; a newer version is verified, built and warmed up beside the current one
(in a worker thread, while the current one keeps serving) and then swapped in with a single
assignment, which is atomic for the event loop. Requests hold a reference to the model they
started with, so in-flight work finishes on the old version and it is freed afterwards.

A version that fails verification or warm-up is refused: one error line in the log, an entry in
:attr:`ModelManager.refused` (shown by ``/readyz``), and the current version keeps serving. It is
not retried: published versions are immutable, so a broken one stays broken; the next version
number will be tried as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from services.common.repository import list_versions
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

    async def load_initial(self) -> LoadedModel:
        """The pinned or newest version; any error propagates and stops the service."""
        loaded = await asyncio.to_thread(self._loader, self.pinned_version)
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
            self.refused[newest] = str(exc)
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
