"""A Docker engine, images and Compose for the container test (tests/stack/test_compose_up.py).

:func:`docker_engine` uses the engine the machine already runs (``DOCKER_HOST``, else
/var/run/docker.sock when it answers). Without one it starts its own ``dockerd`` as root
(installing Debian's ``docker.io`` with apt when dockerd is absent): data-root in the cache
folder, so images and build cache survive between runs and a warm run rebuilds nothing;
exec-root, socket and pid file in a short temporary folder of its own (a unix socket path has
at most 107 bytes). On the way out it stops that dockerd and checks that no process of it
(containerd, shims, containers) is left.

Stand-ins for the images no registry can give here are built from Debian packages:
:func:`base_image` bootstraps Debian bookworm's python3.11 with ``debootstrap``. It carries the
machine's CA bundle and pip settings (``pip config list``) so that builds work inside this
machine's network, and the user-facing Dockerfiles need neither: pip's local file indexes and
find-links folders are served to the build over loopback HTTP by :class:`WheelMirror` (builds
use the host network), so a cold build does not download the CUDA torch wheels again.

Standard library only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from services.common.processes import stop_processes
from tests.processes import free_port, processes_naming

ROOT = Path(__file__).resolve().parents[1]
#: dockerd's data-root and the debootstrap scratch space (gitignored, kept between runs).
CACHE_DIR = Path(os.environ.get("COMPOSE_TEST_CACHE", ROOT / ".cache" / "compose-test"))
SYSTEM_SOCKET = Path("/var/run/docker.sock")
BASE_IMAGE = "image-serving-stack-test/python:3.11-bookworm"
#: Label of the base image: the loopback port its pip.conf names (see WheelMirror).
MIRROR_PORT_LABEL = "org.image-serving-stack.test.wheel-mirror-port"
DEBIAN_MIRROR = os.environ.get("COMPOSE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: What python:3.11-slim offers the Dockerfile: `python`, venv, CA certificates, and the shared
#: libpython that tritonserver's python-backend stub links against. python3-distutils:
#: python3.11-venv needs it, and debootstrap's resolver leaves it out.
BASE_PACKAGES = ("python3.11", "libpython3.11", "python3.11-venv", "python3-distutils")
BASE_PACKAGES += ("python-is-python3", "ca-certificates")


class EngineError(RuntimeError):
    """No Docker engine could be found or started (the message says why)."""


def _run(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float,
    input_file: Any = None,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(command),
        env=dict(env) if env is not None else None,
        stdin=input_file,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise EngineError(
            f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
        )
    return done


@dataclass
class Engine:
    """A Docker engine reachable through ``host`` (a ``DOCKER_HOST`` URL)."""

    host: str
    #: True when this module started the dockerd (it stops it again).
    owned: bool
    docker: str = field(default_factory=lambda: shutil.which("docker") or "docker")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The caller's environment with this engine as DOCKER_HOST and no other DOCKER_*/
        COMPOSE_* setting (a developer's COMPOSE_FILE must not change what the test runs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env["DOCKER_HOST"] = self.host
        env.update(extra or {})
        return env

    def docker_cli(self, *args: str, timeout: float = 120, **kwargs: Any) -> str:
        return _run([self.docker, *args], env=self.env(), timeout=timeout, **kwargs).stdout

    def answers(self) -> bool:
        try:
            self.docker_cli("version", "--format", "{{.Server.Version}}", timeout=20)
        except (EngineError, OSError, subprocess.TimeoutExpired):
            return False
        return True

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        loaded: list[dict[str, Any]] = json.loads(self.docker_cli("inspect", *names))
        return loaded


def _ensure_dockerd_installed() -> None:
    if shutil.which("dockerd") is not None and shutil.which("docker") is not None:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError(
            "no Docker engine runs here and dockerd is missing: install Docker "
            "(Debian: apt-get install docker.io) or set DOCKER_HOST"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"],
        env=env,
        timeout=900,
    )


@contextlib.contextmanager
def _own_dockerd(data_root: Path) -> Iterator[Engine]:
    """dockerd as root with its state under folders of its own; stopped on the way out."""
    if os.geteuid() != 0:
        raise EngineError("no Docker engine runs here, and starting one needs root")
    _ensure_dockerd_installed()
    data_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="compose-test-docker-"))
    socket_path = run_dir / "docker.sock"
    exec_root = run_dir / "exec"
    log_path = data_root.parent / "dockerd.log"
    command = [
        "dockerd",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--host",
        f"unix://{socket_path}",
        "--pidfile",
        str(run_dir / "dockerd.pid"),
        # Its own bridge name, so a machine's docker0 (or a second test dockerd) is no clash.
        "--bridge",
        "none",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    engine = Engine(host=f"unix://{socket_path}", owned=True)

    def members() -> list[int]:
        pids = [int(line.split(":")[0]) for line in processes_naming(run_dir)]
        if process.poll() is None and process.pid not in pids:
            pids.append(process.pid)
        return pids

    try:
        deadline = time.monotonic() + 60
        while not engine.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise EngineError(
                    f"dockerd did not come up (exit {process.poll()}):\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        yield engine
    finally:
        # SIGTERM: dockerd stops what still runs, then its containerd; the shims and
        # containers name the exec-root in their command lines, so none can hide.
        stop_processes(
            members,
            timeout_s=60,
            groups=[process.pid],
            first_signal=signal.SIGTERM,
            children=[process],
        )
        left = processes_naming(run_dir) + processes_naming(data_root)
        shutil.rmtree(run_dir, ignore_errors=True)
        if left:
            raise EngineError(f"processes of the test's dockerd survived: {left}")


@contextlib.contextmanager
def docker_engine() -> Iterator[Engine]:
    """The machine's running engine, else a dockerd of our own (see the module docstring)."""
    if os.environ.get("DOCKER_HOST"):
        engine = Engine(host=os.environ["DOCKER_HOST"], owned=False)
        if not engine.answers():
            raise EngineError(f"DOCKER_HOST={engine.host} does not answer")
        yield engine
        return
    if SYSTEM_SOCKET.is_socket() and shutil.which("docker"):
        engine = Engine(host=f"unix://{SYSTEM_SOCKET}", owned=False)
        if engine.answers():
            yield engine
            return
    with _own_dockerd(CACHE_DIR / "docker") as engine:
        yield engine


