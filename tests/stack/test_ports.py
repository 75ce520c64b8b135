"""`make up` refuses ports another process listens on, before anything starts.

Without the check, a second stack on the default ports started engines that crash-looped on
their ports while `up` waited on the first stack's gateway, found it ready and exited 0: the
user (and a test) then talked to the other stack's models without knowing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from services.stack.settings import StackSettings
from services.stack.supervisor import StackError, busy_ports, stack_ports, supervisord_pid, up
from tests.processes import free_ports


def test_every_port_comes_from_its_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, triton = free_ports(2)
    monkeypatch.setenv("TRITON_HTTP_PORT", str(triton))
    ports = stack_ports(StackSettings(gateway_port=gateway))
    assert ports["gateway"] == gateway
    assert ports["Triton HTTP"] == triton
    assert len(set(ports.values())) == len(ports), ports


def test_a_held_port_is_named_with_its_holder_and_up_starts_nothing(tmp_path: Path) -> None:
    gateway, prometheus = free_ports(2)
    settings = StackSettings(
        run_dir=tmp_path / "run",
        repository=tmp_path / "repo",
        gateway_port=gateway,
        prometheus_port=prometheus,
    )
    assert not [b for b in busy_ports(settings) if b.startswith((f"{gateway} ", f"{prometheus} "))]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", gateway))
        holder.listen()
        busy = [b for b in busy_ports(settings) if b.startswith(f"{gateway} ")]
        assert len(busy) == 1, busy
        assert busy[0].startswith(f"{gateway} (gateway) is in use by pid {os.getpid()} ("), busy
        with pytest.raises(StackError, match=f"{gateway} \\(gateway\\) is in use"):
            up(settings)
    assert supervisord_pid(settings) is None
    assert not (tmp_path / "run").exists()
