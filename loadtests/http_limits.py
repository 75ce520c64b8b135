"""Hostile-client probes of an HTTP service's limits, and a script printing their figures.

Each probe is a plain-socket (or urllib) client doing one thing a careless or hostile client
does: a huge header, thousands of headers, a body that stops short, many parked bodies, a
large upload read only after it is sent, an endless upload on keep-alive, a body without the
API key. Each returns what it saw (the status it read, how long it took, how many bytes it
could send) and, given the server's pid, its memory (``VmRSS`` and the peak ``VmHWM`` of
/proc/<pid>/status, the peak reset before the probe through ``clear_refs``).

``tests/common/test_http_limits.py`` asserts on these results against real gateway and
predictor processes; ``python -m loadtests.http_limits`` (or this file run directly, so that
the servers can come from another checkout's ``PYTHONPATH``) starts a gateway with no engines
and prints every probe's figures with the service's default limits, for before/after notes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1024 * 1024
READ_CHUNK = 64 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of ``pid`` in KiB, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> None:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (``clear_refs`` mode 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Memory:
    """A server's memory around a probe, MiB."""

    before: float
    peak: float
    after: float

    @classmethod
    @contextlib.contextmanager
    def watch(cls, pid: int | None, settle_s: float = 1.0) -> Iterator[Memory]:
        memory = cls(0.0, 0.0, 0.0)
        if pid is None:
            yield memory
            return
        reset_peak(pid)
        memory.before = memory_kib(pid)["VmRSS"] / 1024
        yield memory
        memory.peak = memory_kib(pid)["VmHWM"] / 1024
        time.sleep(settle_s)
        memory.after = memory_kib(pid)["VmRSS"] / 1024


@dataclass
class Outcome:
    """What one probe saw."""

    name: str
    status: int | None = None  # the status line the client read (None: none came)
    body: dict[str, object] | None = None
    seconds: float = 0.0  # from the first byte sent to the answer (or to giving up)
    sent_bytes: int = 0  # request bytes the client managed to send
    closed: bool = False  # the server closed the connection
    error: str = ""  # what the client library raised, if anything
    memory: Memory | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        memory = ""
        if self.memory is not None and self.memory.before:
            m = self.memory
            memory = f" rss {m.before:.0f}->peak {m.peak:.0f}->{m.after:.0f} MiB"
        extra = "".join(f" {k}={v:g}" for k, v in self.extra.items())
        code = f" {self.body.get('code')}" if self.body else ""
        error = f" error={self.error}" if self.error else ""
        return (
            f"{self.name}: status {self.status}{code} after {self.seconds:.2f}s, "
            f"sent {self.sent_bytes / MIB:.1f} MiB, closed={self.closed}{memory}{extra}{error}"
        )


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(
    sock: socket.socket, timeout: float
) -> tuple[int | None, dict[str, object] | None, bool]:
    """Read one answer: (status, JSON body, whether the server closed after it). A reset or
    a timeout ends the read with what came so far."""
    sock.settimeout(timeout)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(READ_CHUNK)
        except TimeoutError:
            break
        except OSError:  # reset
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = _content_length(head)
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, None, closed
    status = int(head.split(b" ", 2)[1])
    parsed: dict[str, object] | None = None
    with contextlib.suppress(ValueError):
        value = json.loads(body)
        parsed = value if isinstance(value, dict) else None
    if not closed and b"connection: close" in head.lower():
        closed = _closes_soon(sock, timeout)
    return status, parsed, closed


