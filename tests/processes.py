"""Helpers the server fixtures share: free ports, service processes, and the processes left
behind. Standard library only (services.common.processes is too), so GPU-host collection
needs nothing more."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from services.common.processes import processes_naming as services_processes_naming
from services.common.processes import stop_group

ROOT = Path(__file__).resolve().parents[1]

FIRST_PORT = 10_000  # well clear of the well-known ports and of what services default to
#: Its own generator, from the OS: the session's training seeds the global one, which would
#: give every concurrent pytest run on the machine the same ports.
_START = random.SystemRandom()
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
    start = _START.randrange(len(candidates))  # separate pytest runs start apart
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


class ServiceProcess:
    """``python -m services.<name>`` on a port of 127.0.0.1, in its own process group, configured
    only through ``<NAME>_*`` variables (the developer's own are dropped) and logging to a file."""

    def __init__(
        self, name: str, settings: Mapping[str, str], log_path: Path, port: int | None = None
    ) -> None:
        """``settings`` are whole variable names (``PREDICTOR_ENGINE``); host and port are set
        here, ``port`` a free one unless given."""
        prefix = f"{name.upper()}_"
        self.name = name
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
        env.update(settings)
        env.update({f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(self.port)})
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def raise_if_exited(self) -> None:
        if not self.alive:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
            )

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown, no goodbye, like a crash."""
        stop_group(self.process.pid, timeout_s=30, first_signal=signal.SIGKILL, leader=self.process)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if it is still there after 15 s; close the log."""
        stop_group(self.process.pid, timeout_s=15, kill_timeout_s=15, leader=self.process)
        self._log.close()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def processes_naming(folder: Path) -> list[str]:
    """Live processes whose command line names ``folder``, each as ``pid: command line``: read
    from /proc independently of any launcher's bookkeeping (TorchServe's wrapper, JVM and
    workers, tritonserver and its python stubs all name their run folder)."""
    found = []
    for pid in services_processes_naming(folder.resolve()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # exited since
        text = cmdline.replace(b"\0", b" ").decode(errors="replace")
        found.append(f"{pid}: {text}")
    return found
