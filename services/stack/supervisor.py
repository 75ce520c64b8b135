"""The local stack under supervisord: render its config, start, wait for readiness, stop.

Supervisor (not honcho) because it restarts one crashed service and leaves the others alone.
Every service runs in the foreground under it with its own run folder inside ``run_dir``;
``down`` shuts supervisord down (each program's whole process group is signalled) and then
checks that no process it started survives, killing any that does.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from services.common.debian import PackageError, apt_install
from services.common.processes import ProcessesSurvived, stop_processes
from services.common.repository import RepositoryError, list_versions, load_version
from services.stack.settings import StackSettings
from services.torchserve.config import KEY_FILE_NAME

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_NAME = "supervisord.conf"
PROGRAMS = ("predictor", "torchserve", "triton", "gateway", "prometheus")
#: Every log under ``runs/stack/logs`` (each program's and supervisord's own) rolls over at this
#: size and keeps this many old files: a long-running stack never fills the disk.
LOG_MAX_BYTES = "20MB"
LOG_BACKUPS = 2


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says what to look at."""


#: How many failed starts in a row supervisord allows a program before it gives up (FATAL).
START_RETRIES = 3


@dataclass(frozen=True)
class Program:
    """One supervisord program. ``start_s`` is its ``startsecs``: how long it must stay up to
    count as started. It is longer than the program takes to fail at start-up (load and verify
    a model, wait for workers), so a program that cannot start is a failed start each time and
    goes FATAL after :data:`START_RETRIES` retries, instead of a restart loop that never ends
    (an exit after ``startsecs`` is a crash of a running program, restarted without limit)."""

    name: str
    command: str
    environment: dict[str, str]
    stop_wait_s: int = 30
    start_s: int = 5


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _paths(settings: StackSettings) -> dict[str, Path]:
    run = settings.run_dir.resolve()
    return {
        "run": run,
        "logs": run / "logs",
        "config": run / CONFIG_NAME,
        "socket": run / "supervisor.sock",
        "pidfile": run / "supervisord.pid",
        "prometheus_config": run / "prometheus.yml",
        "prometheus_data": run / "prometheus-data",
    }


def programs(settings: StackSettings) -> list[Program]:
    """The five services, each configured through its own settings' environment variables."""
    paths = _paths(settings)
    repo = str(settings.repository.resolve())
    python = sys.executable
    pin = f"taskset -c {settings.server_cpus} " if settings.server_cpus else ""
    torchserve_run = settings.torchserve_run_dir
    common = {
        # The Triton python stub finds packages through the python3 first on PATH.
        "PATH": f"{_bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LD_LIBRARY_PATH": str(sysconfig.get_config_var("LIBDIR") or ""),
        "PYTHONUNBUFFERED": "1",
    }
    return [
        Program(
            "predictor",
            f"{pin}{python} -m services.predictor",
            common | {"PREDICTOR_REPOSITORY": repo, "PREDICTOR_MODEL": settings.model},
            # Loading fails within seconds on an idle machine, in ~30 s on a busy 2-core one.
            start_s=60,
        ),
        Program(
            "torchserve",
            f"{pin}{python} -m services.torchserve up --foreground",
            common
            | {
                "TORCHSERVE_REPOSITORY": repo,
                "TORCHSERVE_MODEL": settings.model,
                "TORCHSERVE_RUN_DIR": str(torchserve_run),
            },
            stop_wait_s=60,
            # `up` is READY or fails within its start timeout.
            start_s=_torchserve_start_timeout_s() + 30,
        ),
        Program(
            "triton",
            f"{pin}{python} -m services.triton run",
            common
            | {
                "TRITON_REPOSITORY": repo,
                "TRITON_MODEL": settings.model,
                "TRITON_RUN_DIR": str(settings.engine_run_dir("triton")),
            },
            stop_wait_s=60,
            # tritonserver (--exit-on-error) exits when a model fails to load.
            start_s=120,
        ),
        Program(
            "gateway",
            f"{pin}{python} -m services.gateway",
            common
            | {
                "GATEWAY_PORT": str(settings.gateway_port),
                "GATEWAY_MODEL": settings.model,
                "GATEWAY_TORCHSERVE_KEY_FILE": str(torchserve_run / KEY_FILE_NAME),
            },
        ),
        Program(
            "prometheus",
            f"{pin}{settings.prometheus_binary} --config.file={paths['prometheus_config']} "
            f"--storage.tsdb.path={paths['prometheus_data']} "
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port} "
            "--storage.tsdb.retention.time=2d",
            {},
        ),
    ]