def _closes_soon(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(READ_CHUNK):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


class Sender(threading.Thread):
    """Sends ``pieces`` on ``sock`` until they end or the server stops taking them."""

    def __init__(self, sock: socket.socket, pieces: Iterator[bytes]) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.pieces = pieces
        self.sent = 0
        self.error = ""

    def run(self) -> None:
        try:
            for piece in self.pieces:
                self.sock.sendall(piece)
                self.sent += len(piece)
        except OSError as exc:
            self.error = type(exc).__name__


def _repeated(prefix: bytes, filler: bytes, total: int, suffix: bytes) -> Iterator[bytes]:
    yield prefix
    block = filler * (MIB // len(filler))
    left = total
    while left > 0:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        yield piece
    yield suffix


def _probe_head(
    name: str, port: int, pid: int | None, pieces: Iterator[bytes], timeout: float
) -> Outcome:
    """Send a head in a thread while reading: the answer may come before the head ends."""
    outcome = Outcome(name)
    with Memory.watch(pid) as memory, connect(port, timeout) as sock:
        start = time.perf_counter()
        sender = Sender(sock, pieces)
        sender.start()
        outcome.status, outcome.body, outcome.closed = read_answer(sock, timeout)
        outcome.seconds = time.perf_counter() - start
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
        outcome.sent_bytes = sender.sent
    outcome.memory = memory
    return outcome


def huge_header(
    port: int, pid: int | None = None, size: int = 100 * MIB, timeout: float = 60.0
) -> Outcome:
    """``GET /healthz`` with one header of ``size`` bytes."""
    pieces = _repeated(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nX-Huge: ", b"a", size, b"\r\n\r\n")
    return _probe_head(f"one {size / MIB:g} MiB header", port, pid, pieces, timeout)


def many_headers(
    port: int, pid: int | None = None, count: int = 10_000, timeout: float = 60.0
) -> Outcome:
    """``GET /healthz`` with ``count`` small headers."""
    lines = b"".join(b"X-H%d: v\r\n" % index for index in range(count))
    pieces = iter([b"GET /healthz HTTP/1.1\r\nHost: probe\r\n", lines, b"\r\n"])
    return _probe_head(f"{count} headers", port, pid, pieces, timeout)


def post_head(path: str, length: int | None, extra: str = "", close: bool = False) -> bytes:
    length_line = f"Content-Length: {length}\r\n" if length is not None else ""
    connection = "Connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
        f"{length_line}{connection}{extra}\r\n"
    ).encode()


def stalled_body(
    port: int, pid: int | None = None, path: str = "/predict", timeout: float = 60.0
) -> Outcome:
    """A body declared as 1,000 bytes of which 500 are sent; then silence."""
    outcome = Outcome("body stalled at 500 of 1000 bytes")
    with connect(port, timeout) as sock:
        start = time.perf_counter()
        sock.sendall(post_head(path, 1000) + b"x" * 500)
        outcome.sent_bytes = 500
        outcome.status, outcome.body, outcome.closed = read_answer(sock, timeout)
        outcome.seconds = time.perf_counter() - start
    return outcome


def parked_bodies(
    port: int,
    pid: int | None = None,
    count: int = 100,
    size: int = 10 * MIB,
    path: str = "/predict",
    settle_s: float = 2.0,
) -> Outcome:
    """``count`` connections, each declaring a ``size`` body and sending all of it but the
    last 64 KiB; memory is read while they are parked and after they are all closed."""
    outcome = Outcome(f"{count} parked {size / MIB:g} MiB bodies")
    socks: list[socket.socket] = []
    body = b"x" * (size - READ_CHUNK)
    statuses: dict[str, float] = {}
    if pid is not None:
        reset_peak(pid)
        before = memory_kib(pid)["VmRSS"] / 1024
    start = time.perf_counter()
    try:
        for _ in range(count):
            sock = connect(port, 30.0)
            socks.append(sock)
            with contextlib.suppress(OSError):  # refused early: the server stops reading
                sock.sendall(post_head(path, size) + body)
                outcome.sent_bytes += len(body)
        outcome.seconds = time.perf_counter() - start
        time.sleep(settle_s)
        if pid is not None:
            outcome.extra["parked_rss_mib"] = round(memory_kib(pid)["VmRSS"] / 1024)
        for sock in socks:  # who got an answer while parked (a 503, say)?
            sock.setblocking(False)
            try:
                data = sock.recv(READ_CHUNK)
            except (BlockingIOError, OSError):
                data = b""
            key = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.") else "none"
            statuses[key] = statuses.get(key, 0) + 1
            if b"\r\nretry-after:" in data.lower():
                statuses["with_retry_after"] = statuses.get("with_retry_after", 0) + 1
    finally:
        for sock in socks:
            sock.close()
    outcome.extra.update({f"answered_{k}": v for k, v in sorted(statuses.items())})
    if pid is not None:
        time.sleep(settle_s)
        peak = memory_kib(pid)["VmHWM"] / 1024
        outcome.memory = Memory(before, peak, memory_kib(pid)["VmRSS"] / 1024)
    return outcome


def urllib_upload(
    port: int,
    pid: int | None = None,
    size: int = 20 * MIB,
    path: str = "/predict",
    timeout: float = 60.0,
) -> Outcome:
    """A ``size`` body posted with Python's urllib, which sends it all before reading."""
    outcome = Outcome(f"{size / MIB:g} MiB body with urllib")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=b"x" * size,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outcome.status = response.status
    except urllib.error.HTTPError as exc:
        outcome.status = exc.code
        with contextlib.suppress(ValueError, OSError):
            outcome.body = json.loads(exc.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        outcome.error = f"{type(reason).__name__}: {reason}"
    outcome.seconds = time.perf_counter() - start
    outcome.sent_bytes = size
    return outcome


def endless_upload(
    port: int,
    pid: int | None = None,
    path: str = "/predict",
    cap_bytes: int = 4096 * MIB,
    timeout: float = 30.0,
) -> Outcome:
    """A keep-alive POST declaring 10**17 bytes that keeps sending after the 413 it gets,
    until the server closes the connection (or ``cap_bytes``/``timeout`` are reached)."""
    outcome = Outcome("endless keep-alive upload")

    def pieces() -> Iterator[bytes]:
        yield post_head(path, 10**17)
        block = b"x" * MIB
        deadline = time.monotonic() + timeout
        for _ in range(cap_bytes // MIB):
            if time.monotonic() > deadline:
                return
            yield block

    with connect(port, timeout) as sock:
        start = time.perf_counter()
        sender = Sender(sock, pieces())
        sender.start()
        outcome.status, outcome.body, _ = read_answer(sock, timeout)
        sender.join(timeout + 5)
        outcome.seconds = time.perf_counter() - start
        outcome.sent_bytes = sender.sent
        outcome.closed = bool(sender.error)  # the server stopped it; else the cap did
        outcome.error = sender.error
    return outcome


def body_without_key(
    port: int, pid: int | None = None, path: str = "/predict", timeout: float = 10.0
) -> Outcome:
    """A 10 MiB body declared without the API key, of which only the head is sent: a server
    that checks the key first answers 401 at once; one that reads the body first waits."""
    outcome = Outcome("head of a 10 MiB body without the API key")
    with connect(port, timeout) as sock:
        start = time.perf_counter()
        sock.sendall(post_head(path, 10 * MIB))
        outcome.status, outcome.body, outcome.closed = read_answer(sock, timeout)
        outcome.seconds = time.perf_counter() - start
    return outcome


def healthz_latency_during(port: int, action: Callable[[], Outcome]) -> Outcome:
    """Run ``action`` while another client polls ``GET /healthz``; adds the poller's worst
    latency in ms (``healthz_max_ms``): what a stalled event loop costs everyone else."""
    stop = threading.Event()
    worst = [0.0]

    def poll() -> None:
        with connect(port, 30.0) as sock:
            while not stop.is_set():
                start = time.perf_counter()
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
                status, _, closed = read_answer(sock, 30.0)
                worst[0] = max(worst[0], time.perf_counter() - start)
                if status is None or closed:
                    return
                time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        outcome = action()
    finally:
        stop.set()
        poller.join(35)
    outcome.extra["healthz_max_ms"] = round(worst[0] * 1000, 1)
    return outcome


def request_cost(port: int, pid: int, seconds: float) -> str:
    """Server CPU ms per ordinary request and the client's view of it, as one line."""
    from loadtests.harness import HttpSender, cpu_ms_per_request, cpu_seconds, http_request
    from loadtests.harness import measure as measure_loop

    request = http_request("/predict", b"{}", port)
    connect = HttpSender.connector(port, [request], check=lambda status, _: status == 422)
    loop, cpu = measure_loop(
        connect, 8, {"server": lambda: cpu_seconds(pid)}, seconds=seconds, warmup_s=1.0
    )
    server_ms = cpu_ms_per_request(cpu.seconds["server"], loop.completed)
    return (
        f"{loop.rps:.0f} req/s, p50 {loop.percentile_ms(50):.2f} ms, "
        f"p99 {loop.percentile_ms(99):.2f} ms, server {server_ms:.3f} CPU ms/request, "
        f"errors {loop.errors}"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_gateway(env_extra: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    dead = f"http://127.0.0.1:{free_port()}"  # no engines: every probe is refused at the edge
    env.update(
        GATEWAY_PORT=str(port),
        GATEWAY_PREDICTOR_URL=dead,
        GATEWAY_TORCHSERVE_URL=dead,
        GATEWAY_TORCHSERVE_MANAGEMENT_URL=dead,
        GATEWAY_TRITON_URL=dead,
        GATEWAY_TORCHSERVE_KEY_FILE="",
        **env_extra,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return process, port
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the gateway did not listen on {port}: {log.read_text()[-2000:]}")


def _probes(port: int, pid: int, keyed: bool, stall_timeout: float) -> Iterator[Outcome]:
    if keyed:
        yield body_without_key(port, pid, timeout=stall_timeout)
        return
    yield healthz_latency_during(port, lambda: huge_header(port, pid))
    yield many_headers(port, pid)
    yield stalled_body(port, pid, timeout=stall_timeout)
    yield parked_bodies(port, pid)
    yield urllib_upload(port, pid)
    yield endless_upload(port, pid, timeout=15.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, default=Path("runs/http-limits"))
    parser.add_argument("--json", type=Path, help="also write every outcome here")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="give up after")
    parser.add_argument(
        "--overhead-seconds",
        type=float,
        default=0.0,
        help="instead of the probes: server CPU per ordinary request (POST /predict refused "
        "with 422 at the edge, 8 keep-alive callers) for this many seconds, three times",
    )
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.overhead_seconds:
        process, port = _start_gateway({}, args.log_dir / "gateway-overhead.log")
        try:
            for _ in range(3):
                print(request_cost(port, process.pid, args.overhead_seconds), flush=True)
        finally:
            process.terminate()
            process.wait(30)
        return 0
    outcomes: list[Outcome] = []
    for keyed in (False, True):
        env = {"GATEWAY_API_KEY": "probe-key"} if keyed else {}
        process, port = _start_gateway(env, args.log_dir / f"gateway-keyed-{keyed}.log")
        try:
            for outcome in _probes(port, process.pid, keyed, args.stall_timeout):
                outcomes.append(outcome)
                print(outcome.line(), flush=True)
        finally:
            process.terminate()
            process.wait(30)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
