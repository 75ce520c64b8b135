"""What every bench shares: the pinned server, the closed-loop client, CPU accounting, figures.

* :class:`PinnedProcess` starts a server as the leader of a process group of its own, pinned to
  some CPUs (``sched_setaffinity`` before it execs, inherited by all it starts), waits until it
  is ready and stops the whole group (:func:`services.common.processes.stop_group`).
* :func:`closed_loop` drives N concurrent callers, each sending its next request as soon as
  its last answer came, for a duration or a number of requests, after a warm-up; a caller is a
  :class:`Sender` (:class:`HttpSender`, a minimal keep-alive HTTP/1.1 client, for every HTTP
  scenario). :func:`run_loop` runs it on uvloop where installed, so that the load generator is
  not the bottleneck.
* :class:`CpuMeter` reads CPU time from /proc (:func:`cpu_seconds`, :func:`group_cpu_seconds`,
  :func:`core_busy_seconds`) around a run, so a bench can say which side limited it and what
  one request costs the server in CPU milliseconds: comparable even on a busy machine.
* :func:`percentile` is numpy's, for every latency figure.
* Payloads are the held-out digits (:func:`training.digits.held_out_pngs`), in every scenario.
* :func:`serving_line` names the serving config (the version manifest's ``serving`` block)
  an engine ran with, for every bench report.

No Locust import here and no gevent-sensitive import at module level: ``locust -f loadtests``
imports every module of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from services.common.processes import group_members, stop_group
from services.common.repository import load_version
from services.common.serving import ServingConfig

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class BenchError(Exception):
    """The run cannot start or go on; the message says why and what to do."""


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """A bench's ``main``: parse ``argv``, run; a BenchError is one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- CPUs


