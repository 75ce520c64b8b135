"""The local tritonserver follows new versions without a restart (explicit model control).

A real server on a copy of the session's repository: a new version is loaded through Triton's
repository API while three clients keep sending requests; a version whose file fails its sha256
is refused before anything changes, and one that passes its sha256 but cannot be loaded is
refused by Triton itself, after which the launcher puts the served version's repository back.
No request may fail, and every answer must name a version that was served (never a refused
one), the old one until the switch, the new one after. The requests ask for classification
strings: for those, Triton's HTTP frontend looks the answering ensemble version up again when it
writes the answer, which fails with 503 when that version was unloaded meanwhile (what the
reload used to do).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.common.repository import version_dir
from services.triton.launcher import LocalTriton, Reloaded
from services.triton.protocol import (
    LOGITS_OUTPUT,
    REFUSED_VERSIONS_PARAMETER,
    binary_infer_request,
)
from tests.conftest import PublishedModel
from tests.processes import free_ports, processes_naming
from training.publish import publish_checkpoint

pytestmark = pytest.mark.slow

#: Clients sending requests at once while the server reloads.
CLIENTS = 3


@pytest.fixture(scope="module")
def triton(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTriton]:
    from services.triton.settings import TritonSettings

    base = tmp_path_factory.mktemp("triton-reload")
    http, grpc, metrics = free_ports(3)
    settings = TritonSettings(
        repository=published_model.copy_repository(base),
        model=published_model.model,
        run_dir=base / "run",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        torchscript_twin=False,  # the ONNX twin, preprocess and the ensemble suffice here
    )
    launcher = LocalTriton(settings)
    launcher.start()
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()
    assert not processes_naming(base / "run")


def infer(client: httpx.Client, triton: LocalTriton, image: bytes) -> tuple[int, str]:
    body, headers = binary_infer_request([image], 10)
    url = f"http://{triton.settings.http_url}/v2/models/{triton.settings.ensemble}/infer"
    reply = client.post(url, content=body, headers=headers)
    if reply.status_code != 200:
        return reply.status_code, reply.text
    answer = reply.json()
    assert any(o["name"] == LOGITS_OUTPUT for o in answer["outputs"])
    return 200, str(answer["model_version"])


@dataclass(frozen=True)
class Answer:
    """One request a client sent during the test: when it was sent and answered (monotonic
    seconds), its HTTP status, and the ensemble version it names (or the error text)."""

    sent: float
    answered: float
    status: int
    text: str


class Clients:
    """``count`` threads, each sending one-image requests to the ensemble back to back until
    stopped, every answer kept (per thread, in order) for the checks after the reloads."""

    def __init__(self, triton: LocalTriton, images: list[bytes], count: int) -> None:
        self.answers: list[list[Answer]] = [[] for _ in range(count)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(triton, images, i), daemon=True)
            for i in range(count)
        ]

    def _loop(self, triton: LocalTriton, images: list[bytes], index: int) -> None:
        with httpx.Client(timeout=60) as client:
            sent = 0
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status, text = infer(client, triton, images[(sent + index) % len(images)])
                except httpx.HTTPError as exc:  # a refused or dropped connection is a failure
                    status, text = 0, repr(exc)
                self.answers[index].append(Answer(started, time.monotonic(), status, text))
                sent += 1

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def all(self) -> list[Answer]:
        return [answer for answers in self.answers for answer in answers]

    def count(self) -> int:
        return sum(len(answers) for answers in self.answers)

    def wait_for(self, more: int, timeout_s: float = 60.0) -> None:
        """Block until the clients have sent ``more`` requests beyond those sent so far."""
        target = self.count() + more
        deadline = time.monotonic() + timeout_s
        while self.count() < target:
            assert time.monotonic() < deadline, f"the clients sent under {more} requests"
            time.sleep(0.05)


def step_versions(client: httpx.Client, triton: LocalTriton) -> list[str]:
    """The versions the loaded ensemble's steps are pinned to (its config, as Triton has it)."""
    url = f"http://{triton.settings.http_url}/v2/models/{triton.settings.ensemble}/config"
    steps = client.get(url).json()["ensemble_scheduling"]["step"]
    return [str(step["model_version"]) for step in steps]


def refused_parameter(client: httpx.Client, triton: LocalTriton) -> dict[int, str]:
    """The served classifier's ``refused_versions`` (what the gateway's /readyz reports)."""
    url = f"http://{triton.settings.http_url}/v2/models/{triton.settings.model}/config"
    parameter = client.get(url).json()["parameters"][REFUSED_VERSIONS_PARAMETER]
    return {r["version"]: r["reason"] for r in json.loads(parameter["string_value"])}


