"""The local tritonserver follows new versions without a restart (explicit model control).

A real server on a copy of the session's repository: a new version is loaded through Triton's
repository API while a client keeps sending requests; a version whose file fails its sha256 is
refused before anything changes, and one that passes its sha256 but cannot be loaded is refused
by Triton itself, after which the launcher puts the served version's repository back.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.repository import version_dir
from services.triton.launcher import LocalTriton
from services.triton.protocol import LOGITS_OUTPUT, binary_infer_request
from tests.conftest import PublishedModel
from tests.processes import free_ports, processes_naming
from training.publish import publish_checkpoint

pytestmark = pytest.mark.slow


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


def twin_versions(triton: LocalTriton, model: str) -> list[str]:
    return sorted(p.name for p in (triton.repository / model).iterdir() if p.name.isdigit())


def test_a_new_version_is_loaded_under_traffic_and_bad_ones_are_refused(
    triton: LocalTriton, published_model: PublishedModel, trained_checkpoint: Path
) -> None:
    repo = triton.settings.repository
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            index = 0
            while not stop.is_set():
                answers.append(infer(client, triton, published_model.images[index % 8]))
                index += 1

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        new = publish_checkpoint(trained_checkpoint, repo)
        result = triton.reload()
        assert (result.version, result.before, result.refused) == (new, new - 1, {})
        seen = len(answers)
        with httpx.Client(timeout=30) as client:
            assert triton.served_version(client) == new
            assert infer(client, triton, published_model.images[0]) == (200, str(new))

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
        result = triton.reload()
        assert result.version == new and result.before == new
        assert set(result.refused) == {unloadable}
        assert "could not load" in result.refused[unloadable]
        for model in ("classifier", "preprocess", "classifier_ensemble"):
            assert twin_versions(triton, model) == [str(new)], model  # put back

        # Fails its sha256: refused before anything changes.
        corrupt = publish_checkpoint(trained_checkpoint, repo)
        onnx = version_dir(repo, triton.settings.model, corrupt) / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[::-1])
        result = triton.reload()
        assert result.version == new and set(result.refused) == {corrupt}
        assert "sha256 mismatch" in result.refused[corrupt]
        with httpx.Client(timeout=30) as client:
            assert triton.served_version(client) == new
            assert infer(client, triton, published_model.images[1]) == (200, str(new))
        assert len(answers) > seen
    finally:
        stop.set()
        thread.join(timeout=60)
    failed = [a for a in answers if a[0] != 200]
    # A known defect, not yet fixed (README "Triton"): when the ensemble's version changes,
    # Triton may route a request to the new ensemble version a moment before it is ready and
    # answer 503 "... is not at ready state" (CI saw one per reload, in about 900 requests).
    # Any other failure, or more than that window explains, fails the test.
    swap = [a for a in failed if a[0] == 503 and "is not at ready state" in str(a[1])]
    assert failed == swap, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    assert len(swap) <= 4, f"{len(swap)} of {len(answers)} requests hit the ensemble swap"
    versions = [version for _, version in answers]
    assert versions[0] == str(new - 1) and versions[-1] == str(new)
    assert str(new - 1) not in versions[versions.index(str(new)) :]
