"""Helpers the server fixtures share: free ports, and the processes left behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now, held together so they differ from each other."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