def _env_line(environment: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in environment.items())


def render_supervisord(settings: StackSettings) -> str:
    paths = _paths(settings)
    sections = [
        f"""[unix_http_server]
file={paths["socket"]}
chmod=0700

[supervisord]
logfile={paths["logs"] / "supervisord.log"}
logfile_maxbytes={LOG_MAX_BYTES}
logfile_backups={LOG_BACKUPS}
pidfile={paths["pidfile"]}
childlogdir={paths["logs"]}
directory={ROOT}
identifier=image-serving-stack

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{paths["socket"]}
"""
    ]
    sections.extend(program_section(program, paths["logs"]) for program in programs(settings))
    return "\n".join(sections)


def program_section(program: Program, logs: Path) -> str:
    """The ``[program:...]`` section of one program, its log in ``logs``."""
    environment = f"environment={_env_line(program.environment)}\n" if program.environment else ""
    return f"""[program:{program.name}]
command={program.command}
directory={ROOT}
{environment}autostart=true
autorestart=true
startsecs={program.start_s}
startretries={START_RETRIES}
stopsignal=TERM
stopasgroup=true
killasgroup=true
stopwaitsecs={program.stop_wait_s}
redirect_stderr=true
stdout_logfile={logs / (program.name + ".log")}
stdout_logfile_maxbytes={LOG_MAX_BYTES}
stdout_logfile_backups={LOG_BACKUPS}
"""


def render_prometheus(settings: StackSettings) -> str:
    from services.torchserve.config import TorchServeSettings
    from services.triton.settings import TritonSettings

    predictor_port = _predictor_port()
    torchserve = TorchServeSettings()
    triton = TritonSettings()
    targets = {
        "gateway": f"127.0.0.1:{settings.gateway_port}",
        "predictor": f"127.0.0.1:{predictor_port}",
        "torchserve": f"127.0.0.1:{torchserve.metrics_port}",
        "triton": f"127.0.0.1:{triton.metrics_port}",
        "prometheus": f"127.0.0.1:{settings.prometheus_port}",
    }
    jobs = "\n".join(
        f"""  - job_name: {job}
    static_configs:
      - targets: ["{target}"]"""
        for job, target in targets.items()
    )
    # The predictor's gRPC calls are counted on its HTTP /metrics (predictor_grpc_*).
    return f"""# Generated by services.stack for the local stack (compose: docker/prometheus.yml).
global:
  scrape_interval: {settings.scrape_interval_s}s
  evaluation_interval: {settings.scrape_interval_s}s
scrape_configs:
{jobs}
"""


def _torchserve_start_timeout_s() -> int:
    from services.torchserve.config import TorchServeSettings

    return math.ceil(TorchServeSettings().start_timeout_s)


def _predictor_port() -> int:
    from services.predictor.settings import PredictorSettings

    return PredictorSettings().port


