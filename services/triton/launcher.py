"""Run the real ``tritonserver`` from the ``nvidia-pytriton`` wheel on a machine without Docker.

The wheel ships Triton 2.51 with only the python backend. :class:`LocalTriton`:

1. generates the python-backend repository into ``<run_dir>/model_repository``
   (:func:`services.triton.model_configs.write_local_repository`: twins of the native models
   on the files of the newest *valid* version, newer ones that fail their sha256 refused and
   listed in the classifier's ``refused_versions`` parameter, ``preprocess``, the ensemble),
   batching as the version's ``serving`` block says unless a ``TRITON_*`` override is set
   (each one logged);
2. assembles a backend directory in ``<run_dir>/backends/python`` with the wheel's backend
   library and the stub built for this Python (the wheel keeps stubs per Python version apart);
3. starts ``tritonserver`` bound to ``settings.host`` in its own process group, with this
   venv's ``bin`` first on PATH (the stub finds its packages through the ``python3`` on PATH,
   not through PYTHONPATH) and LD_LIBRARY_PATH holding the wheel's libraries (the copied stub
   no longer sits where its RPATH points) and this Python's ``libpython``;
4. waits until ``/v2/health/ready`` and the ensemble's ready endpoint answer 200;
5. stops it by signalling the whole process group (tritonserver and every stub).

New versions without a restart (:meth:`LocalTriton.reload`, ``python -m services.triton
reload``): the server runs with ``--model-control-mode=explicit`` (every model loaded at start),
so nothing changes until it is asked. ``reload`` generates the twin repository of the newest
published version beside the served one (verified first: a version whose files fail their
sha256 is refused before anything changes) and moves it in model by model, each version folder
just before its model's load: the ensembles' steps first, kept two versions at once, then the
ensembles, whose steps are pinned to their own version, then, after a drain, the new version
alone (see :meth:`LocalTriton.reload` for why each step is needed). A load that fails leaves
the loaded version serving, and the launcher then writes that version's repository back, so
that what is on disk is what is served.

The server's shared-memory, logging, model-repository and trace APIs (HTTP and gRPC) answer
only requests carrying a header key drawn at random for each start (:data:`RESTRICTED_APIS`):
open, they would let any local client map memory into the server, change its logging or load
models (code, for the python backend). Only ``reload`` needs one of them, and it reads the key
from the run folder (``admin_key``, mode 0600). The key is also on tritonserver's command line,
which local users can read through ``/proc``, so this stops clients that stumble on those APIs
(a stray ``tritonclient``, a request forwarded by another service), not a local user set on
using them.

The python backend keeps its tensors in ``/dev/shm`` regions named after the run folder
(``tpb_<digest of the run folder>_...``). A server killed outright leaves them behind, so start
and stop remove every region of this run folder's prefix once no process of the run folder is
alive: none can be in use then, and no other run folder's regions carry that prefix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from services.common.processes import (
    ProcessesSurvived,
    group_members,
    processes_naming,
    stop_group,
    stop_processes,
)
from services.common.repository import (
    TORCHSCRIPT_SUFFIX,
    RefusedVersion,
    RepositoryError,
    list_versions,
    load_version,
    read_manifest,
    relative_to_repository,
)
from services.triton.model_configs import write_local_repository
from services.triton.protocol import ENSEMBLE_SUFFIX, PREPROCESS_MODEL
from services.triton.settings import TritonSettings

logger = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
#: The APIs only a request with the per-start header key may use (see the module docstring).
RESTRICTED_APIS = ("shared-memory", "logging", "model-repository", "trace")
#: The header carrying that key.
RESTRICTED_API_HEADER = "triton-admin-key"
#: Where the python backend's shared-memory regions live.
SHM_DIR = Path("/dev/shm")
PID_FILE = "tritonserver.pid"
#: The running server's key to its restricted APIs (mode 0600), for ``reload``.
ADMIN_KEY_FILE = "admin_key"
#: What the running server was generated from (``{"repository", "model"}``), so that ``status``
#: and ``reload`` from another shell, without TRITON_* variables, act on the same repository.
SOURCE_FILE = "source.json"
LOG_FILE = "tritonserver.log"


class LauncherError(RuntimeError):
    """tritonserver could not be prepared, started or stopped; the message says why."""


@dataclass(frozen=True)
class Reloaded:
    """What a reload left: the version served now, the one before, and the newer published
    versions refused (version -> why); the served version is unchanged by a refusal."""

    version: int | None
    before: int | None
    refused: dict[int, str]


def _verification_error(repo: Path, model: str, version: int) -> str:
    """Why ``version`` was not served: its verification error, when it fails verification."""
    try:
        load_version(repo, model, version)
    except RepositoryError as exc:
        return relative_to_repository(str(exc), repo)
    return "not served (see the launcher's log)"


@dataclass(frozen=True)
class Distribution:
    """Where the ``nvidia-pytriton`` wheel keeps the server, its libraries and its stubs."""

    binary: Path
    backend_dir: Path
    stub: Path
    libs: Path

    @classmethod
    def find(cls, binary: Path | None = None) -> Distribution:
        # Located, not imported: importing pytriton pulls in far more than its files.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise LauncherError(
                "nvidia-pytriton is not installed: it provides the tritonserver binary"
            )
        root = Path(spec.origin).resolve().parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            binary=binary or root / "bin" / "tritonserver",
            backend_dir=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / STUB_NAME,
            libs=root.parent.parent / "nvidia_pytriton.libs",
        )
        for path in (dist.binary, dist.backend_dir / "libtriton_python.so", dist.stub):
            if not path.is_file():
                raise LauncherError(f"{path} is missing (nvidia-pytriton for Python {version}?)")
        return dist


def _process_cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


class LocalTriton:
    """One local tritonserver described by ``settings``; see the module docstring."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.repository = self.run_dir / "model_repository"
        self.backends = self.run_dir / "backends"
        self.log_path = self.run_dir / LOG_FILE
        self.pid_path = self.run_dir / PID_FILE
        self.process: subprocess.Popen[bytes] | None = None
        # A prefix unique to this run folder keeps two servers (a developer's stack and a test
        # run) from opening each other's python-backend shared-memory regions, and tells which
        # regions a dead server of this run folder left.
        self.shm_prefix = f"tpb_{hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:8]}_"

    @functools.cached_property
    def distribution(self) -> Distribution:
        """The tritonserver install (found once, on first use: prepare, command, environment)."""
        return Distribution.find(self.settings.tritonserver)

    # --- preparing ---------------------------------------------------------------------

    def prepare(self) -> int:
        """At start: generate the served repository of the newest valid version and the
        backend directory, and record where the repository came from; return the version."""
        dist = self.distribution
        version = self._write_twins(self.repository, None)
        origin = {
            "repository": str(self.settings.repository.resolve()),
            "model": self.settings.model,
        }
        (self.run_dir / SOURCE_FILE).write_text(json.dumps(origin) + "\n")
        self._log_overrides(version)
        python_dir = self.backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in (
            dist.backend_dir / "libtriton_python.so",
            dist.backend_dir / "triton_python_backend_utils.py",
            dist.stub,
        ):
            copy = python_dir / source.name
            if not copy.exists() or copy.stat().st_size != source.stat().st_size:
                shutil.copy2(source, copy)  # the stub keeps its executable bit
        return version

    def _write_twins(
        self,
        target: Path,
        version: int | None,
        versions: int = 1,
        refused: Sequence[RefusedVersion] = (),
    ) -> int:
        """The twin repository of ``version`` (None: the newest valid one) written into
        ``target``; return that version. ``versions``: how many version folders each config
        serves (see :meth:`reload`); ``refused``: the newer versions a reload refused, for the
        classifier's config."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return write_local_repository(
                target,
                self.settings.repository.resolve(),
                self.settings.model,
                self.settings,
                version=version,
                versions=versions,
                refused=refused,
            )
        except (RepositoryError, ValueError) as exc:  # nothing (verified) to serve, or
            raise LauncherError(str(exc)) from None  # overrides that do not fit: say so

    def _log_overrides(self, version: int) -> None:
        """One warning per ``TRITON_*`` override of ``version``'s serving config in effect."""
        manifest = read_manifest(self.settings.repository.resolve(), self.settings.model, version)
        for override in self.settings.overrides(manifest.serving):
            logger.warning("%s", override.describe())

    def command(self) -> list[str]:
        s = self.settings
        dist = self.distribution
        shm_prefix = f"{self.shm_prefix}{os.getpid()}_"
        restricted = f"{','.join(RESTRICTED_APIS)}:{RESTRICTED_API_HEADER}={self._new_admin_key()}"
        return [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--cache-directory={dist.binary.parent.parent / 'caches'}",
            f"--http-address={s.host}",
            f"--http-port={s.http_port}",
            f"--grpc-address={s.host}",
            f"--grpc-port={s.grpc_port}",
            f"--metrics-address={s.host}",
            f"--metrics-port={s.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            # The configs are generated complete: the backend must not rewrite them.
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Explicit: models change only when `reload` asks, through the repository API.
            "--model-control-mode=explicit",
            "--load-model=*",
            # No GPU is needed for the python backend; a pinned pool would ask CUDA for memory.
            "--pinned-memory-pool-byte-size=0",
            "--exit-timeout-secs=10",
            f"--log-verbose={s.log_verbose}",
        ]

    def environment(self) -> dict[str, str]:
        dist = self.distribution
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(dist.libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env.pop("PYTHONHOME", None)
        return env

    # --- running -----------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        """Prepare and start tritonserver in a new process group; do not wait for readiness."""
        if (pid := self.running_pid()) is not None:
            raise LauncherError(f"tritonserver from {self.run_dir} is already running (pid {pid})")
        self._kill_orphans()
        self._remove_leftover_regions()
        version = self.prepare()
        logger.info(
            "serving %s version %d from %s", self.settings.model, version, self.settings.repository
        )
        log: IO[bytes] = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals the stubs too
            )
        finally:
            log.close()
        self.pid_path.write_text(f"{self.process.pid}\n")
        return self.process

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until the server and the ensemble are ready; return seconds waited."""
        timeout_s = timeout_s or self.settings.ready_timeout_s
        started = time.monotonic()
        base = f"http://{self.settings.http_url}"
        paths = ["/v2/health/ready", f"/v2/models/{self.settings.ensemble}/ready"]
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise LauncherError(
                        f"tritonserver exited with status {self.process.returncode} before it "
                        f"was ready; its log ({self.log_path}) ends with:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if all(client.get(base + path).status_code == 200 for path in paths):
                        return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise LauncherError(
                        f"tritonserver was not ready after {timeout_s:.0f}s; its log "
                        f"({self.log_path}) ends with:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def running_pid(self) -> int | None:
        """The pid (and process group) of this run folder's tritonserver, if it still runs."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        # The pid file may outlive the server and its pid be reused: check what runs there.
        cmdline = _process_cmdline(pid)
        if "tritonserver" not in cmdline or str(self.repository) not in cmdline:
            return None
        return pid

    def _kill_orphans(self) -> None:
        """Kill the python stubs a crashed tritonserver left behind.

        A tritonserver killed outright (SIGKILL, out of memory) while its stubs are busy can
        leave them running, reparented to init, in its process group, whose id the pid file
        still holds; `down` and the next start (supervisord's restart) kill them. Only members
        of that group whose command line names this run folder are killed.
        """
        try:
            pgid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        orphans = [pid for pid in group_members(pgid) if str(self.run_dir) in _process_cmdline(pid)]
        if not orphans:
            return
        try:
            stop_processes(
                lambda: set(orphans) & set(group_members(pgid)),
                timeout_s=10.0,
                first_signal=signal.SIGKILL,
            )
        except ProcessesSurvived as exc:
            logger.warning("%s, left by a tritonserver that died (group %d)", exc, pgid)
            return
        logger.warning("killed %s, left by a tritonserver that died (group %d)", orphans, pgid)

    def _new_admin_key(self) -> str:
        """A fresh key to the restricted APIs, written into the run folder for ``reload``
        (owner-only: created 0600, never widened)."""
        key = secrets.token_hex(16)
        path = self.run_dir / ADMIN_KEY_FILE
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(key + "\n")
        return key

    def admin_headers(self) -> dict[str, str]:
        """The header that opens the restricted APIs of this run folder's running server."""
        try:
            key = (self.run_dir / ADMIN_KEY_FILE).read_text().strip()
        except OSError as exc:
            raise LauncherError(
                f"no key to Triton's repository API in {self.run_dir}: {exc.strerror}"
            ) from None
        return {RESTRICTED_API_HEADER: key}

    def shm_regions(self) -> list[Path]:
        """The python backend's shared-memory regions of this run folder's servers."""
        try:
            return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))
        except OSError:
            return []

    def _remove_leftover_regions(self) -> None:
        """Remove the regions a dead server of this run folder left, when no process of the
        run folder is alive (see the module docstring)."""
        regions = self.shm_regions()
        if not regions:
            return
        alive = processes_naming(self.run_dir)
        if alive:
            logger.warning(
                "not removing %d shared-memory region(s) of %s: processes %s still run",
                len(regions),
                self.run_dir,
                alive,
            )
            return
        for region in regions:
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
        logger.warning(
            "removed %d shared-memory region(s) a dead tritonserver left: %s",
            len(regions),
            ", ".join(region.name for region in regions),
        )

    def stop(self) -> bool:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout_s``; True if one ran.

        Returns once no process of the group is left, the python stubs included.
        """
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is None:
            self._kill_orphans()
            self._remove_leftover_regions()
            self.pid_path.unlink(missing_ok=True)
            (self.run_dir / ADMIN_KEY_FILE).unlink(missing_ok=True)
            return False
        try:
            killed = stop_group(pid, timeout_s=self.settings.stop_timeout_s, leader=self.process)
        except ProcessesSurvived as exc:
            raise LauncherError(f"group {pid} survived SIGKILL: {exc.pids}") from None
        if killed:
            logger.warning("tritonserver group %d outlived SIGTERM; SIGKILLed %s", pid, killed)
        self.process = None
        self.pid_path.unlink(missing_ok=True)
        (self.run_dir / ADMIN_KEY_FILE).unlink(missing_ok=True)
        self._remove_leftover_regions()
        return True

    # --- new versions ------------------------------------------------------------------

    def models(self, repository: Path | None = None) -> list[str]:
        """The models of a twin repository in load order: the ensembles' steps (the classifier
        first), then the ensembles, then the TorchScript twin, which is no step of an ensemble
        and the slowest to load."""
        folder = repository or self.repository
        names = sorted(p.name for p in folder.iterdir() if (p / "config.pbtxt").is_file())
        ensembles = [n for n in names if n.endswith(ENSEMBLE_SUFFIX)]
        late = [n for n in names if n.endswith(TORCHSCRIPT_SUFFIX)]
        steps = [n for n in names if n not in ensembles and n not in late]
        steps.sort(key=lambda n: (n != self.settings.model, n != PREPROCESS_MODEL, n))
        return steps + ensembles + late

    def served_version(self, client: httpx.Client) -> int | None:
        """The version of the ensemble Triton serves now (the newest it lists), or None."""
        try:
            reply = client.get(
                f"http://{self.settings.http_url}/v2/models/{self.settings.ensemble}"
            )
            if reply.status_code != 200:
                return None
            return max(int(v) for v in reply.json()["versions"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def _load(self, client: httpx.Client, name: str) -> None:
        """Ask Triton to load ``name`` from the repository as it is on disk now."""
        base = f"http://{self.settings.http_url}/v2/repository/models"
        reply = client.post(f"{base}/{name}/load", json={}, headers=self.admin_headers())
        if reply.status_code != 200:
            try:
                message = str(reply.json().get("error", reply.text))
            except ValueError:
                message = reply.text
            raise LauncherError(f"Triton could not load {name}: {message.strip()[:1000]}")

    def _swap_in(self, staged: Path, name: str) -> None:
        """Replace the served repository's ``name`` folder with the staged one (a rename each
        way; Triton reads the folder only when asked to load, so it never sees the gap)."""
        live = self.repository / name
        old = self.run_dir / f".old-{name}"
        if old.exists():
            shutil.rmtree(old)
        if live.exists():
            live.rename(old)
        (staged / name).rename(live)
        if old.exists():
            shutil.rmtree(old)

    def _add_version(self, staged: Path, name: str, version: int) -> None:
        """Put ``version``'s folder of ``name`` beside the one served, with the staged config
        (two versions) and labels: the next load of ``name`` keeps both loaded."""
        live = self.repository / name
        live.mkdir(parents=True, exist_ok=True)
        target = live / str(version)
        if target.exists():
            shutil.rmtree(target)
        (staged / name / str(version)).rename(target)
        for extra in sorted((staged / name).iterdir()):
            if extra.is_file():
                shutil.copy2(extra, live / extra.name)

    def _stage(
        self, version: int | None, versions: int, refused: Sequence[RefusedVersion] = ()
    ) -> tuple[Path, int]:
        """``version``'s twin repository (None: the newest valid one's), generated beside the
        served one; and that version."""
        staged = self.run_dir / "staging"
        return staged, self._write_twins(staged, version, versions, refused)

    def reload(self, timeout_s: float = 300.0) -> Reloaded:
        """Serve the newest published version without a restart (see the module docstring).

        A version that fails verification or loading is refused: the one served before still
        is, and the answer names the refusal. Raises :class:`LauncherError` when no server
        runs from this run folder.

        No request fails, and every answer names the version that ran it:

        1. each step of the ensembles (classifier, ``preprocess``) gets the new version's
           folder beside the served one and is loaded keeping both (``num_versions: 2``); the
           ensembles are not touched yet, so Triton's reload of them as dependents keeps the
           served ensemble version, whose steps are pinned to the old version;
        2. the ensembles get the new version the same way: Triton swaps the newest ready
           version in (pinned to the new steps) while the old number stays ready; then the
           TorchScript twin;
        3. after :attr:`~services.triton.settings.TritonSettings.reload_drain_s`, in which the
           requests that started on the old version finish (Triton's HTTP frontend looks the
           answering version up again to write a classification answer, and a version already
           unloaded fails it with 503 "... is not at ready state"), every model is loaded again
           from the new version alone, the ensembles first.

        A load that fails in steps 1-2 stops there (no ensemble of a refused version is ever
        loaded); the old version's repository is written back and its models loaded again.
        """
        if self.running_pid() is None:
            raise LauncherError(f"no tritonserver runs from {self.run_dir}")
        repo = self.settings.repository.resolve()
        published = list_versions(repo, self.settings.model)
        newest = published[-1] if published else None
        with httpx.Client(timeout=timeout_s) as client:
            before = self.served_version(client)
            try:
                # The newest only: verified before anything changes, refused if it fails (the
                # version walk is for the start, when nothing is served yet).
                staged, version = self._stage(newest, versions=2)
            except LauncherError as exc:
                reason = relative_to_repository(str(exc), repo)
                if before is not None and newest is not None:
                    self._report_refusal(client, before, RefusedVersion(newest, reason))
                return self._refused(before, newest, reason)
            if version != before:
                touched: list[str] = []
                try:
                    for name in self.models(staged):
                        touched.append(name)
                        self._add_version(staged, name, version)
                        self._load(client, name)
                except (LauncherError, httpx.HTTPError) as exc:
                    if before is not None:
                        refusal = RefusedVersion(version, str(exc))
                        self._restore(client, before, touched, refusal)
                    return self._refused(before, version, str(exc))
                served = self.served_version(client)
                if served != version:
                    raise LauncherError(f"asked Triton to load v{version}; it serves v{served}")
                time.sleep(self.settings.reload_drain_s)
                self._settle(client, version)
                logger.info(
                    "Triton now serves %s v%d (was v%s)", self.settings.model, version, before
                )
                self._log_overrides(version)
        refused: dict[int, str] = {}
        if newest is not None and newest != version:  # passed over by the version walk
            refused[newest] = _verification_error(repo, self.settings.model, newest)
        return Reloaded(version, before, refused)

    def _settle(self, client: httpx.Client, version: int) -> None:
        """Serve ``version`` alone: its repository swapped in model by model, each loaded again
        (the ensembles first, so that no ensemble is left whose old version Triton still
        reloads as a dependent)."""
        staged, _ = self._stage(version, versions=1)
        names = self.models(staged)
        ensembles = [n for n in names if n.endswith(ENSEMBLE_SUFFIX)]
        for name in ensembles + [n for n in names if n not in ensembles]:
            self._swap_in(staged, name)
            try:
                self._load(client, name)
            except (LauncherError, httpx.HTTPError) as exc:  # both versions were loaded
                logger.error("could not unload the old versions of %s: %s", name, exc)

    def _refused(self, served: int | None, version: int | None, reason: str) -> Reloaded:
        logger.error(
            "refused %s v%s, still serving v%s: %s", self.settings.model, version, served, reason
        )
        return Reloaded(served, served, {version: reason} if version is not None else {})

    def _report_refusal(self, client: httpx.Client, served: int, refusal: RefusedVersion) -> None:
        """Name ``refusal`` in the served classifier's ``refused_versions`` parameter (what the
        gateway's ``/readyz`` reads from Triton's model config): its config is written again
        for the same version with it, and the classifier loaded again. Triton swaps a reloaded
        model in once it is ready, so this costs no request; a failure is only logged (the
        refusal is still in ``reload``'s answer)."""
        try:
            staged, _ = self._stage(served, versions=1, refused=[refusal])
            self._swap_in(staged, self.settings.model)
            self._load(client, self.settings.model)
        except (LauncherError, httpx.HTTPError, OSError) as exc:
            logger.error("could not report the refusal of v%d: %s", refusal.version, exc)

    def _restore(
        self, client: httpx.Client, version: int, touched: list[str], refusal: RefusedVersion
    ) -> None:
        """Write the twin repository of ``version`` (the one still served, its classifier's
        config naming ``refusal``) back in place and load the ``touched`` models again (the
        classifier always), so that what is on disk is what is served."""
        try:
            staged, _ = self._stage(version, versions=1, refused=[refusal])
            for name in self.models(staged):
                self._swap_in(staged, name)
            for name in dict.fromkeys([self.settings.model, *touched]):
                self._load(client, name)
        except (LauncherError, httpx.HTTPError, OSError) as exc:
            logger.error("could not put v%d back in place: %s", version, exc)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def exec_foreground(self) -> None:
        """Prepare, then replace this process with tritonserver (for supervisord / a terminal).

        The process leads its own group (pgid == pid), so ``down`` and supervisord's
        ``stopasgroup`` reach the python stubs too.
        """
        if (pid := self.running_pid()) is not None:
            raise LauncherError(f"tritonserver from {self.run_dir} is already running (pid {pid})")
        self._kill_orphans()
        self._remove_leftover_regions()
        self.prepare()
        command = self.command()
        env = self.environment()
        with contextlib.suppress(PermissionError):  # already a group leader
            os.setsid()
        self.pid_path.write_text(f"{os.getpid()}\n")  # exec keeps the pid
        os.execve(command[0], command, env)