# --------------------------------------------------------------------------- pip settings


def pip_settings() -> dict[str, str]:
    """``pip config list`` of this interpreter's pip: ``{"index-url": ..., ...}``; environment
    (``:env:``) entries win over files, as they do for pip itself."""
    done = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            env[name] = value
        elif section in ("global", "install", "download"):
            files.setdefault(name, value)
    return files | env


def _local_path(location: str) -> Path | None:
    """The folder a file:// URL or a plain path names, None for a remote URL."""
    parts = urlsplit(location)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "":
        return Path(location)
    return None


@dataclass(frozen=True)
class PipPlan:
    """The build's pip.conf and the local folders a loopback mirror must serve for it."""

    conf: str
    roots: tuple[Path, ...]
    cert: Path | None


def pip_plan(settings: Mapping[str, str], port: int) -> PipPlan:
    """Translate this machine's pip settings for a build that sees only loopback HTTP.

    Local indexes and find-links folders become ``http://127.0.0.1:<port><path>``, indexes in
    front of PyPI so that pip takes a wheel from the local disk when both have it (pip keeps
    the first of equally good candidates). The machine's CA bundle goes in as pip's cert.
    """

    def mirrored(location: str, roots: list[Path], *, index: bool) -> str:
        path = _local_path(location)
        if path is None:
            return location
        # An index's pages link to ../../files/...: serve the index's parent folder.
        roots.append(path.parent if index else path)
        return f"http://127.0.0.1:{port}{path.as_posix().rstrip('/')}/"

    roots: list[Path] = []
    indexes = [settings.get("index-url", "https://pypi.org/simple")]
    indexes += settings.get("extra-index-url", "").split()
    local = [mirrored(i, roots, index=True) for i in indexes if _local_path(i) is not None]
    remote = [i for i in indexes if _local_path(i) is None]
    ordered = local + remote
    links = [mirrored(f, roots, index=False) for f in settings.get("find-links", "").split()]
    lines = ["[global]", f"index-url = {ordered[0]}"]
    if ordered[1:]:
        lines.append(f"extra-index-url = {' '.join(ordered[1:])}")
    if links:
        lines.append(f"find-links = {' '.join(links)}")
    cert = Path(settings["cert"]) if settings.get("cert") else None
    if cert is not None:
        lines.append("cert = /etc/pip/host-ca-bundle.crt")
    if settings.get("default-timeout") or settings.get("timeout"):
        lines.append(f"timeout = {settings.get('default-timeout') or settings['timeout']}")
    return PipPlan("\n".join(lines) + "\n", tuple(dict.fromkeys(roots)), cert)