def stack_ports(settings: StackSettings) -> dict[str, int]:
    """Every TCP port the stack's servers listen on, by what listens there, each read from
    its service's settings (so an overridden port is the one checked)."""
    from services.predictor.settings import PredictorSettings
    from services.torchserve.config import TorchServeSettings
    from services.triton.settings import TritonSettings

    predictor, torchserve, triton = PredictorSettings(), TorchServeSettings(), TritonSettings()
    ports = {
        "gateway": settings.gateway_port,
        "prometheus": settings.prometheus_port,
        "predictor HTTP": predictor.port,
        "TorchServe inference": torchserve.inference_port,
        "TorchServe management": torchserve.management_port,
        "TorchServe metrics": torchserve.metrics_port,
        "TorchServe gRPC inference": torchserve.grpc_inference_port,
        "TorchServe gRPC management": torchserve.grpc_management_port,
        "Triton HTTP": triton.http_port,
        "Triton gRPC": triton.grpc_port,
        "Triton metrics": triton.metrics_port,
    }
    if predictor.grpc_port:
        ports["predictor gRPC"] = predictor.grpc_port
    return ports


def _holder(port: int) -> str:
    """Who listens on ``port`` (pid and command), as far as this user may see it."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                if connection.pid is None:
                    break
                process = psutil.Process(connection.pid)
                command = " ".join(process.cmdline()[:4])
                return f" by pid {connection.pid} ({command})"
    except (psutil.Error, OSError):
        pass
    return ""


def busy_ports(settings: StackSettings) -> list[str]:
    """The stack's ports another process already listens on, each named with its holder.

    Checked before supervisord starts: a port held by another stack or service would make one
    engine crash-loop, or worse, make `up` wait on another stack's gateway and report it ready.
    """
    busy = []
    for name, port in stack_ports(settings).items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                busy.append(f"{port} ({name}) is in use{_holder(port)}")
    return busy


def ensure_prometheus(settings: StackSettings) -> None:
    """Debian's prometheus package, installed when absent (needs root and apt)."""
    if settings.prometheus_binary.is_file():
        return
    try:
        apt_install("prometheus", "the local stack")
    except PackageError as exc:
        raise StackError(
            f"{settings.prometheus_binary} is missing: {exc}, or set STACK_PROMETHEUS_BINARY"
        ) from None
    if not settings.prometheus_binary.is_file():
        raise StackError(
            f"{settings.prometheus_binary} is still missing after apt-get install prometheus"
        )


def ensure_model(settings: StackSettings) -> None:
    """Train and publish first when the repository has no version of the model."""
    if list_versions(settings.repository, settings.model):
        return
    logger.info(
        "no published %s in %s: training and publishing first", settings.model, settings.repository
    )
    command = [
        sys.executable,
        "-m",
        "training",
        "train-and-publish",
        "--repo",
        str(settings.repository),
        "--model-name",
        settings.model,
    ]
    if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
        raise StackError("train-and-publish failed; see its output above")


def supervisord_pid(settings: StackSettings) -> int | None:
    pidfile = _paths(settings)["pidfile"]
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        process = psutil.Process(pid)
        if "supervisord" in " ".join(process.cmdline()):
            return pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def supervisorctl(settings: StackSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_bin_dir() / "supervisorctl"), "-c", str(_paths(settings)["config"]), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def readiness(settings: StackSettings) -> tuple[int, dict[str, object]] | None:
    """The gateway's /readyz status and body, or None while the gateway does not answer."""
    try:
        response = httpx.get(f"http://127.0.0.1:{settings.gateway_port}/readyz", timeout=3.0)
        body: dict[str, object] = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return response.status_code, body


def all_engines_ready(answer: tuple[int, dict[str, object]] | None) -> bool:
    if answer is None or answer[0] != 200:
        return False
    engines = answer[1].get("backends")
    if not isinstance(engines, dict) or not engines:
        return False
    return all(isinstance(state, dict) and state.get("ready") is True for state in engines.values())


