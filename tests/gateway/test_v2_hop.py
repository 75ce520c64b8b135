"""The gateway's hop to the predictor, seen on the wire: the Open Inference Protocol with the
images as raw bytes, and coalesced requests as one tensor batch split back per request.

A real predictor, an in-process gateway, and between them a recording TCP relay that passes
every byte through unchanged and keeps what the gateway sent, so the test reads the calls
themselves instead of trusting the gateway's account of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import orjson
import pytest

from services.triton.protocol import HEADER_LENGTH
from tests.conftest import PublishedModel
from tests.gateway.conftest import gateway_app, isolated_settings
from tests.images import b64
from tests.predictor.conftest import PredictorProcess, start_predictor

pytestmark = pytest.mark.slow


@dataclass
class Call:
    """One HTTP request the gateway sent to the predictor."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def tensor(self) -> tuple[dict[str, object], bytes]:
        """The binary extension's JSON header and the bytes after it."""
        split = int(self.headers[HEADER_LENGTH.lower()])
        return orjson.loads(self.body[:split]), self.body[split:]


@dataclass
class RecordingRelay:
    """A TCP relay in front of ``target``: forwards both ways, records what clients send."""

    target_port: int
    received: list[bytearray] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if record is not None:
                    record.extend(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        record = bytearray()
        self.received.append(record)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(client_r, server_w, record), self._pipe(server_r, client_w, None)
        )

    def calls(self) -> list[Call]:
        """Every request recorded so far, parsed (Content-Length bodies, keep-alive)."""
        calls = []
        for stream in self.received:
            data = bytes(stream)
            while data:
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                calls.append(Call(method, path, headers, rest[:length]))
                data = rest[length:]
        return calls


@pytest.fixture(scope="module")
def predictor(
    published_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictorProcess]:
    log = tmp_path_factory.mktemp("v2-hop") / "predictor.log"
    server = start_predictor(published_model.repo, log, poll_interval_s=0)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def relay_to(predictor: PredictorProcess) -> AsyncIterator[RecordingRelay]:
    relay = RecordingRelay(predictor.port)
    relay.server = await asyncio.start_server(relay._serve, "127.0.0.1", 0)
    try:
        yield relay
    finally:
        relay.server.close()
        await relay.server.wait_closed()


def _infer_calls(relay: RecordingRelay) -> list[Call]:
    return [c for c in relay.calls() if c.method == "POST" and c.path.endswith("/infer")]


async def test_the_predictor_gets_raw_image_bytes_and_answers_with_the_eager_top1(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    images = published_model.images[:3]
    async with relay_to(predictor) as relay:
        settings = isolated_settings(backends=["predictor"], predictor_url=relay.url)
        async with gateway_app(settings) as (client, _):
            response = await client.post(
                "/predict", json={"images": [b64(i) for i in images], "top_k": 2}
            )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p[0]["class_id"] for p in predictions] == published_model.expected_top1[:3]
    labels = published_model.manifest.labels
    assert all(p["label"] == labels[p["class_id"]] for row in predictions for p in row)
    calls = [c for c in _infer_calls(relay) if "/versions/" not in c.path]  # labels: once
    assert [c.path for c in calls] == ["/v2/models/classifier_ensemble/infer"]
    header, tensor_bytes = calls[0].tensor()
    assert header["inputs"] == [
        {
            "name": "IMAGE",
            "shape": [3, 1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(tensor_bytes)},
        }
    ]
    # Each image exactly as the client's base64 decodes, after its 4-byte length: no base64.
    assert tensor_bytes == b"".join(len(i).to_bytes(4, "little") + i for i in images)
    assert not any(base64.b64encode(i[:48]) in calls[0].body for i in images)


async def test_a_merged_call_is_split_back_and_a_bad_image_fails_only_its_request(
    predictor: PredictorProcess, published_model: PublishedModel
) -> None:
    images = published_model.images[:12]
    expected = published_model.expected_top1[:12]
    bad = 7
    async with relay_to(predictor) as relay:
        settings = isolated_settings(
            backends=["predictor"], predictor_url=relay.url, predictor_coalesce_calls=1
        )
        async with gateway_app(settings) as (client, _):
            # One call first: the labels of the version are asked then, not in the race below.
            assert (
                await client.post("/predict", json={"image": b64(images[0])})
            ).status_code == 200
            bodies = [{"image": b64(b"not an image" if i == bad else image), "top_k": 1}
                      for i, image in enumerate(images)]  # fmt: skip
            responses = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))
    assert responses[bad].status_code == 400, responses[bad].text
    assert responses[bad].json()["code"] == "not_an_image"
    assert responses[bad].json()["error"] == "data is not a recognised image format"  # untagged
    for index, response in enumerate(responses):
        if index != bad:
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["class_id"] == expected[index], index
    calls = _infer_calls(relay)
    label_queries = [c for c in calls if "/versions/" in c.path]
    assert len(label_queries) == 1  # once for the version, not per call
    tensors = [c.tensor() for c in calls if "/versions/" not in c.path]
    rows = [int(header["inputs"][0]["shape"][0]) for header, _ in tensors]
    assert max(rows) > 1, rows  # merged calls went out as tensor batches ...
    assert sum(rows) >= 1 + len(images)  # ... carrying every image of the battery ...
    alone = len(b"not an image").to_bytes(4, "little") + b"not an image"
    assert any(data == alone for _, data in tensors)  # ... and the refused merge, one by one
