"""Helpers the server fixtures share: free ports, and the processes left behind."""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

FIRST_PORT = 10_000  # well clear of the well-known ports and of what services default to
_handed_out: set[int] = set()
_handing_out = threading.Lock()


def _ephemeral_range() -> range:
    """The ports the kernel picks for ``bind(0)`` and for client connections' source ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        low, high = "32768", "60999"  # Linux's default
    return range(int(low), int(high) + 1)


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports that are free now and that this test session never gave before.

    Not ``bind(0)``: it draws from the kernel's ephemeral range, the range every outgoing
    connection takes its source port from, and it can give back a port it just gave. Between
    handing such a port out and the server binding it, a client connection or the next
    fixture can take it — a predictor once polled a Triton gRPC port that way. Ports here lie
    outside that range, and each is handed out once per session.
    """
    ephemeral = _ephemeral_range()
    candidates = [p for p in range(FIRST_PORT, 65536) if p not in ephemeral]
    start = random.randrange(len(candidates))  # separate pytest runs start apart
    ports: list[int] = []
    with _handing_out:
        for port in candidates[start:] + candidates[:start]:
            if port not in _handed_out and _can_bind(port):
                _handed_out.add(port)
                ports.append(port)
                if len(ports) == count:
                    return ports
    raise RuntimeError(f"no {count} free loopback ports left outside {ephemeral}")


def free_port() -> int:
    """One port from :func:`free_ports`."""
    return free_ports(1)[0]


def processes_naming(folder: Path) -> list[str]:
    """Live processes whose command line names ``folder``, read from /proc independently of
    any launcher's bookkeeping (TorchServe's wrapper, JVM and workers, tritonserver and its
    python stubs all name their run folder)."""
    needle = str(folder.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:  # a zombie has an empty command line and does not count
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {text}")
    return found
