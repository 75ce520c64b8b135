"""Client traffic through the local stack's gateway, for the tests that change the stack under
load (engines killed, versions published and reloaded) and then count what the clients saw.

Every answer other than a 200, and every transport error, is a failure and is kept with its
text; a 200 that the gateway failed over to another engine (``X-Failover-From``) is no failure
for the client but is kept apart, so a test can say which engine could not answer.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import LocalStack
from tests.stack.test_local_stack import BACKENDS

#: ``?backend=all``: every engine answers the same image (compare mode).
COMPARE = "all"


@dataclass(frozen=True)
class Answer:
    """One engine's answer: when its request was sent (``time.monotonic()``), the engine
    asked (``all/<engine>`` for one row of a compare answer) and the version it named."""

    sent: float
    backend: str
    version: str


@dataclass
class Traffic:
    """``threads`` clients, each sending one digit after another through the gateway to each of
    ``backends`` in turn (a client starts at its own place in that rotation), until the block
    ends. A compare answer counts as failed for each engine whose row is not a 200."""

    stack: LocalStack
    images: list[bytes]
    threads: int = 1
    backends: Sequence[str] = BACKENDS
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    answers: list[Answer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _record(
        self,
        failures: Sequence[str],
        failovers: Sequence[str] = (),
        answers: Sequence[Answer] = (),
    ) -> None:
        with self._lock:
            self.failures.extend(failures)
            self.failovers.extend(failovers)
            self.answers.extend(answers)
            self.versions.update(a.version for a in answers)
            self.answered += 1

    def _one(self, client: httpx.Client, backend: str, image: bytes) -> None:
        body = {"image": base64.b64encode(image).decode()}
        sent = time.monotonic()
        try:
            response = client.post(
                f"{self.stack.gateway_url}/predict", params={"backend": backend}, json=body
            )
        except httpx.HTTPError as exc:
            self._record([f"{backend}: {exc!r}"])
            return
        if response.status_code != 200:
            self._record([f"{backend}: {response.status_code} {response.text}"])
            return
        payload: dict[str, Any] = response.json()
        if backend != COMPARE:
            skipped = response.headers.get("x-failover-from")
            failovers = [f"{backend}: failed over from {skipped}"] if skipped else []
            self._record([], failovers, [Answer(sent, backend, str(payload["version"]))])
            return
        failures: list[str] = []
        answers: list[Answer] = []
        for row in payload["results"]:
            if row["status"] == 200:
                answers.append(Answer(sent, f"{COMPARE}/{row['backend']}", str(row["version"])))
            else:
                failures.append(f"{COMPARE}/{row['backend']}: {row['status']} {row}")
        self._record(failures, [], answers)

    def _send(self, start: int) -> None:
        rotation = itertools.islice(itertools.cycle(self.backends), start, None)
        with httpx.Client(timeout=30) as client:
            for count, backend in enumerate(rotation):
                if self._stop.is_set():
                    return
                self._one(client, backend, self.images[(start + count) % len(self.images)])

    def answers_since(self, moment: float, backend: str) -> list[Answer]:
        """The answers of ``backend`` to requests sent after ``moment``."""
        with self._lock:
            return [a for a in self.answers if a.backend == backend and a.sent > moment]

    def __enter__(self) -> Traffic:
        for index in range(self.threads):
            worker = threading.Thread(target=self._send, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        assert not any(worker.is_alive() for worker in self._workers)
