"""Decode amplification against the three real engines: a 16-bit 40-megapixel PNG (under
100 KB sent, 80 MB decoded) is refused from its header by the predictor, TorchServe's handler
and Triton's ``preprocess``, with little CPU and no memory peak in any of their processes,
while a normal digit sent beside it is answered as usual."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from services.triton.protocol import parse_error
from tests.conftest import PublishedModel
from tests.gateway.conftest import Engines
from tests.images import b64, sixteen_bit_png
from tests.processes import processes_naming

pytestmark = pytest.mark.slow

BOMBS = 4  # sent at once, beside one normal image
#: Far above what refusing from the header costs, far below one decode of the bomb (seconds of
#: CPU and hundreds of MB each on this machine before the limits were checked from the header).
CPU_BUDGET_S = 1.0
PEAK_BUDGET_BYTES = 100 * 1024 * 1024


@dataclass
class Verdict:
    status: int
    code: str | None
    top1: int | None


def _peak_rss(pid: int) -> int:
    """The process's high-water RSS (VmHWM): a decode that came and went still shows in it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def _usage(pids: list[int]) -> tuple[float, dict[int, int]]:
    cpu = 0.0
    peaks: dict[int, int] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            cpu += times.user + times.system
            peaks[pid] = _peak_rss(pid)
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass  # gone meanwhile (a worker restarted would show as a failed request)
    return cpu, peaks


def _pids_naming(folder: Path) -> list[int]:
    return [int(entry.split(":", 1)[0]) for entry in processes_naming(folder)]


def _predictor(engines: Engines) -> Callable[[bytes], Verdict]:
    def send(image: bytes) -> Verdict:
        response = httpx.post(
            engines.predictor.url + "/predict", json={"image": b64(image)}, timeout=60
        )
        body = response.json()
        if response.status_code == 200:
            return Verdict(200, None, body["predictions"][0]["class_id"])
        return Verdict(response.status_code, body.get("code"), None)

    return send


def _torchserve(engines: Engines) -> Callable[[bytes], Verdict]:
    instance = engines.torchserve

    def send(image: bytes) -> Verdict:
        response = httpx.post(
            instance.predictions_url(),
            content=image,
            headers={**instance.inference_headers, "content-type": "application/octet-stream"},
            timeout=60,
        )
        body = response.json()
        if response.status_code == 200:
            return Verdict(200, None, body["predictions"][0]["class_id"])
        return Verdict(response.status_code, body.get("code"), None)

    return send


def _triton(engines: Engines) -> Callable[[bytes], Verdict]:
    def send(image: bytes) -> Verdict:
        client = httpclient.InferenceServerClient(engines.triton.http_url)
        try:
            tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
            result = client.infer("classifier_ensemble", [tensor])
            return Verdict(200, None, int(result.as_numpy("LOGITS")[0].argmax()))
        except InferenceServerException as exc:
            parsed = parse_error(exc.message() or "")
            return Verdict(int(exc.status() or 0), parsed[0] if parsed else None, None)
        finally:
            client.close()

    return send


@pytest.mark.parametrize("engine", ["predictor", "torchserve", "triton"])
def test_a_16_bit_40_megapixel_png_is_refused_cheaply_beside_a_normal_request(
    engine: str, engines: Engines, published_model: PublishedModel
) -> None:
    if engine == "predictor":
        assert engines.predictor.server is not None
        pids = [engines.predictor.server.process.pid]
        send, refused = _predictor(engines), 413
    elif engine == "torchserve":
        pids = _pids_naming(engines.torchserve.settings.run_path)
        send, refused = _torchserve(engines), 413
    else:
        pids = _pids_naming(engines.triton.settings.run_dir)
        send, refused = _triton(engines), 400  # Triton's INVALID_ARG; the code says why
    assert pids, f"no {engine} process found"
    bomb = sixteen_bit_png()
    assert len(bomb) < 100_000
    normal = published_model.images[0]

    cpu_before, peaks_before = _usage(pids)
    with ThreadPoolExecutor(BOMBS + 1) as pool:
        bombs = [pool.submit(send, bomb) for _ in range(BOMBS)]
        beside = pool.submit(send, normal)
        verdicts = [future.result() for future in bombs]
        answered = beside.result()
    cpu_after, peaks_after = _usage(pids)

    assert verdicts == [Verdict(refused, "image_too_large", None)] * BOMBS
    assert answered == Verdict(200, None, published_model.expected_top1[0])
    cpu = cpu_after - cpu_before
    assert cpu < CPU_BUDGET_S, f"{engine} spent {cpu:.2f}s of CPU on {BOMBS} refusals"
    grown = {
        pid: peaks_after[pid] - peaks_before[pid] for pid in peaks_after if pid in peaks_before
    }
    assert max(grown.values()) < PEAK_BUDGET_BYTES, f"{engine} peak RSS grew: {grown}"
    # Still serving.
    assert send(normal) == Verdict(200, None, published_model.expected_top1[0])