def up(settings: StackSettings) -> float:
    """Start everything and wait until every engine is ready; return seconds to ready."""
    started = time.monotonic()
    if supervisord_pid(settings) is not None:
        raise StackError(
            f"the stack is already running (supervisord in {settings.run_dir}); `make down` first"
        )
    busy = busy_ports(settings)
    if busy:
        raise StackError(
            "the stack's ports are taken: " + "; ".join(busy) + ". Stop what holds them "
            "(another stack: `make down` with its STACK_RUN_DIR) or move it to other ports"
        )
    ensure_prometheus(settings)
    ensure_model(settings)
    paths = _paths(settings)
    for folder in (paths["run"], paths["logs"], paths["prometheus_data"]):
        folder.mkdir(parents=True, exist_ok=True)
    paths["config"].write_text(render_supervisord(settings))
    paths["prometheus_config"].write_text(render_prometheus(settings))
    done = subprocess.run(
        [str(_bin_dir() / "supervisord"), "-c", str(paths["config"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"supervisord did not start: {done.stderr.strip() or done.stdout.strip()}")
    deadline = started + settings.ready_timeout_s
    while time.monotonic() < deadline:
        if all_engines_ready(readiness(settings)):
            return time.monotonic() - started
        time.sleep(1.0)
    state = supervisorctl(settings, "status").stdout
    raise StackError(
        f"not ready after {settings.ready_timeout_s:.0f}s; supervisor says:\n{state}"
        f"logs: {paths['logs']}"
    )


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stack_processes(settings: StackSettings) -> list[psutil.Process]:
    """supervisord, its descendants, and any process whose command line names the run folder."""
    run = str(_paths(settings)["run"])
    found: dict[int, psutil.Process] = {}
    pid = supervisord_pid(settings)
    if pid is not None:
        found.update((p.pid, p) for p in _descendants(pid))
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if run in cmdline and process.pid != os.getpid():
            found[process.pid] = process
    return list(found.values())


def _running(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def down(settings: StackSettings) -> list[int]:
    """Stop every service; return the pids that had to be killed (empty when all stopped).

    supervisord's shutdown signals each program's whole process group; what is still there
    after ``stop_timeout_s`` (or shows up naming the run folder) is SIGKILLed.
    """
    before = stack_processes(settings)
    if supervisord_pid(settings) is not None:
        supervisorctl(settings, "shutdown")

    def members() -> set[int]:
        return {p.pid for p in before if _running(p)} | {
            p.pid for p in stack_processes(settings) if _running(p)
        }

    try:
        return stop_processes(members, timeout_s=settings.stop_timeout_s, first_signal=None)
    except ProcessesSurvived as exc:
        raise StackError(f"processes survived `down`: {exc.pids}") from None


# --------------------------------------------------------------------------- new versions


@dataclass(frozen=True)
class EngineVersion:
    """One engine after ``reload``: the version it serves, the one before, and the newer
    published versions it refused (version -> why)."""

    engine: str
    version: int | None
    before: int | None
    refused: dict[int, str]

    def describe(self) -> str:
        line = f"{self.engine:<10} v{self.version}"
        if self.before != self.version:
            line += f" (was v{self.before})"
        return line + "".join(
            f"\n           refused v{version}: {reason}" for version, reason in self.refused.items()
        )


def _why_not(repo: Path, model: str, version: int) -> str:
    try:
        load_version(repo, model, version)
    except RepositoryError as exc:
        return str(exc)
    return "not served (see the engine's log)"


def _reload_torchserve(settings: StackSettings, newest: int) -> EngineVersion:
    from services.torchserve.config import TorchServeSettings
    from services.torchserve.launcher import TorchServeError, instance_state
    from services.torchserve.launcher import reload as reload_torchserve

    torchserve = TorchServeSettings(
        repository=settings.repository.resolve(),
        model=settings.model,
        run_dir=settings.torchserve_run_dir,
    )
    state = instance_state(torchserve) or {}
    before = int(state["version"]) if "version" in state else None
    try:
        version: int | None = reload_torchserve(torchserve)
    except (TorchServeError, httpx.HTTPError) as exc:
        return EngineVersion("torchserve", before, before, {newest: str(exc)})
    refused = (
        {}
        if version == newest
        else {newest: _why_not(torchserve.repository, settings.model, newest)}
    )
    return EngineVersion("torchserve", version, before, refused)


def _reload_triton(settings: StackSettings, newest: int) -> EngineVersion:
    from services.triton.launcher import LauncherError, LocalTriton
    from services.triton.settings import TritonSettings

    triton = LocalTriton(
        TritonSettings(
            repository=settings.repository.resolve(),
            model=settings.model,
            run_dir=settings.engine_run_dir("triton"),
        )
    )
    try:
        result = triton.reload()
    except LauncherError as exc:
        return EngineVersion("triton", None, None, {newest: str(exc)})
    return EngineVersion("triton", result.version, result.before, result.refused)


def _predictor_state() -> tuple[int | None, dict[str, str]]:
    try:
        body = httpx.get(f"http://127.0.0.1:{_predictor_port()}/readyz", timeout=3.0).json()
        return int(body["version"]), dict(body.get("refused") or {})
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None, {}


def _follow_predictor(newest: int, before: int | None, timeout_s: float) -> EngineVersion:
    """The predictor loads new versions on its own (hot reload): wait until it serves
    ``newest`` or has refused it."""
    deadline = time.monotonic() + timeout_s
    while True:
        version, refused = _predictor_state()
        if version == newest or str(newest) in refused or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    why = {int(v): reason for v, reason in refused.items() if int(v) == newest}
    if version != newest and not why:
        why = {newest: f"not served after {timeout_s:.0f} s"}
    return EngineVersion("predictor", version, before, why)


def _gateway_versions(settings: StackSettings) -> dict[str, str | None]:
    answer = readiness(settings)
    engines = answer[1].get("backends") if answer is not None else None
    if not isinstance(engines, dict):
        return {}
    return {
        name: state.get("version") if isinstance(state, dict) else None
        for name, state in engines.items()
    }


def reload(settings: StackSettings, timeout_s: float = 300.0) -> list[EngineVersion]:
    """Bring every engine of the running stack to the newest published version, no restart.

    TorchServe (register, set-default) and Triton (repository API, explicit model control)
    are asked at once, each through its launcher; the predictor follows on its own (hot
    reload) and is waited for. A version that fails verification or loading is refused by
    each engine, which goes on serving the version it had. Returns once the gateway's
    ``/readyz`` shows what every engine serves.
    """
    from concurrent.futures import ThreadPoolExecutor

    if supervisord_pid(settings) is None:
        raise StackError(
            f"the stack is not running (no supervisord in {settings.run_dir}); `make up`"
        )
    repo = settings.repository.resolve()
    published = list_versions(repo, settings.model)
    if not published:
        raise StackError(f"no published version of {settings.model} in {repo}")
    newest = published[-1]
    predictor_before, _ = _predictor_state()
    with ThreadPoolExecutor(max_workers=2) as pool:
        torchserve = pool.submit(_reload_torchserve, settings, newest)
        triton = pool.submit(_reload_triton, settings, newest)
        predictor = _follow_predictor(newest, predictor_before, timeout_s)
        results = [predictor, torchserve.result(), triton.result()]
    expected = {r.engine: str(r.version) for r in results}
    deadline = time.monotonic() + 30.0
    while _gateway_versions(settings) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return results


def urls(settings: StackSettings) -> dict[str, str]:
    """What ``up`` prints: the gateway, and the engines' Open Inference Protocol endpoints for
    clients such as tritonclient (each engine's own settings give its ports)."""
    from services.predictor.settings import PredictorSettings
    from services.triton.settings import TritonSettings

    predictor = PredictorSettings()
    triton = TritonSettings()
    found = {
        "gateway": f"http://127.0.0.1:{settings.gateway_port}",
        "docs": f"http://127.0.0.1:{settings.gateway_port}/docs",
        "predictor": f"http://127.0.0.1:{predictor.port}/v2",
    }
    if predictor.grpc_port:
        found["predictor gRPC"] = f"127.0.0.1:{predictor.grpc_port}"
    found["triton"] = f"http://127.0.0.1:{triton.http_port}/v2"
    found["triton gRPC"] = f"127.0.0.1:{triton.grpc_port}"
    found["prometheus"] = f"http://127.0.0.1:{settings.prometheus_port}"
    return found
