"""perf_analyzer, Triton's own load generator, set up once on this machine, located and run.

The PyPI wheel ``perf-analyzer`` carries the real binary only in a wheel tagged
``manylinux_2_38``; on an older glibc (Debian 12 has 2.36) ``pip install perf-analyzer`` picks
a 0.1.0 placeholder without it. :func:`install` therefore sets it up by hand, once, in a cache
folder (``.cache/perf-analyzer`` under the checkout, ignored by git):

1. ``pip download`` the real wheel (this interpreter's pip, so the machine's pip settings and
   CA bundle apply) and take ``perf_analyzer/bin/perf_analyzer`` out of it;
2. if the binary runs as it is (glibc 2.38 or newer), that is all;
3. otherwise download Debian trixie's ``libc6``, ``libstdc++6`` and ``libgcc-s1`` with
   ``apt-get download`` through an apt configuration of its own (a sources list for trixie,
   its own state and cache folders, nothing of the machine's apt touched), unpack them with
   ``dpkg-deb -x``, and run the binary through trixie's dynamic loader with
   ``--library-path``: trixie's C and C++ runtimes first, the machine's own libraries (OpenSSL,
   zlib) after them.

:class:`PerfAnalyzer` builds the command line; :func:`run` runs one measurement at one
concurrency with a fixed request count (no stabilisation windows, which a busy 2-core machine
rarely satisfies) and reads the CSV perf_analyzer writes. perf_analyzer stops at the first
failed request with a non-zero exit status, so a measurement that completes had no error.
The input-data helpers write perf_analyzer's ``--input-data`` JSON: FP32 tensors and BYTES
tensors in ``b64`` (a BYTES element is a 4-byte little-endian length and its bytes, as Triton
serialises it), and TorchServe's file list.

Standard library only (``locust -f loadtests`` imports every module of this package).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import json
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache" / "perf-analyzer"

#: The wheel pip downloads (pinned: the table's figures come from one known build).
WHEEL_REQUIREMENT = "perf-analyzer==2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
WHEEL_MEMBER = "perf_analyzer/bin/perf_analyzer"

#: Debian release whose C and C++ runtimes are new enough, and the packages taken from it.
#: Not pinned to versions: a Debian mirror keeps only the current point release's.
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
RUNTIME_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
LIB_DIR = "usr/lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
#: The machine's own library folders, searched after trixie's for what the binary also needs.
SYSTEM_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")

READY_FILE = "ready.json"
SETUP_TIMEOUT_S = 600.0

Protocol = Literal["http", "grpc"]
ServiceKind = Literal["triton", "torchserve"]


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be set up or a run failed; the message says why."""


@dataclass(frozen=True)
class PerfAnalyzer:
    """The binary, and the loader and library path it needs here (None: it runs as it is)."""

    binary: Path
    loader: Path | None = None
    library_path: str | None = None

    def command(self, args: Sequence[str]) -> list[str]:
        """The command line running perf_analyzer with ``args``."""
        if self.loader is None:
            return [str(self.binary), *args]
        assert self.library_path is not None
        return [str(self.loader), "--library-path", self.library_path, str(self.binary), *args]

    def version(self) -> str:
        """perf_analyzer's own version line; PerfAnalyzerError when the binary does not run."""
        done = subprocess.run(
            self.command(["--version"]), capture_output=True, text=True, timeout=30, check=False
        )
        line = (done.stdout + done.stderr).strip().splitlines()
        if done.returncode != 0 or not line or "Perf Analyzer" not in line[0]:
            raise PerfAnalyzerError(
                f"perf_analyzer does not run ({' '.join(self.command(['--version']))}): "
                f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-500:]}"
            )
        return line[0]


# --------------------------------------------------------------------------- setup


