"""An engine with several replicas behind one name (services/gateway/replicas.py): calls go to
every address in turn, a replica that dies costs no call, a new one gets calls once the name is
resolved again.

Two real HTTP servers on two loopback addresses (127.0.0.2, 127.0.0.3) and the same port stand
for two predictor containers; the resolver the backend uses is told that ``predictor.test``
names them (Docker's DNS does that for ``--scale``; tests/stack/test_compose_up.py checks it
there). The requests and connections are real.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp.web
import pytest

from services.gateway.backends import ConnectFailed, PredictorBackend
from services.gateway.replicas import Replicas, spreads
from tests.gateway.conftest import isolated_settings
from tests.processes import free_port

# The servers (a fixture, in the session's loop: asyncio_default_fixture_loop_scope) and the
# tests must share one event loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

ADDRESSES = ["127.0.0.2", "127.0.0.3"]


class Replica:
    """One server at ``address``: answers /readyz like the predictor, and says who it is."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.hosts: list[str] = []  # the Host header of every request
        self.runner: aiohttp.web.AppRunner | None = None

    async def _ready(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        body = {"model": "classifier", "version": 1, "engine": self.address}
        return aiohttp.web.json_response(body)

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_get("/readyz", self._ready)
        self.runner = aiohttp.web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await aiohttp.web.TCPSite(self.runner, self.address, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def replicas() -> AsyncIterator[dict[str, Replica]]:
    port = free_port()
    servers = {address: Replica(address, port) for address in ADDRESSES}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


def backend_for(port: int, names: dict[str, list[str]], interval_s: float) -> PredictorBackend:
    settings = isolated_settings(
        predictor_url=f"http://predictor.test:{port}", resolve_interval_s=interval_s
    )
    backend = PredictorBackend(settings)

    async def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"{host} does not resolve")
        return list(names[host])

    backend.resolve = resolve
    return backend


async def served_by(backend: PredictorBackend, calls: int) -> Counter[str]:
    engines: Counter[str] = Counter()
    for _ in range(calls):
        reply = await backend._send("GET", backend.ready_url)
        assert reply.status == 200
        engines[reply.json()["engine"]] += 1
    return engines


async def test_calls_alternate_over_every_replica_with_the_name_as_host(
    replicas: dict[str, Replica],
) -> None:
    port = replicas[ADDRESSES[0]].port
    backend = backend_for(port, {"predictor.test": ADDRESSES}, interval_s=60)
    try:
        assert await served_by(backend, 10) == {ADDRESSES[0]: 5, ADDRESSES[1]: 5}
        for server in replicas.values():
            assert set(server.hosts) == {f"predictor.test:{port}"}
    finally:
        await backend.aclose()


async def test_a_dead_replica_costs_no_call_and_readiness_holds(
    replicas: dict[str, Replica],
) -> None:
    port = replicas[ADDRESSES[0]].port
    backend = backend_for(port, {"predictor.test": ADDRESSES}, interval_s=60)
    try:
        await served_by(backend, 4)  # keep-alive connections to both
        await replicas[ADDRESSES[0]].stop()
        assert await served_by(backend, 10) == {ADDRESSES[1]: 10}
        readiness = await backend.check_ready()
        assert readiness.ready, readiness
        await replicas[ADDRESSES[1]].stop()
        with pytest.raises(ConnectFailed):
            await backend._send("GET", backend.ready_url)
        assert not (await backend.check_ready()).ready
    finally:
        await backend.aclose()


async def test_a_new_replica_gets_calls_once_the_name_is_resolved_again(
    replicas: dict[str, Replica],
) -> None:
    port = replicas[ADDRESSES[0]].port
    names = {"predictor.test": ADDRESSES[:1]}
    backend = backend_for(port, names, interval_s=0.2)
    try:
        assert await served_by(backend, 4) == {ADDRESSES[0]: 4}
        names["predictor.test"] = ADDRESSES  # `docker compose up --scale predictor=2`
        await asyncio.sleep(0.3)
        assert await served_by(backend, 10) == {ADDRESSES[0]: 5, ADDRESSES[1]: 5}
    finally:
        await backend.aclose()


async def test_resolution_off_or_an_ip_literal_connects_as_configured(
    replicas: dict[str, Replica],
) -> None:
    port = replicas[ADDRESSES[0]].port
    settings = isolated_settings(predictor_url=f"http://{ADDRESSES[1]}:{port}")
    backend = PredictorBackend(settings)
    try:
        assert await served_by(backend, 3) == {ADDRESSES[1]: 3}
        assert backend._replica_sets == {}
    finally:
        await backend.aclose()
    assert not spreads("https", "predictor")
    assert not spreads("http", "::1") and not spreads("http", "[::1]")
    assert spreads("http", "predictor")


async def test_replicas_order_passes_over_failed_addresses_until_resolved_again() -> None:
    now = [0.0]
    answers = [["10.0.0.1", "10.0.0.2", "10.0.0.3"]]

    async def resolve(host: str, port: int) -> list[str]:
        return answers[-1]

    replicas = Replicas("p", 80, interval_s=5, down_s=5, resolve=resolve, clock=lambda: now[0])
    firsts = [(await replicas.candidates())[0] for _ in range(3)]
    assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    replicas.failed("10.0.0.2")
    assert await replicas.candidates() == ["10.0.0.1", "10.0.0.3", "10.0.0.2"]
    assert await replicas.candidates() == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]
    now[0] = 6.0  # resolved again: the failed one is gone from the name
    answers.append(["10.0.0.1", "10.0.0.3"])
    assert sorted(await replicas.candidates()) == ["10.0.0.1", "10.0.0.3"]
    answers.append([])  # the name resolves to nothing: connect by name
    now[0] = 12.0
    assert await replicas.candidates() == []
