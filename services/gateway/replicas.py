"""Every address an engine's host name resolves to, used in turn.

An engine may run as several replicas behind one name: ``docker compose up --scale
predictor=2`` gives the service name one A record per container, a headless Kubernetes Service
one per pod. Left to the HTTP client, the gateway would resolve the name once and reuse one
keep-alive connection for as long as it lives, so one replica would get every request and a new
one none. :class:`Replicas` resolves the name again every ``resolve_interval_s`` and hands out
its addresses round robin, one per call; the caller connects to the address (sending the name as
``Host``), so the pool keeps keep-alive connections per replica.

An address that refused or dropped a connection is passed over for ``down_s`` (the caller tries
the next one at once: nothing was answered, classification is safe to repeat), so a replica that
died costs no request while the others run; once the name no longer resolves to it, it is gone.
When every address is passed over, all are tried again rather than none.

A base URL whose host is an IP literal, or an ``https://`` one (its certificate names the host,
not the address), is used as it is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

#: ``resolve(host, port)`` -> the addresses (a stable order: a new order restarts no turn).
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_all(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection (IPv4 and IPv6), sorted (DNS
    servers such as Docker's shuffle the order on every answer; the turn is kept here)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def spreads(scheme: str, host: str) -> bool:
    """Whether requests to ``scheme://host`` are spread over its addresses (plain HTTP to a
    name; an IP literal has one address, and TLS must connect by name)."""
    if scheme != "http":
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return False


class Replicas:
    """The addresses of one host name, re-resolved every ``interval_s`` seconds."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        interval_s: float,
        down_s: float,
        resolve: Resolve = resolve_all,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.down_s = down_s
        self._resolve = resolve
        self._clock = clock
        self.addresses: list[str] = []
        self._resolved_at: float | None = None
        self._down_until: dict[str, float] = {}
        self._turn = 0
        self._resolving = asyncio.Lock()

    async def candidates(self) -> list[str]:
        """The addresses to try for one call, best first: the next in turn among those not
        passed over, then the others in turn, then the passed-over ones. Empty when the name
        resolves to nothing (the caller then connects by name and gets the client's error)."""
        await self._refresh()
        addresses = self.addresses
        if not addresses:
            return []
        start = self._turn % len(addresses)
        self._turn += 1
        ordered = addresses[start:] + addresses[:start]
        now = self._clock()
        up = [a for a in ordered if self._down_until.get(a, 0.0) <= now]
        return up + [a for a in ordered if a not in up]

    def failed(self, address: str) -> None:
        """``address`` refused or dropped a connection: pass it over for ``down_s``."""
        if self._down_until.get(address, 0.0) <= self._clock():
            logger.warning("%s replica %s unreachable; passed over", self.host, address)
        self._down_until[address] = self._clock() + self.down_s

    async def _refresh(self) -> None:
        now = self._clock()
        if self._resolved_at is not None and now - self._resolved_at < self.interval_s:
            return
        if self._resolving.locked():  # another call is resolving: use what is known
            return
        async with self._resolving:
            try:
                found = await self._resolve(self.host, self.port)
            except OSError as exc:
                # Not resolvable now (every replica gone, DNS hiccup): keep what was known,
                # whose addresses fail over by themselves if they are gone too.
                logger.debug("resolving %s failed: %s", self.host, exc)
                found = self.addresses
            if found != self.addresses:
                logger.info("%s resolves to %s", self.host, ", ".join(found) or "nothing")
            self.addresses = found
            self._down_until = {a: t for a, t in self._down_until.items() if a in found}
            self._resolved_at = self._clock()