def twin_versions(triton: LocalTriton, model: str) -> list[str]:
    return sorted(p.name for p in (triton.repository / model).iterdir() if p.name.isdigit())


def test_a_new_version_is_loaded_under_traffic_and_bad_ones_are_refused(
    triton: LocalTriton, published_model: PublishedModel, trained_checkpoint: Path
) -> None:
    repo = triton.settings.repository
    windows: list[tuple[float, float]] = []  # when each reload ran

    def reload() -> Reloaded:
        started = time.monotonic()
        try:
            return triton.reload()
        finally:
            windows.append((started, time.monotonic()))

    with Clients(triton, published_model.images[:8], CLIENTS) as clients:
        clients.wait_for(CLIENTS * 5)  # every client is answered before the first reload
        new = publish_checkpoint(trained_checkpoint, repo)
        result = reload()
        assert (result.version, result.before, result.refused) == (new, new - 1, {})
        switched = time.monotonic()
        with httpx.Client(timeout=30) as client:
            assert triton.served_version(client) == new
            assert infer(client, triton, published_model.images[0]) == (200, str(new))
            assert step_versions(client, triton) == [str(new), str(new)]

        # Passes its sha256 (the manifest is rewritten to match) but is no ONNX model.
        unloadable = publish_checkpoint(trained_checkpoint, repo)
        folder = version_dir(repo, triton.settings.model, unloadable)
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        onnx = repo / manifest["artifacts"]["onnx"]["path"]
        onnx.write_bytes(b"not an onnx model")
        manifest["artifacts"]["onnx"].update(
            sha256=hashlib.sha256(onnx.read_bytes()).hexdigest(), bytes=onnx.stat().st_size
        )
        manifest_path.write_text(json.dumps(manifest))
        clients.wait_for(CLIENTS * 5)
        result = reload()
        assert result.version == new and result.before == new
        assert set(result.refused) == {unloadable}
        assert "could not load" in result.refused[unloadable]
        for model in ("classifier", "preprocess", "classifier_ensemble"):
            assert twin_versions(triton, model) == [str(new)], model  # put back
        with httpx.Client(timeout=30) as client:
            assert triton.served_version(client) == new
            assert step_versions(client, triton) == [str(new), str(new)]
            assert infer(client, triton, published_model.images[2]) == (200, str(new))
            assert list(refused_parameter(client, triton)) == [unloadable]

        # Fails its sha256: refused before anything changes.
        corrupt = publish_checkpoint(trained_checkpoint, repo)
        onnx = version_dir(repo, triton.settings.model, corrupt) / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[::-1])
        clients.wait_for(CLIENTS * 5)
        result = reload()
        assert result.version == new and set(result.refused) == {corrupt}
        assert "sha256 mismatch" in result.refused[corrupt]
        with httpx.Client(timeout=30) as client:
            assert triton.served_version(client) == new
            assert infer(client, triton, published_model.images[1]) == (200, str(new))
            refused = refused_parameter(client, triton)
            assert list(refused) == [corrupt], refused
            assert refused[corrupt].startswith(f"classifier/{corrupt}/model.onnx: sha256"), refused
        clients.wait_for(CLIENTS * 5)  # and after the last reload, still answered

    answers = clients.all()
    during = [
        a for a in answers if any(a.sent <= end and a.answered >= start for start, end in windows)
    ]
    failed = [a for a in answers if a.status != 200]
    assert not failed, (
        f"{len(failed)} of {len(answers)} requests failed ({len(during)} sent during the "
        f"reloads): {failed[:5]}"
    )
    assert len(during) >= CLIENTS * 3, f"only {len(during)} requests overlapped the reloads"
    # Every answer names the version that ran it: the one served before, until the reload
    # switched it, then the new one, never the refused ones; and no client sees the old one
    # again once it saw the new one.
    assert {a.text for a in answers} == {str(new - 1), str(new)}
    for mine in clients.answers:
        versions = [a.text for a in mine]
        assert versions[0] == str(new - 1) and versions[-1] == str(new)
        assert str(new - 1) not in versions[versions.index(str(new)) :]
    assert all(a.text == str(new) for a in answers if a.sent > switched)
    print(f"{len(answers)} requests, {len(during)} during the reloads, 0 failed")