def _run(command: Sequence[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-2000:]
        raise PerfAnalyzerError(f"{what} failed (exit {done.returncode}): {output}")


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One setup at a time per cache folder (a test and `make perf-analyzer` may race)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def locate(cache: Path = DEFAULT_CACHE) -> PerfAnalyzer | None:
    """The perf_analyzer :func:`install` set up in ``cache``, or None when there is none."""
    try:
        ready = json.loads((cache / READY_FILE).read_text())
    except (OSError, ValueError):
        return None
    binary = cache / "bin" / "perf_analyzer"
    if not binary.is_file():
        return None
    if ready.get("loader") is None:
        return PerfAnalyzer(binary)
    runtime = cache / DEBIAN_SUITE / LIB_DIR
    library_path = ":".join([str(runtime), *SYSTEM_LIB_DIRS])
    return PerfAnalyzer(binary, runtime / LOADER, library_path)


def _download_binary(cache: Path, work: Path) -> Path:
    """``pip download`` the manylinux_2_38 wheel; its binary copied to ``cache/bin``."""
    _run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
            "--dest", str(work), WHEEL_REQUIREMENT,
        ],
        f"pip download {WHEEL_REQUIREMENT}",
    )  # fmt: skip
    wheels = sorted(work.glob("perf_analyzer-*.whl"))
    if not wheels:
        raise PerfAnalyzerError(f"pip download {WHEEL_REQUIREMENT} left no wheel in {work}")
    target = cache / "bin" / "perf_analyzer"
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            data = wheel.read(WHEEL_MEMBER)
        except KeyError:
            raise PerfAnalyzerError(f"{wheels[0].name} has no {WHEEL_MEMBER}") from None
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def apt_options(apt: Path) -> list[str]:
    """apt-get options of an apt configuration living in ``apt``: its own sources list (trixie
    only), state, cache and status file, so the machine's apt is neither read nor changed."""
    return [
        "-o", f"Dir::Etc::sourcelist={apt / 'sources.list'}",
        "-o", f"Dir::Etc::sourceparts={apt / 'sources.list.d'}",
        "-o", f"Dir::Etc::preferencesparts={apt / 'preferences.d'}",
        "-o", f"Dir::State={apt / 'state'}",
        "-o", f"Dir::State::status={apt / 'state' / 'status'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Architecture=amd64",
        "-o", "Acquire::Languages=none",
        # Downloads land in folders this user owns: no switch to the _apt user.
        "-o", f"APT::Sandbox::User={pwd.getpwuid(os.getuid()).pw_name}",
    ]  # fmt: skip


def _download_runtime(cache: Path, work: Path) -> None:
    """trixie's C and C++ runtimes, unpacked into ``cache/trixie``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PerfAnalyzerError(
                f"perf_analyzer needs glibc 2.38; this machine has an older one and no {tool} "
                "to fetch Debian trixie's runtime with"
            )
    apt = work / "apt"
    for folder in ("sources.list.d", "preferences.d", "state/lists/partial", "debs"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    (apt / "sources.list").write_text(
        f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
    )
    options = apt_options(apt)
    _run(["apt-get", *options, "-qq", "update"], f"apt-get update ({DEBIAN_SUITE})")
    _run(
        ["apt-get", *options, "-qq", "download", *RUNTIME_PACKAGES],
        f"apt-get download {' '.join(RUNTIME_PACKAGES)} ({DEBIAN_SUITE})",
        cwd=apt / "debs",
    )
    unpacked = work / DEBIAN_SUITE
    for deb in sorted((apt / "debs").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"dpkg-deb -x {deb.name}")
    target = cache / DEBIAN_SUITE
    if target.exists():
        shutil.rmtree(target)
    unpacked.replace(target)
    (cache / "debs.txt").write_text(
        "".join(f"{deb.name}\n" for deb in sorted((apt / "debs").glob("*.deb")))
    )


def install(cache: Path = DEFAULT_CACHE, log: Any = None) -> PerfAnalyzer:
    """perf_analyzer ready to run, set up in ``cache`` the first time (see the module's
    docstring); later calls only :func:`locate` it. ``log`` (a print-like callable) hears
    each step. PerfAnalyzerError when a step fails."""
    if platform.machine() != "x86_64":
        raise PerfAnalyzerError(f"the perf-analyzer wheel is for x86_64, not {platform.machine()}")
    say = log or (lambda *_args: None)
    with _locked(cache):
        found = locate(cache)
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(dir=cache, prefix="setup-") as tmp:
            work = Path(tmp)
            say(f"perf_analyzer: pip download {WHEEL_REQUIREMENT} ({WHEEL_PLATFORM})")
            binary = _download_binary(cache, work)
            tool = PerfAnalyzer(binary)
            try:
                tool.version()
            except PerfAnalyzerError:
                say(
                    f"perf_analyzer: fetching Debian {DEBIAN_SUITE}'s {', '.join(RUNTIME_PACKAGES)}"
                )
                _download_runtime(cache, work)
                runtime = cache / DEBIAN_SUITE / LIB_DIR
                tool = PerfAnalyzer(
                    binary, runtime / LOADER, ":".join([str(runtime), *SYSTEM_LIB_DIRS])
                )
            version = tool.version()
            ready = {
                "wheel": WHEEL_REQUIREMENT,
                "version": version,
                "loader": str(tool.loader) if tool.loader else None,
            }
            (cache / READY_FILE).write_text(json.dumps(ready, indent=2) + "\n")
            say(f"perf_analyzer: {version}, set up in {cache}")
        return tool


# --------------------------------------------------------------------------- input data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tensor_input_data(name: str, rows: Sequence[bytes]) -> dict[str, Any]:
    """``--input-data`` with one step per row: ``rows`` are each one request's raw tensor
    bytes (little-endian, e.g. ``array.astype("<f4").tobytes()``)."""
    return {"data": [{name: {"b64": _b64(row)}} for row in rows]}


def bytes_input_data(name: str, blobs: Sequence[bytes]) -> dict[str, Any]:
    """``--input-data`` for a BYTES input of one element per request (``[1]``): each blob in
    Triton's serialised form, a 4-byte little-endian length and then its bytes."""
    return {"data": [{name: {"b64": _b64(len(b).to_bytes(4, "little") + b)}} for b in blobs]}


