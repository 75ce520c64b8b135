"""Hot reload against a real server: a new version published under load is picked up without a
single failed request; a corrupted or unloadable version is refused and the old one serves on."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.repository import MANIFEST_NAME, TORCHSCRIPT_SUFFIX, sha256_file
from tests.conftest import PublishedModel
from tests.images import b64
from tests.predictor.conftest import PredictorProcess, get_json, start_predictor
from training.publish import publish_checkpoint

pytestmark = pytest.mark.slow

WAIT_S = 120.0  # a safety net for a hung server, not a performance expectation
WORKERS = 8


@pytest.fixture(scope="module")
def served_repo(published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return published_model.copy_repository(tmp_path_factory.mktemp("reload"))


@pytest.fixture(scope="module")
def server(
    served_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictorProcess]:
    log = tmp_path_factory.mktemp("reload-logs") / "predictor.log"
    # ONNX Runtime here, so both engines are exercised by a hot reload somewhere in the suite.
    server = start_predictor(served_repo, log, engine="onnx", poll_interval_s=0.2)
    yield server
    server.stop()


def _readyz(server: PredictorProcess) -> dict[str, Any]:
    status, body = get_json(server.url + "/readyz")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def _wait_for(
    server: PredictorProcess, condition: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        body = _readyz(server)
        if check(body):
            return body
        time.sleep(0.1)
    raise AssertionError(f"predictor never reached: {condition}; log:\n{server.log()[-3000:]}")


def test_new_version_under_load_is_picked_up_without_errors(
    server: PredictorProcess, served_repo: Path, published_model: PublishedModel
) -> None:
    start_version = published_model.version
    image = b64(published_model.images[0])
    expected_class = published_model.expected_top1[0]

    async def scenario() -> tuple[list[list[str]], list[str], int]:
        seen: list[list[str]] = [[] for _ in range(WORKERS)]
        failures: list[str] = []
        stop = asyncio.Event()
        new_version_seen = asyncio.Event()

        async def worker(index: int, client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                try:
                    response = await client.post("/predict", json={"image": image, "top_k": 1})
                except httpx.HTTPError as exc:
                    failures.append(f"worker {index}: {exc!r}")
                    continue
                if response.status_code != 200:
                    failures.append(f"worker {index}: {response.status_code} {response.text}")
                    continue
                body = response.json()
                if body["predictions"][0]["class_id"] != expected_class:
                    failures.append(f"worker {index}: wrong class {body}")
                seen[index].append(body["version"])
                if body["version"] != str(start_version):
                    new_version_seen.set()

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            tasks = [asyncio.create_task(worker(i, client)) for i in range(WORKERS)]
            # Publishing exports, checks parity and renames into place, as in production;
            # meanwhile the workers keep the server busy.
            new_version = await asyncio.to_thread(
                publish_checkpoint, published_model.checkpoint, served_repo
            )
            await asyncio.wait_for(new_version_seen.wait(), WAIT_S)
            # Keep loading a little after the swap so requests span it.
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        return seen, failures, new_version

    seen, failures, new_version = asyncio.run(scenario())
    assert failures == []
    assert new_version == start_version + 1
    everything = [v for per_worker in seen for v in per_worker]
    assert str(start_version) in everything and str(new_version) in everything
    for per_worker in seen:
        # Sequential requests of one worker never go back to the old version after the swap.
        first_new = per_worker.index(str(new_version)) if str(new_version) in per_worker else None
        if first_new is not None:
            assert set(per_worker[first_new:]) == {str(new_version)}
    assert _readyz(server)["version"] == new_version


def _stage_version(served_repo: Path, checkpoint: Path, scratch: Path) -> int:
    """Publish into a scratch copy of the served repository (so the version number is the next
    one of the served repo) and return the number; nothing is visible to the server yet."""
    shutil.copytree(served_repo, scratch)
    return publish_checkpoint(checkpoint, scratch)


def _commit_version(scratch: Path, served_repo: Path, version: int) -> None:
    """Move a staged version in the way publish does it: TorchScript folder first, then the
    folder holding the manifest (the commit point), each with one atomic rename."""
    for folder in (f"classifier{TORCHSCRIPT_SUFFIX}", "classifier"):
        (scratch / folder / str(version)).rename(served_repo / folder / str(version))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def _assert_serves(server: PredictorProcess, published_model: PublishedModel, version: int) -> None:
    body = {"images": [b64(data) for data in published_model.images[:8]], "top_k": 1}
    response = httpx.post(server.url + "/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == str(version)
    top1 = [p[0]["class_id"] for p in response.json()["predictions"]]
    assert top1 == published_model.expected_top1[:8]


def _refused_count(server: PredictorProcess) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    prefix = 'predictor_model_reloads_total{result="refused"} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_corrupted_version_is_refused_and_old_keeps_serving(
    server: PredictorProcess, served_repo: Path, published_model: PublishedModel, tmp_path: Path
) -> None:
    refused_before = _refused_count(server)
    serving = _readyz(server)["version"]
    assert isinstance(serving, int)
    scratch = tmp_path / "scratch"
    bad = _stage_version(served_repo, published_model.checkpoint, scratch)
    _flip_bytes(scratch / "classifier" / str(bad) / "model.onnx")
    _commit_version(scratch, served_repo, bad)

    body = _wait_for(server, f"v{bad} refused", lambda b: str(bad) in b["refused"])
    assert body["version"] == serving
    assert "sha256 mismatch" in str(body["refused"])
    assert f"refused classifier v{bad}, still serving v{serving}" in server.log()
    _assert_serves(server, published_model, serving)
    assert _refused_count(server) == refused_before + 1


def test_unloadable_version_with_matching_sha256_is_refused(
    server: PredictorProcess, served_repo: Path, published_model: PublishedModel, tmp_path: Path
) -> None:
    """The manifest agrees with the bytes, but the bytes are no model: the engine fails to load
    it while the old version serves, and it is refused just the same."""
    refused_before = _refused_count(server)
    serving = _readyz(server)["version"]
    assert isinstance(serving, int)
    scratch = tmp_path / "scratch"
    bad = _stage_version(served_repo, published_model.checkpoint, scratch)
    onnx_path = scratch / "classifier" / str(bad) / "model.onnx"
    onnx_path.write_bytes(b"this is not an onnx model")
    manifest_path = scratch / "classifier" / str(bad) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["onnx"]["sha256"] = sha256_file(onnx_path)
    manifest["artifacts"]["onnx"]["bytes"] = onnx_path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    _commit_version(scratch, served_repo, bad)

    body = _wait_for(server, f"v{bad} refused", lambda b: str(bad) in b["refused"])
    assert body["version"] == serving
    assert "cannot load ONNX model" in str(body["refused"])
    _assert_serves(server, published_model, serving)
    assert _refused_count(server) == refused_before + 1