def cpu_list(cpus: Collection[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def parse_cpus(text: str) -> set[int]:
    """``"1"``, ``"0,2"`` or ``"2-3"`` -> CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list like 1 or 0,2 or 2-3")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin_load_generator(server_cpus: Collection[int], client_cpus: Collection[int]) -> None:
    """Pin this process (the load generator) to ``client_cpus``; BenchError when some CPU of
    either set is not one this process may use."""
    available = os.sched_getaffinity(0)
    if (set(server_cpus) | set(client_cpus)) - available:
        raise BenchError(
            f"CPUs {cpu_list(server_cpus)} and {cpu_list(client_cpus)} must be among "
            f"{cpu_list(available)}"
        )
    os.sched_setaffinity(0, set(client_cpus))


# --------------------------------------------------------------------------- CPU accounting


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc (OSError once it is gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def processes_cpu_seconds(pids: Collection[int]) -> float:
    """CPU time of the processes of ``pids`` still there."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of the live members of process group ``pgid`` (a server and its workers)."""
    return processes_cpu_seconds(group_members(pgid))


def core_busy_seconds(cpu: int) -> float:
    """Busy (non-idle) seconds of one CPU since boot, every process counted, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            return (sum(values[:8]) - idle) / CLOCK_TICKS
    raise ValueError(f"cpu{cpu} not in /proc/stat")


class CpuMeter:
    """CPU seconds each source spent between ``__enter__`` and ``__exit__``, and the wall time.

    A source is a function returning cumulative CPU seconds: ``time.process_time`` for this
    process, ``lambda: group_cpu_seconds(pgid)`` for a server, ``lambda: core_busy_seconds(0)``.
    """

    def __init__(self, sources: Mapping[str, Callable[[], float]]) -> None:
        self.sources = dict(sources)
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self._start: dict[str, float] = {}
        self._wall0 = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: read() for name, read in self.sources.items()}
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.seconds = {name: read() - self._start[name] for name, read in self.sources.items()}

    def busy(self, name: str) -> float:
        """Share of one CPU the source used."""
        return self.seconds.get(name, 0.0) / self.wall if self.wall else float("nan")


def cpu_ms_per_request(cpu_seconds: float, requests: int) -> float:
    return cpu_seconds * 1000.0 / requests if requests else float("nan")


# --------------------------------------------------------------------------- figures


def percentile(samples: Sequence[float], q: float) -> float:
    """numpy's percentile (linear interpolation) of ``samples``; NaN when there are none."""
    if not samples:
        return float("nan")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


# --------------------------------------------------------------------------- servers


def http_ready(url: str) -> Callable[[], bool]:
    """A readiness check: does ``GET url`` answer 200?"""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False  # not listening yet, or not ready (a 503 is an HTTPError)

    return ready


class PinnedProcess:
    """``command`` leading a process group of its own, pinned to ``cpus`` (None: the CPUs this
    process may use); ready once ``ready()`` holds; output into ``log`` when given; run in
    ``cwd`` when given (``python -m`` imports from it first)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        cpus: Collection[int] | None = None,
        ready: Callable[[], bool] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.ready = ready
        pinned = set(cpus) if cpus else None
        self._log = log.open("wb") if log is not None else None
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            start_new_session=True,  # its own process group: stop() reaches all it starts
            preexec_fn=(lambda: os.sched_setaffinity(0, pinned)) if pinned else None,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 120.0, interval_s: float = 0.05) -> float:
        """Poll the readiness check until it holds; return seconds since the start. BenchError
        when the process exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the {self.name} exited with {self.process.returncode}")
            if self.ready is None or self.ready():
                return time.perf_counter() - self.started
            time.sleep(interval_s)
        raise BenchError(f"the {self.name} did not become ready in {timeout_s:g}s")

    def cpu_seconds(self) -> float:
        """CPU time of the live members of its process group."""
        return group_cpu_seconds(self.pid)

    def stop(self, timeout_s: float = 15.0) -> list[int]:
        """SIGTERM the group, SIGKILL what is left after ``timeout_s``; the pids killed."""
        try:
            return stop_group(self.pid, timeout_s=timeout_s, leader=self.process)
        finally:
            if self._log is not None:
                self._log.close()

    def __enter__(self) -> PinnedProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def service(
    name: str,
    env: Mapping[str, str],
    cpus: Collection[int] | None,
    port: int,
    log: Path | None = None,
) -> PinnedProcess:
    """``python -m services.<name>`` configured only by ``env`` (the caller's own ``<NAME>_*``
    variables are dropped); ready once ``GET /readyz`` on ``port`` answers 200; its output
    into ``log`` when given."""
    prefix = f"{name.upper()}_"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    return PinnedProcess(
        name,
        [sys.executable, "-m", f"services.{name}"],
        inherited | dict(env),
        cpus=cpus,
        ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
        log=log,
    )


# --------------------------------------------------------------------------- the client


class Sender(Protocol):
    """One caller's connection: sends the next request, says whether its answer was right."""

    async def send(self) -> bool: ...

    async def close(self) -> None: ...


Connect = Callable[[int], Awaitable[Sender]]
"""Opens the connection of caller ``index``."""


def http_request(
    path: str,
    body: bytes,
    port: int,
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    """A whole ``POST`` request, ready to write to a keep-alive connection."""
    fields = {"Content-Type": "application/json", **(headers or {})}
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers, up to the empty line that ends the answer
    return status, bytes(body)


Check = Callable[[int, bytes], bool]


class HttpSender:
    """A keep-alive connection sending prepared requests in turn, starting at ``first``; an
    answer is right when ``check(status, body)`` says so (default: status 200)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: Sequence[bytes],
        first: int = 0,
        check: Check | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.requests = requests
        self.next = first
        self.check = check

    @classmethod
    def connector(cls, port: int, requests: Sequence[bytes], check: Check | None = None) -> Connect:
        """The :data:`Connect` of callers that each open a connection to 127.0.0.1:``port``."""

        async def connect(index: int) -> Sender:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return cls(reader, writer, requests, index, check)

        return connect

    async def send(self) -> bool:
        self.writer.write(self.requests[self.next % len(self.requests)])
        self.next += 1
        status, body = await read_response(self.reader)
        return self.check(status, body) if self.check is not None else status == 200

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Loop:
    """One closed-loop run: the measured requests' latencies and errors, the measured window,
    and every request answered, warm-up included (what the server's CPU time paid for)."""

    concurrency: int
    latencies: list[float] = field(default_factory=list)
    """Seconds, of every request started inside the measured window."""
    errors: int = 0
    seconds: float = 0.0
    completed: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.latencies)) * 1000.0 if self.latencies else float("nan")

    def add(self, other: Loop) -> None:
        """Pool another run of the same cell into this one."""
        self.latencies.extend(other.latencies)
        self.errors += other.errors
        self.seconds += other.seconds
        self.completed += other.completed


async def closed_loop(
    connect: Connect,
    concurrency: int,
    *,
    seconds: float | None = None,
    requests: int | None = None,
    warmup_s: float = 0.0,
    warmup_requests: int = 0,
) -> Loop:
    """``concurrency`` callers, each sending its next request as soon as its last answer came.

    The first ``warmup_requests`` requests and those started in the first ``warmup_s`` seconds
    are not measured; the measured window then lasts ``seconds`` or until ``requests`` were
    started, whichever comes first. A request that raises (a dropped connection) counts as an
    error, and its caller connects again.
    """
    if seconds is None and requests is None:
        raise ValueError("a closed loop needs seconds or requests")
    result = Loop(concurrency)
    begin = time.perf_counter()
    warm_until = begin + warmup_s
    measure_from: float | None = warm_until if warmup_requests == 0 else None
    last_end = begin
    started = 0  # every request started, warm-up included
    measured = 0  # requests started inside the measured window

    def take() -> bool | None:
        """Whether the request about to start is measured; None: this caller is done."""
        nonlocal started, measured, measure_from
        now = time.perf_counter()
        timed = started >= warmup_requests and now >= warm_until
        if timed:
            if measure_from is None:
                measure_from = now
            if seconds is not None and now >= measure_from + seconds:
                return None
            if requests is not None and measured >= requests:
                return None
            measured += 1
        started += 1
        return timed

    async def caller(index: int) -> None:
        nonlocal last_end
        sender = await connect(index)
        try:
            while (timed := take()) is not None:
                start = time.perf_counter()
                try:
                    ok = await sender.send()
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    logger.warning("caller %d: %s; connecting again", index, exc)
                    ok = False
                    await sender.close()
                    sender = await connect(index)
                end = time.perf_counter()
                result.completed += 1
                if timed:
                    result.latencies.append(end - start)
                    result.errors += not ok
                    last_end = max(last_end, end)
        finally:
            await sender.close()

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    if requests is None and seconds is not None:
        result.seconds = seconds
    else:
        result.seconds = last_end - measure_from if measure_from is not None else 0.0
    return result


def run_loop(coro: Coroutine[Any, Any, T], uvloop_ok: bool = True) -> T:
    """uvloop when installed (and ``uvloop_ok``): the load generator must not be the
    bottleneck."""
    if uvloop_ok:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def measure(
    connect: Connect,
    concurrency: int,
    servers: Mapping[str, Callable[[], float]],
    *,
    uvloop_ok: bool = True,
    **load: Any,
) -> tuple[Loop, CpuMeter]:
    """One :func:`closed_loop` (``load`` its keyword arguments) with the CPU time of each of
    ``servers``, and of this load generator (``"client"``), measured around it."""
    with CpuMeter({**servers, "client": time.process_time}) as cpu:
        loop = run_loop(closed_loop(connect, concurrency, **load), uvloop_ok)
    return loop, cpu


# --------------------------------------------------------------------------- the model


def serving_config(repo: Path, model: str, version: int | None = None) -> tuple[int, ServingConfig]:
    """The version (None: the newest) and the serving config its manifest gives."""
    loaded = load_version(repo, model, version)
    return loaded.version, loaded.manifest.serving


def serving_line(
    engine: str,
    repo: Path,
    model: str,
    version: int | None = None,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """One line for a bench report: the serving config ``engine`` ran ``model`` with."""
    number, serving = serving_config(repo, model, version)
    values = ", ".join(f"{name}={value}" for name, value in serving.model_dump().items())
    line = f"{engine} served {model} v{number} with the serving config {values}"
    if overrides:
        changed = ", ".join(f"{name}={value}" for name, value in overrides.items())
        line += f" (this bench overrides {changed})"
    return line
