"""Large images that are within the limits, against the real server: each is decoded apart
from the batches, one at a time, so a normal image sent while they decode is answered first."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import numpy as np
import pytest
from PIL import Image

from services.common.imaging import DEFAULT_MAX_PIXELS, max_decoded_bytes
from tests.conftest import PublishedModel
from tests.images import b64, encode
from tests.predictor.conftest import PredictorProcess

pytestmark = pytest.mark.slow

LARGE = 8


def large_png() -> bytes:
    """2048 x 2048 RGB with texture: the most an RGB image may be by default, about 2 MB of
    PNG that takes a noticeable time to decode."""
    y, x = np.mgrid[0:2048, 0:2048]
    pixels = np.stack([(x * y) % 251, (x + y) % 256, (x ^ y) % 256], axis=-1).astype(np.uint8)
    assert pixels.size == max_decoded_bytes(DEFAULT_MAX_PIXELS)
    return encode(Image.fromarray(pixels), "PNG", compress_level=9)


def test_a_normal_image_does_not_wait_for_large_ones(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    large = {"image": b64(large_png())}
    normal = {"image": b64(published_model.images[0])}
    finished: dict[str, float] = {}

    def send(name: str, body: dict[str, str]) -> httpx.Response:
        response = httpx.post(predictor.url + "/predict", json=body, timeout=120)
        finished[name] = time.monotonic()
        return response

    with ThreadPoolExecutor(LARGE + 1) as pool:
        larges = [pool.submit(send, f"large-{i}", large) for i in range(LARGE)]
        # Once one large image is answered the others are uploaded and queued for the one
        # decoding thread of large images, however fast this machine decodes.
        wait(larges, return_when=FIRST_COMPLETED)
        waiting = sum(not f.done() for f in larges)
        beside = pool.submit(send, "normal", normal)
        assert beside.result().status_code == 200
        assert all(f.result().status_code == 200 for f in larges), [f.result().text for f in larges]
    answer = beside.result().json()["predictions"][0]
    assert answer["class_id"] == published_model.expected_top1[0]
    # Large images are decoded one after the other, beside the batches: the normal image was
    # answered while at least two of those still waiting were not (a batch used to wait for
    # every decode in it).
    assert waiting >= 3, f"only {waiting} large images were still queued"
    after = [name for name in finished if name != "normal" and finished[name] > finished["normal"]]
    assert len(after) >= 2, sorted(finished, key=finished.__getitem__)