def torchserve_input_data(files: Sequence[Path]) -> dict[str, Any]:
    """``--input-data`` for ``--service-kind=torchserve``: files perf_analyzer uploads."""
    return {"data": [{"TORCHSERVE_INPUT": [str(path)]} for path in files]}


# --------------------------------------------------------------------------- one measurement


@dataclass(frozen=True)
class Measurement:
    """What one completed perf_analyzer run measured (latencies in milliseconds)."""

    concurrency: int
    requests: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    avg_ms: float


def _request_count(output: str) -> int:
    """The client's request count from perf_analyzer's report (first ``Request count:``)."""
    for line in output.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "Request count":
            return int(value.strip())
    raise PerfAnalyzerError(f"no request count in perf_analyzer's output:\n{output[-2000:]}")


def _average_latency_us(output: str) -> float:
    for line in output.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "Avg latency":
            return float(value.split()[0])
    return float("nan")


def run(
    tool: PerfAnalyzer,
    *,
    url: str,
    model: str,
    input_data: Mapping[str, Any],
    protocol: Protocol = "http",
    service_kind: ServiceKind = "triton",
    concurrency: int = 2,
    requests: int = 200,
    warmup_requests: int = 0,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    extra_args: Sequence[str] = (),
) -> Measurement:
    """One perf_analyzer run of ``requests`` requests at ``concurrency`` against ``url``
    (``host:port``). PerfAnalyzerError, with perf_analyzer's output, when it fails (a failed
    request stops it) or does not end within ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        data_file = Path(tmp) / "input.json"
        data_file.write_text(json.dumps(input_data))
        csv_file = Path(tmp) / "result.csv"
        args = [
            "-m", model, "-u", url, "-i", protocol, f"--service-kind={service_kind}",
            "--input-data", str(data_file),
            "--concurrency-range", str(concurrency),
            "--request-count", str(requests),
            "-f", str(csv_file),
        ]  # fmt: skip
        if warmup_requests:
            args += ["--warmup-request-count", str(warmup_requests)]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        args += list(extra_args)
        try:
            done = subprocess.run(
                tool.command(args), capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise PerfAnalyzerError(f"perf_analyzer ran past {timeout_s:g}s") from exc
        output = done.stdout + done.stderr
        if done.returncode != 0 or not csv_file.is_file():
            raise PerfAnalyzerError(
                f"perf_analyzer against {model} at {url} ({protocol}, {service_kind}) exited "
                f"{done.returncode}: {output.strip()[-1500:]}"
            )
        with csv_file.open(newline="") as handle:
            row = next(csv.DictReader(handle))
    return Measurement(
        concurrency=int(row["Concurrency"]),
        requests=_request_count(output),
        throughput=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1000.0,
        p90_ms=float(row["p90 latency"]) / 1000.0,
        p99_ms=float(row["p99 latency"]) / 1000.0,
        avg_ms=_average_latency_us(output) / 1000.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadtests.perf_analyzer [perf_analyzer's own arguments]``: set perf_analyzer
    up when needed, then run it with those arguments; its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        tool = install(log=lambda line: print(line, file=sys.stderr))
    except PerfAnalyzerError as exc:
        print(f"python -m loadtests.perf_analyzer: {exc}", file=sys.stderr)
        return 2
    return subprocess.call(tool.command(args))


if __name__ == "__main__":
    sys.exit(main())