class _MirrorHandler(SimpleHTTPRequestHandler):
    """Files under the allowed roots, by their absolute path; nothing else (404)."""

    roots: tuple[str, ...] = ()

    def translate_path(self, path: str) -> str:
        wanted = posixpath.normpath(unquote(urlsplit(path).path))
        for root in self.roots:
            if wanted == root or wanted.startswith(root.rstrip("/") + "/"):
                return wanted + ("/" if path.endswith("/") else "")
        return "/nonexistent/"

    def log_message(self, format: str, *args: Any) -> None:
        return


class WheelMirror:
    """Serves :class:`PipPlan` roots on 127.0.0.1:port while images build (a thread)."""

    def __init__(self, roots: Sequence[Path], port: int) -> None:
        handler = type("Handler", (_MirrorHandler,), {"roots": tuple(map(str, roots))})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WheelMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def wheel_mirror(engine: Engine) -> Iterator[None]:
    """The mirror the base image's pip.conf names, on its port when that is free. Busy: the
    build's pip falls back to the remote indexes (slower cold builds, nothing else)."""
    port = int(engine.inspect(BASE_IMAGE)[0]["Config"]["Labels"][MIRROR_PORT_LABEL])
    roots = pip_plan(pip_settings(), port).roots
    try:
        mirror = WheelMirror(roots, port)
    except OSError:
        yield
        return
    with mirror:
        yield


# --------------------------------------------------------------------------- base image


def base_image(engine: Engine) -> str:
    """:data:`BASE_IMAGE`, bootstrapped and imported when the engine does not hold it yet."""
    with contextlib.suppress(EngineError):
        engine.inspect(BASE_IMAGE)
        return BASE_IMAGE
    if os.geteuid() != 0:
        raise EngineError("bootstrapping the test base image needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        _run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env, timeout=600)
    port = free_port()
    plan = pip_plan(pip_settings(), port)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE_DIR) as scratch:
        rootfs = Path(scratch) / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            timeout=1200,
        )
        audit = _run(["chroot", str(rootfs), "dpkg", "--audit"], timeout=60).stdout
        if audit.strip():
            raise EngineError(f"debootstrap left broken packages:\n{audit}")
        (rootfs / "etc" / "pip.conf").write_text(plan.conf)
        if plan.cert is not None:
            (rootfs / "etc" / "pip").mkdir(exist_ok=True)
            shutil.copyfile(plan.cert, rootfs / "etc" / "pip" / "host-ca-bundle.crt")
        # apt in a build must not try to start the services it installs.
        policy = rootfs / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        try:
            engine.docker_cli(
                "import",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "--change",
                f"LABEL {MIRROR_PORT_LABEL}={port}",
                "-",
                BASE_IMAGE,
                timeout=600,
                input_file=tar.stdout,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
    return BASE_IMAGE
