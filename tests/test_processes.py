"""The test session's port allocator: ports no fixture can lose to another before binding."""

from __future__ import annotations

import random
import socket

import pytest

from tests.processes import FIRST_PORT, _ephemeral_range, free_ports


def test_ports_are_bindable_unique_and_outside_the_ephemeral_range() -> None:
    ephemeral = _ephemeral_range()
    ports = [port for _ in range(50) for port in free_ports(4)]
    assert len(set(ports)) == len(ports) == 200  # never handed out twice in a session
    assert not [port for port in ports if port in ephemeral]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free when handed out


def test_a_port_someone_else_holds_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        for port in range(FIRST_PORT + 1000, _ephemeral_range().start):
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        held = squatter.getsockname()[1]
        # Make the walk start at the held port (candidates below the ephemeral range are
        # FIRST_PORT, FIRST_PORT + 1, ...).
        monkeypatch.setattr(random, "randrange", lambda n: held - FIRST_PORT)
        (port,) = free_ports(1)
    assert port != held and port > held
