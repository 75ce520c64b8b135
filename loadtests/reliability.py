"""Before/after figures of issue 17's defects 1, 4, 5, 8 and 9, for the servers of one checkout.

Each probe starts the real processes of the checkout given with ``--code`` (its ``services`` and
``training`` imported through ``PYTHONPATH``, run from that folder; this checkout by default),
does what the issue's audit did, prints one table and removes what it started. Run it once with
``--code`` pointing at a checkout of the code before the fixes and once without, for the
issue's before/after figures (defects 2, 3, 6 and 7 are ``loadtests/http_limits.py``'s)::

    python loadtests/reliability.py --code ../before --checkpoint best.pt decode
    flock /work/locks/stack.lock python loadtests/reliability.py --checkpoint best.pt restart

Probes (each needs a trained checkpoint, ``--checkpoint``, published with the checkout's own
``python -m training publish``):

restart   (defect 1) ``python -m services.stack up`` on a repository whose newest version has
          one flipped byte in ``model.pt``, a client sending through the gateway to each engine
          in turn: when each engine first answered, the share of failed requests, supervisord's
          starts and final state per program. Binds the stack's fixed ports: hold the lock.
decode    (defect 4) a 16-bit 39.9 Mpx PNG of a few tens of KB, then a textured 2048x2048 RGB
          one (the most the new limits let through), to the predictor: status, time, its peak
          RSS growth; then four at once with a digit sent while they are in flight, and that
          digit's latency.
publish   (defect 5) ``python -m training publish`` killed (``os._exit``) at its k-th rename, for
          every k: the folders of the uncommitted version a loader could see, then what the
          next normal publish leaves behind (numbered folders of no committed version, staging
          folders, temp files).
triton    (defect 8) the local tritonserver (``python -m services.triton up``): a shared-memory
          region register and a log-settings change without a key, then ``kill -9`` of the
          server's process group (server and python-backend stubs) and ``down``: the /dev/shm
          regions it had mapped that are still there.
contract  (defect 9) the predictor and a gateway: whether their OpenAPI accepts
          ``{"images": []}`` and ``{"images": [""]}``, the v2 routes' documented 400/404,
          ``/metrics``' documented type, both services' answer to 10,000-deep JSON, absolute
          paths in the gateway's ``/readyz``, and the breaker's ``OPEN -> OPEN`` log lines after
          20 calls to an engine that is ready but answers every call with a 500.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: this checkout's loadtests, not --code's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from loadtests.harness import PinnedProcess, http_ready
from loadtests.http_limits import Memory, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "classifier"
BACKENDS = ("predictor", "torchserve", "triton")


@dataclass(frozen=True)
class Code:
    """The checkout whose servers a probe runs."""

    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process of this checkout (its ``services`` first on the path;
        the caller's engine settings dropped, so only ``extra`` configures it)."""
        prefixes = ("PREDICTOR_", "GATEWAY_", "TRITON_", "TORCHSERVE_", "STACK_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        return env | {"PYTHONPATH": str(self.root), "PYTHONUNBUFFERED": "1"} | extra

    def run(
        self, args: Sequence[str], timeout: float, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """``python <args>`` in this checkout, to the end."""
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, name: str, module: str, log: Path, ready_url: str, **env: str) -> PinnedProcess:
        """``python -m <module>`` of this checkout in a process group of its own."""
        return PinnedProcess(
            name,
            [sys.executable, "-m", module],
            self.env(**env),
            ready=http_ready(ready_url),
            log=log,
            cwd=self.root,
        )

    def publish(self, checkpoint: Path, repo: Path) -> int:
        """``python -m training publish`` of this checkout; the new version's number."""
        done = self.run(
            ["-m", "training", "publish", "--checkpoint", str(checkpoint), "--repo", str(repo)],
            900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"publish failed: {done.stderr[-2000:]}")
        return max(int(p.parent.name) for p in (repo / MODEL).glob("*/manifest.json"))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def digit_png() -> bytes:
    """A held-out digit as the clients send it."""
    from training.digits import held_out_digits

    return held_out_digits(1)[0].png


def b64_body(image: bytes) -> dict[str, str]:
    return {"image": base64.b64encode(image).decode()}


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table under a heading line."""
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- defect 1


@dataclass
class Client:
    """Posts a digit through the gateway every ``interval_s``, to each engine in turn."""

    url: str
    image: bytes
    interval_s: float = 0.2
    seen: list[tuple[float, str, str]] = field(default_factory=list)  # (t, backend, outcome)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, started: float) -> None:
        turn = 0
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                backend = BACKENDS[turn % len(BACKENDS)]
                turn += 1
                try:
                    response = client.post(
                        f"{self.url}/predict",
                        params={"backend": backend},
                        json=b64_body(self.image),
                    )
                    outcome = str(response.status_code)
                    if response.status_code == 200:
                        outcome += f" v{response.json().get('version')}"
                except httpx.ConnectError:
                    outcome = "not listening"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.seen.append((time.monotonic() - started, backend, outcome))
                time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def _supervisor_report(code: Code, run: Path) -> dict[str, tuple[str, int]]:
    """Each program's supervisord state and how many times supervisord spawned it."""
    ctl = Path(sys.executable).parent / "supervisorctl"
    done = subprocess.run(
        [str(ctl), "-c", str(run / "supervisord.conf"), "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    states = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.split()}
    log = (run / "supervisord.log").read_text() if (run / "supervisord.log").exists() else ""
    return {
        name: (states.get(name, "?"), log.count(f"spawned: '{name}'"))
        for name in (*BACKENDS, "gateway")
    }


def probe_restart(code: Code, checkpoint: Path, work: Path, window_s: float) -> str:
    repo = work / "model_repository"
    good = code.publish(checkpoint, repo)
    bad = code.publish(checkpoint, repo)
    flip_byte(repo / f"{MODEL}_torchscript" / str(bad) / "model.pt")
    run = work / "run"
    env = {
        "STACK_RUN_DIR": str(run),
        "STACK_REPOSITORY": str(repo),
        "STACK_READY_TIMEOUT_S": str(window_s),
    }
    client = Client("http://127.0.0.1:8000", digit_png())
    started = time.monotonic()
    sender = threading.Thread(target=client.run, args=(started,), daemon=True)
    sender.start()
    try:
        up = code.run(["-m", "services.stack", "up"], window_s + 120, **env)
        up_s = time.monotonic() - started
        time.sleep(15)  # traffic on what `up` left running
        client.stop()
        sender.join(60)
        report = _supervisor_report(code, run)
        readyz = ""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            body = httpx.get("http://127.0.0.1:8000/readyz", timeout=5).json()
            readyz = "; ".join(
                f"{name}: v{state.get('version')} refused "
                f"{[r.get('version') for r in state.get('refused_versions', [])]}"
                for name, state in body.get("backends", {}).items()
            )
    finally:
        down = code.run(["-m", "services.stack", "down"], 300, **env)
    rows = []
    for backend in BACKENDS:
        mine = [(t, outcome) for t, b, outcome in client.seen if b == backend]
        listening = [(t, o) for t, o in mine if o != "not listening"]
        answered = [t for t, o in listening if o.startswith("200")]
        failed = [o for _, o in listening if not o.startswith("200")]
        after_first = [o for t, o in listening if answered and t > answered[0]]
        kinds = sorted(set(failed))[:3]
        rows.append(
            [
                backend,
                f"{answered[0]:.0f}" if answered else f"never (in {up_s + 15:.0f})",
                f"{len(failed)}/{len(listening)}",
                sum(not o.startswith("200") for o in after_first),
                ", ".join(kinds),
                "{} x{}".format(*report[backend]),
            ]
        )
    rows.append(["gateway", "", "", "", "", "{} x{}".format(*report["gateway"])])
    verdict = "ready" if up.returncode == 0 else f"failed ({up.stderr.strip().splitlines()[-1:]})"
    return table(
        f"defect 1: `up` on v{good} + corrupt v{bad} ({code.root}): up {verdict} after "
        f"{up_s:.0f}s; down rc {down.returncode}; gateway /readyz: {readyz or 'no answer'}",
        [
            "engine",
            "first 200 at s",
            "failed/sent (gateway listening)",
            "failed after the first 200",
            "failures",
            "supervisord state x spawns",
        ],
        rows,
    )


# --------------------------------------------------------------------------- defect 4


def png16(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG, nearly all one value: tens of KB for ``width * height`` pixels."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width), dtype=np.uint16)
    pixels[::64, ::64] = 40_000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def rgb_textured(side: int) -> bytes:
    """An RGB PNG with texture, ``side`` pixels square: slow to decode, about 2 MB at 2048."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x * y) % 251, (x + y) % 256, (x ^ y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def probe_decode(code: Code, checkpoint: Path, work: Path) -> str:
    repo = work / "model_repository"
    code.publish(checkpoint, repo)
    port = free_port()
    predictor = code.start(
        "predictor",
        "services.predictor",
        work / "predictor.log",
        f"http://127.0.0.1:{port}/readyz",
        PREDICTOR_PORT=str(port),
        PREDICTOR_GRPC_PORT=str(free_port()),
        PREDICTOR_REPOSITORY=str(repo),
        PREDICTOR_MODEL=MODEL,
    )
    images = {
        "16-bit 6320x6320": png16(6320, 6320),
        "RGB 2048x2048 textured": rgb_textured(2048),
    }
    normal = digit_png()
    url = f"http://127.0.0.1:{port}/predict"
    rows: list[list[object]] = []
    try:
        predictor.wait_ready(300)
        httpx.post(url, json=b64_body(normal), timeout=60)  # warm
        for name, image in images.items():
            label = f"{name} ({len(image) / 1024:.0f} KB)"
            rows.append([f"{label}: one", *_large_requests(url, predictor.pid, image, 1, None)])
            rows.append(
                [f"{label}: four at once", *_large_requests(url, predictor.pid, image, 4, normal)]
            )
    finally:
        predictor.stop()
    return table(
        f"defect 4: large PNGs to the predictor ({code.root})",
        ["requests", "status", "seconds (all)", "peak RSS growth MiB", "a digit sent meanwhile"],
        rows,
    )


def _large_requests(
    url: str, pid: int, image: bytes, count: int, normal: bytes | None
) -> list[object]:
    """``count`` posts of ``image`` at once (and ``normal`` once they are in): their statuses,
    seconds, the server's peak RSS growth, the normal one's status and latency."""

    def post(body: bytes) -> tuple[int, str, float]:
        begun = time.perf_counter()
        answer = httpx.post(url, json=b64_body(body), timeout=300)
        code = "" if answer.status_code == 200 else f" {answer.json().get('code', '')}"
        return answer.status_code, code, time.perf_counter() - begun

    with Memory.watch(pid) as memory, ThreadPoolExecutor(count + 1) as pool:
        start = time.perf_counter()
        futures = [pool.submit(post, image) for _ in range(count)]
        meanwhile = ""
        if normal is not None:
            time.sleep(0.3)  # the large ones are in: the normal one comes while they decode
            status, _, seconds = pool.submit(post, normal).result()
            meanwhile = f"{status} in {seconds * 1000:.0f} ms"
        answers = [f.result() for f in futures]
        total = time.perf_counter() - start
    statuses = ",".join(sorted(f"{status}{code}" for status, code, _ in answers))
    return [statuses, f"{total:.2f}", f"{memory.peak - memory.before:+.0f}", meanwhile]


# --------------------------------------------------------------------------- defect 5

#: ``python -m training publish`` with every os.rename/os.replace counted; at the k-th the
#: process ends at once (no ``finally`` runs); it prints the number of renames a whole run made.
CRASHING_PUBLISH = """
import os, runpy, sys
crash_at, renames = int(sys.argv[1]), 0
real = {"rename": os.rename, "replace": os.replace}
def counted(name):
    def rename(*args, **kwargs):
        global renames
        renames += 1
        if renames == crash_at:
            os._exit(17)
        return real[name](*args, **kwargs)
    return rename
os.rename, os.replace = counted("rename"), counted("replace")
sys.argv = ["training", *sys.argv[2:]]
try:
    runpy.run_module("training", run_name="__main__")
finally:
    print("renames", renames, file=sys.stderr)
"""


def committed(repo: Path) -> set[int]:
    return {int(p.parent.name) for p in (repo / MODEL).glob("*/manifest.json")}


def leftovers(repo: Path, versions: set[int]) -> list[str]:
    """What belongs to no committed version: numbered folders of other numbers (in any model's
    folder), numbered folders without their files, staging folders, temp files."""
    found = []
    for path in sorted(repo.rglob("*")):
        relative = path.relative_to(repo)
        parts = relative.parts
        name = path.name
        stray_version = name.isdigit() and path.is_dir() and int(name) not in versions
        staging = name.startswith(".") or "stag" in name
        temp = name.endswith(".tmp") or ".tmp." in name
        if (len(parts) == 2 and (stray_version or staging)) or temp:
            found.append(str(relative))
    return found


def probe_publish(code: Code, checkpoint: Path, work: Path) -> str:
    repo = work / "model_repository"
    first = code.publish(checkpoint, repo)
    pristine = work / "pristine"
    shutil.copytree(repo, pristine, symlinks=True)
    args = ["--checkpoint", str(checkpoint), "--repo", str(repo)]
    whole = code.run(["-c", CRASHING_PUBLISH, "0", "publish", *args], 900)
    total = int(whole.stderr.rsplit("renames", 1)[1].split()[0])
    rows: list[list[object]] = []
    for crash_at in range(1, total + 1):
        shutil.rmtree(repo)
        shutil.copytree(pristine, repo, symlinks=True)
        crashed = code.run(["-c", CRASHING_PUBLISH, str(crash_at), "publish", *args], 900)
        early = leftovers(repo, committed(repo))
        versions = sorted(committed(repo))
        after = code.run(["-m", "training", "publish", *args], 900)
        left = leftovers(repo, committed(repo))
        rows.append(
            [
                crash_at,
                crashed.returncode,
                ",".join(map(str, versions)),
                len(early),
                ", ".join(early[:4]) + (" ..." if len(early) > 4 else ""),
                after.returncode,
                len(left),
                ", ".join(left[:4]) + (" ..." if len(left) > 4 else ""),
            ]
        )
    return table(
        f"defect 5: publish killed at each of its {total} renames, on v{first} ({code.root})",
        [
            "rename",
            "rc",
            "committed",
            "uncommitted parts",
            "which",
            "next publish rc",
            "left after it",
            "which",
        ],
        rows,
    )


# --------------------------------------------------------------------------- defect 8


def _shm_mapped(pids: Sequence[int]) -> set[str]:
    """The /dev/shm files these processes have mapped."""
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
    return names


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


def probe_triton(code: Code, checkpoint: Path, work: Path) -> str:
    repo = work / "model_repository"
    code.publish(checkpoint, repo)
    ports = [free_port() for _ in range(3)]
    env = {
        "TRITON_REPOSITORY": str(repo),
        "TRITON_MODEL": MODEL,
        "TRITON_RUN_DIR": str(work / "triton"),
        "TRITON_HTTP_PORT": str(ports[0]),
        "TRITON_GRPC_PORT": str(ports[1]),
        "TRITON_METRICS_PORT": str(ports[2]),
    }
    base = f"http://127.0.0.1:{ports[0]}"
    up = code.run(["-m", "services.triton", "up"], 600, **env)
    if up.returncode != 0:
        raise RuntimeError(f"triton up failed: {up.stderr[-2000:]}")
    rows: list[list[object]] = []
    try:
        server = int((work / "triton" / "tritonserver.pid").read_text().split()[0])
        region = Path("/dev/shm/reliability_probe")
        region.write_bytes(b"\0" * 4096)
        try:
            register = httpx.post(
                f"{base}/v2/systemsharedmemory/region/probe/register",
                json={"key": "/reliability_probe", "offset": 0, "byte_size": 4096},
                timeout=10,
            )
            status = httpx.get(f"{base}/v2/systemsharedmemory/status", timeout=10)
            logging = httpx.post(f"{base}/v2/logging", json={"log_verbose_level": 1}, timeout=10)
        finally:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{base}/v2/systemsharedmemory/region/probe/unregister", timeout=10)
            region.unlink()
        rows += [
            ["register a region, no key", register.status_code, register.text[:80]],
            ["shared-memory status, no key", status.status_code, status.text[:80]],
            ["log settings, no key", logging.status_code, logging.text[:80]],
        ]
        pgid = os.getpgid(server)
        mapped = _shm_mapped(_group(pgid))
        os.killpg(pgid, signal.SIGKILL)  # the server and its python-backend stubs at once
        time.sleep(3)
        after_kill = [n for n in mapped if (Path("/dev/shm") / n).exists()]
        rows.append(
            [
                "/dev/shm regions mapped -> left after kill -9 of its group",
                len(mapped),
                len(after_kill),
            ]
        )
    finally:
        down = code.run(["-m", "services.triton", "down"], 300, **env)
    left = [n for n in mapped if (Path("/dev/shm") / n).exists()]
    size = sum((Path("/dev/shm") / n).stat().st_size for n in left)
    rows.append(
        ["... and after `down`", f"rc {down.returncode}", f"{len(left)} ({size / 2**20:.1f} MiB)"]
    )
    for name in left:  # not ours to keep
        with contextlib.suppress(OSError):
            (Path("/dev/shm") / name).unlink()
    return table(
        f"defect 8: local tritonserver ({code.root})", ["check", "status / count", "answer"], rows
    )


# --------------------------------------------------------------------------- defect 9


def _schema_accepts(doc: dict[str, Any], path: str, body: object) -> bool:
    """Whether ``body`` is valid for ``POST path``'s JSON request schema in ``doc``."""
    import jsonschema  # type: ignore[import-untyped]

    request = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = {**request, "components": doc.get("components", {})}
    return bool(jsonschema.Draft202012Validator(schema).is_valid(body))


def _v2_documented(doc: dict[str, Any]) -> str:
    """How many v2 operations document a 400 (POST) or a 404 (model routes)."""
    posts = [
        op
        for p, ops in doc["paths"].items()
        if p.startswith("/v2")
        for m, op in ops.items()
        if m == "post"
    ]
    models = [
        op for p, ops in doc["paths"].items() if p.startswith("/v2/models/") for op in ops.values()
    ]
    with_400 = sum("400" in op.get("responses", {}) for op in posts)
    with_404 = sum("404" in op.get("responses", {}) for op in models)
    return f"400: {with_400}/{len(posts)}, 404: {with_404}/{len(models)}"


def _absolute_paths(value: object) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    if isinstance(value, str):
        return [word for word in value.replace(",", " ").split() if word.startswith("/")]
    return []


class _FailingEngine(BaseHTTPRequestHandler):
    """Ready to every GET (a predictor's /readyz body), 500 to every POST: what trips the
    gateway's breaker."""

    def do_GET(self) -> None:
        body = json.dumps({"model": MODEL, "version": "1", "engine": "onnx", "ready": True})
        self._answer(200, body.encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer(500, b'{"code": "engine_fault"}')

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def probe_contract(code: Code, checkpoint: Path, work: Path) -> str:
    repo = work / "model_repository"
    code.publish(checkpoint, repo)
    p_port, g_port, dead = free_port(), free_port(), f"http://127.0.0.1:{free_port()}"
    failing = ThreadingHTTPServer(("127.0.0.1", 0), _FailingEngine)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    predictor = code.start(
        "predictor",
        "services.predictor",
        work / "predictor.log",
        f"http://127.0.0.1:{p_port}/readyz",
        PREDICTOR_PORT=str(p_port),
        PREDICTOR_GRPC_PORT=str(free_port()),
        PREDICTOR_REPOSITORY=str(repo),
        PREDICTOR_MODEL=MODEL,
    )
    gateway = code.start(
        "gateway",
        "services.gateway",
        work / "gateway.log",
        f"http://127.0.0.1:{g_port}/healthz",
        GATEWAY_PORT=str(g_port),
        GATEWAY_PREDICTOR_URL=f"http://127.0.0.1:{failing.server_address[1]}",
        GATEWAY_TORCHSERVE_URL=dead,
        GATEWAY_TORCHSERVE_MANAGEMENT_URL=dead,
        GATEWAY_TORCHSERVE_KEY_FILE=str(work / "torchserve" / "key_file.json"),
        GATEWAY_TRITON_URL=dead,
        GATEWAY_LOG_LEVEL="info",
    )
    rows: list[list[object]] = []
    deep = ("[" * 10_000 + "]" * 10_000).encode()
    try:
        predictor.wait_ready(300)
        gateway.wait_ready(120)
        services = {
            "predictor": f"http://127.0.0.1:{p_port}",
            "gateway": f"http://127.0.0.1:{g_port}",
        }
        for name, url in services.items():
            doc = httpx.get(f"{url}/openapi.json", timeout=10).json()
            bodies: list[dict[str, list[str]]] = [{"images": []}, {"images": [""]}]
            for body in bodies:
                answer = httpx.post(f"{url}/predict", json=body, timeout=30)
                accepted = _schema_accepts(doc, "/predict", body)
                rows.append(
                    [name, f"schema valid {json.dumps(body)}", accepted, answer.status_code]
                )
            metrics = doc["paths"].get("/metrics", {}).get("get", {}).get("responses", {})
            types = sorted({t for r in metrics.values() for t in r.get("content", {})})
            rows.append([name, "/metrics documented as", ",".join(types), ""])
            if any(p.startswith("/v2") for p in doc["paths"]):
                rows.append([name, "v2 errors documented", _v2_documented(doc), ""])
            answer = httpx.post(
                f"{url}/predict",
                content=deep,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            code_text = (
                answer.json().get("code")
                if answer.headers.get("content-type", "").startswith("application/json")
                else ""
            )
            rows.append([name, "10,000-deep JSON", code_text, answer.status_code])
        readyz = httpx.get(f"{services['gateway']}/readyz", timeout=10).json()
        paths = _absolute_paths(readyz)
        rows.append(["gateway", "absolute paths in /readyz", len(paths), ", ".join(paths[:2])])
        for _ in range(20):
            httpx.post(
                f"{services['gateway']}/predict",
                params={"backend": "predictor"},
                json=b64_body(digit_png()),
                timeout=30,
            )
        time.sleep(1)
        log = (work / "gateway.log").read_text()
        rows.append(
            [
                "gateway",
                "breaker log lines after 20 calls to a failing engine: `OPEN -> OPEN`, all",
                f"{log.count('OPEN -> OPEN')}, {log.count('circuit breaker of')}",
                "",
            ]
        )
    finally:
        gateway.stop()
        predictor.stop()
        failing.shutdown()
    return table(
        f"defect 9: API contract ({code.root})", ["service", "check", "value", "status"], rows
    )


# --------------------------------------------------------------------------- main

PROBES: dict[str, Callable[[Code, Path, Path], str]] = {
    "decode": probe_decode,
    "publish": probe_publish,
    "triton": probe_triton,
    "contract": probe_contract,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("probes", nargs="+", choices=[*PROBES, "restart"])
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose servers run")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint")
    parser.add_argument("--window", type=float, default=240.0, help="restart: `up`'s timeout, s")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args(argv)
    code = Code(args.code.resolve())
    checkpoint = args.checkpoint.resolve()
    for name in args.probes:
        work = Path(tempfile.mkdtemp(prefix=f"reliability-{name}-"))
        try:
            if name == "restart":
                print(probe_restart(code, checkpoint, work, args.window), flush=True)
            else:
                print(PROBES[name](code, checkpoint, work), flush=True)
        finally:
            if args.keep:
                print(f"(work folder {work})")
            else:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
