"""Start, watch, update and stop one local TorchServe instance.

``up`` lays out the run folder (mode 0700)::

    <run_dir>/config.properties   rendered from TorchServeSettings
    <run_dir>/metrics.yaml        copy of services/torchserve/metrics.yaml
    <run_dir>/key_file.json       written by TorchServe (token authorization keys)
    <run_dir>/instance.json       pid/process group, ports, version: what `down` and `status` read
    <run_dir>/tmp/                TMPDIR of every process (pid file, worker sockets, extracted .mar)
    <run_dir>/log4j2.xml          services/torchserve/logs.py: each line once, files size-capped
    <run_dir>/logs/               ts_log.log (or the console, in the foreground), access and
                                  metrics logs, torchserve.out (the console of a background `up`)
    <run_dir>/model_store/        <model>-v<N>.mar of the served version(s)

then runs ``torchserve --foreground`` as the leader of a new session, so the Python wrapper,
the Java frontend and every Python worker share one process group, and waits until the
management API (with the management key, not ``/ping``, which is healthy before any worker
is) reports the model's workers READY. ``down`` signals that process group, waits, kills what
is left, and checks ``/proc`` until no process of the instance remains.

Batching (batch size, batch delay, workers) is registered as the ``serving`` block of the
version's manifest says (:func:`services.torchserve.config.registration`), unless a
``TORCHSERVE_*`` override is set; ``instance.json`` and ``status`` record what each version got
and which overrides were in effect.

Which version: the pinned one (``TORCHSERVE_VERSION``), or else the newest *valid* one
(:func:`services.common.repository.newest_valid`: its manifest reads and every artifact matches
its sha256); newer versions that fail are refused, logged and listed in
``<run_dir>/refused_versions.json`` (``status`` shows it, the gateway's ``/readyz`` reports it),
so a version that went bad after publishing never keeps TorchServe from starting.

New versions (``reload``): the newest valid published version's archive is copied into the model
store, registered through the management API (synchronously, so its worker is READY before
anything changes) and made the default version. The version it replaces stays registered
(idle; a rollback is one ``set-default`` call) because TorchServe drops the requests still
queued for a version it unregisters; versions replaced at an earlier reload are unregistered.
No request goes unanswered during the switch. With ``enable_model_api=false`` reload restarts
the instance instead (a short outage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.common.processes import ProcessesSurvived, stop_processes
from services.common.repository import (
    Manifest,
    RefusedVersion,
    RepositoryError,
    load_version,
    newest_valid,
)
from services.torchserve.archive import ArchiveError, archive_path, build_archive
from services.torchserve.config import (
    METRICS_CONFIG,
    REFUSED_FILE_NAME,
    Keys,
    Registration,
    TorchServeSettings,
    auth_header,
    instance_keys,
    mar_name,
    registration,
    render_config,
)
from services.torchserve.logs import LOG_CONFIG_NAME, MAIN_LOG, render_log_config
from services.torchserve.workers import READY, ready_workers

logger = logging.getLogger(__name__)

INSTANCE_FILE = "instance.json"
CONSOLE_LOG = "torchserve.out"
_POLL_S = 0.2
#: Substrings that identify a process of a TorchServe instance (wrapper, frontend, worker,
#: system-metrics collector); combined with the run folder path, which every one of them
#: carries on its command line.
_PROCESS_MARKERS = (
    "ts.model_server",
    "org.pytorch.serve.ModelServer",
    "model_service_worker.py",
    "metric_collector",
)


class TorchServeError(RuntimeError):
    """TorchServe could not be started, reached, updated or stopped."""


@dataclass(frozen=True)
class Instance:
    """A running instance as ``up`` left it."""

    settings: TorchServeSettings
    pid: int
    version: int
    keys: Keys
    start_to_ready_s: float
    #: Batch size, batch delay and workers the served version was registered with.
    registration: Registration

    @property
    def inference_headers(self) -> dict[str, str]:
        return auth_header(self.keys.inference)

    @property
    def management_headers(self) -> dict[str, str]:
        return auth_header(self.keys.management)

    def predictions_url(self) -> str:
        return f"{self.settings.inference_url}/predictions/{self.settings.model}"


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    pgrp: int
    state: str
    cmdline: str


def _read_process(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return ProcessInfo(
        pid=pid,
        pgrp=int(fields[2]),
        state=fields[0],
        cmdline=raw_cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
    )


def _all_processes() -> Iterator[ProcessInfo]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _read_process(int(entry.name))
            if info is not None:
                yield info


def instance_processes(settings: TorchServeSettings, pgid: int | None = None) -> list[ProcessInfo]:
    """Live (non-zombie) processes of the instance in ``settings.run_dir``.

    A process belongs to it when it is in the instance's process group, or when it is a
    TorchServe process whose command line names the run folder (every one does: the
    wrapper's --ts-config, the JVM's java.io.tmpdir, the workers' socket path), which also
    catches anything that left the group.
    """
    run = str(settings.run_path)
    own = os.getpid()
    found = []
    for proc in _all_processes():
        if proc.pid == own or proc.state == "Z":
            continue
        in_group = pgid is not None and proc.pgrp == pgid
        marked = run in proc.cmdline and any(m in proc.cmdline for m in _PROCESS_MARKERS)
        if in_group or marked:
            found.append(proc)
    return found


def instance_state(settings: TorchServeSettings) -> dict[str, Any] | None:
    """What ``up`` recorded in the run folder's ``instance.json`` (None when there is none)."""
    return _read_instance(settings)


def _read_instance(settings: TorchServeSettings) -> dict[str, Any] | None:
    path = settings.run_path / INSTANCE_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(settings: TorchServeSettings, lines: int = 40) -> str:
    """The end of the console log and of ``ts_log.log`` (in the foreground both go to the
    supervisor's log instead, where the caller sees them)."""
    tails = []
    for path in (settings.log_dir / CONSOLE_LOG, settings.log_dir / MAIN_LOG):
        with contextlib.suppress(FileNotFoundError):
            tails.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(tails) or "(no log file: TorchServe logged to the console)"


# --------------------------------------------------------------------------- management API


def _management(
    settings: TorchServeSettings,
    keys: Keys,
    method: str,
    path: str,
    *,
    params: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    return httpx.request(
        method,
        f"{settings.management_url}{path}",
        params=params,
        headers=auth_header(keys.management),
        timeout=timeout,
    )


def describe(settings: TorchServeSettings, keys: Keys, version: int | None = None) -> Any:
    """``GET /models/<model>[/<version>|/all]`` as JSON (raises TorchServeError)."""
    suffix = "/all" if version is None else f"/{version}"
    response = _management(settings, keys, "GET", f"/models/{settings.model}{suffix}")
    if response.status_code != 200:
        raise TorchServeError(f"describe failed: HTTP {response.status_code} {response.text}")
    return response.json()


def _ready_workers(settings: TorchServeSettings, keys: Keys, version: int) -> int:
    try:
        entries = describe(settings, keys, version)
        return ready_workers(entries).get(str(version), 0)
    except (httpx.HTTPError, TorchServeError, ValueError):
        return 0


def _wait_ready(
    settings: TorchServeSettings, process: subprocess.Popen[bytes], version: int, workers: int
) -> Keys:
    deadline = time.monotonic() + settings.start_timeout_s
    keys: Keys | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TorchServeError(
                f"torchserve exited with {process.returncode} while starting:\n"
                f"{_log_tail(settings)}"
            )
        if keys is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                keys = instance_keys(settings)
        if keys is not None and _ready_workers(settings, keys, version) >= workers:
            return keys
        time.sleep(_POLL_S)
    raise TorchServeError(
        f"{settings.model} v{version} not READY after {settings.start_timeout_s:.0f} s:\n"
        f"{_log_tail(settings)}"
    )


# --------------------------------------------------------------------------- up / down


def _stage_archive(settings: TorchServeSettings, version: int) -> tuple[Path, Manifest]:
    """Put the version's archive into the model store (built if the version lacks one);
    return it and the version's (verified) manifest. Raises RepositoryError or ArchiveError."""
    loaded = load_version(settings.repository_path, settings.model, version)  # sha256-checked
    target = settings.model_store / mar_name(settings.model, version)
    published = archive_path(settings.repository_path, settings.model, version)
    if published.is_file():
        partial = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(published, partial)
        partial.replace(target)
    else:
        logger.info("%s has no archive; building one in the run folder", published.parent)
        build_dir = settings.run_path / "build" / str(version)
        built = build_archive(settings.repository_path, loaded.manifest, build_dir)
        built.replace(target)
        shutil.rmtree(build_dir, ignore_errors=True)
    return target, loaded.manifest


def stage_served_version(
    settings: TorchServeSettings, pinned: bool = True
) -> tuple[int, Path, Manifest, list[RefusedVersion]]:
    """Stage the archive of the pinned version (when ``pinned`` and one is set), else of the
    newest valid one; return the version, its archive, its manifest and the newer versions
    refused on the way (also written to ``refused_versions.json``)."""
    try:
        if pinned and settings.version is not None:
            archive, manifest = _stage_archive(settings, settings.version)
            return settings.version, archive, manifest, []
        chosen = newest_valid(
            settings.repository_path,
            settings.model,
            lambda version: _stage_archive(settings, version),
            (RepositoryError, ArchiveError),
        )
    except (RepositoryError, ArchiveError) as exc:  # nothing (verified) to serve: say so
        raise TorchServeError(str(exc)) from None
    _write_refused(settings, chosen.refused)
    archive, manifest = chosen.loaded
    return chosen.version, archive, manifest, chosen.refused


def _write_refused(settings: TorchServeSettings, refused: list[RefusedVersion]) -> None:
    path = settings.run_path / REFUSED_FILE_NAME
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps([r.as_dict() for r in refused], indent=2) + "\n")
    partial.replace(path)


def _registration(settings: TorchServeSettings, manifest: Manifest) -> Registration:
    reg = registration(settings, manifest.serving)
    for variable, override in reg.overrides.items():
        logger.warning(
            "%s=%s overrides the model's %s (%s) [%s v%d]",
            variable,
            override["value"],
            override["field"],
            override["model"],
            settings.model,
            manifest.version,
        )
    return reg


def _prepare_run_dir(settings: TorchServeSettings) -> None:
    run = settings.run_path
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o700)  # key_file.json lives here
    for folder in (settings.tmp_dir, settings.model_store, run / "build"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (settings.tmp_dir, settings.model_store, settings.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    settings.key_file.unlink(missing_ok=True)  # a stale key from a previous run never works
    (run / INSTANCE_FILE).unlink(missing_ok=True)
    (run / REFUSED_FILE_NAME).unlink(missing_ok=True)


def _child_env(settings: TorchServeSettings) -> dict[str, str]:
    env = dict(os.environ)
    # TS_CONFIG_FILE would override --ts-config; PYTHONPATH could shadow the services/common
    # copy inside the archive with another checkout's.
    for name in ("TS_CONFIG_FILE", "PYTHONPATH"):
        env.pop(name, None)
    tmp = str(settings.tmp_dir)
    logs = str(settings.log_dir)
    env.update(TMPDIR=tmp, TEMP=tmp, TMP=tmp, LOG_LOCATION=logs, METRICS_LOCATION=logs)
    return env


#: Size cap of each TorchServe log file, and how many rolled files each keeps.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 2


def up(settings: TorchServeSettings, console: bool = False) -> Instance:
    """Start TorchServe serving the configured (default: newest valid) version; wait until
    READY."""
    if instance_processes(settings):
        raise TorchServeError(
            f"a TorchServe instance is already running in {settings.run_path} "
            "(`python -m services.torchserve down` stops it)"
        )
    started = time.monotonic()
    _prepare_run_dir(settings)
    version, _, manifest, refused = stage_served_version(settings)
    reg = _registration(settings, manifest)
    shutil.copyfile(METRICS_CONFIG, settings.metrics_file)
    settings.config_file.write_text(render_config(settings, version, serving=manifest.serving))
    command = [
        sys.executable,
        "-m",
        "ts.model_server",
        "--foreground",
        "--ts-config",
        str(settings.config_file),
        "--model-store",
        str(settings.model_store),
        "--ncs",  # no config snapshots: every start is exactly config.properties
    ]
    log_config = settings.run_path / LOG_CONFIG_NAME
    log_config.write_text(
        render_log_config(
            settings.log_dir, console=console, max_bytes=LOG_MAX_BYTES, backups=LOG_BACKUPS
        )
    )
    command += ["--log-config", str(log_config)]
    # In the foreground TorchServe's console is this process's (a supervisor's log file, which
    # it rotates); in the background a file that holds only what log4j does not handle.
    with contextlib.ExitStack() as files:
        output = (
            None if console else files.enter_context((settings.log_dir / CONSOLE_LOG).open("ab"))
        )
        process = subprocess.Popen(
            command,
            cwd=settings.run_path,  # TorchServe writes key_file.json into its cwd
            env=_child_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: `down` signals all of it
        )
    state = {
        "pid": process.pid,
        "pgid": process.pid,
        "version": version,
        "model": settings.model,
        "repository": str(settings.repository_path),
        "inference_url": settings.inference_url,
        "management_url": settings.management_url,
        "metrics_url": settings.metrics_url,
        "key_file": str(settings.key_file),
        "registration": {str(version): reg.as_dict()},
        "refused_versions": [r.as_dict() for r in refused],
    }
    (settings.run_path / INSTANCE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    try:
        keys = _wait_ready(settings, process, version, reg.workers)
    except BaseException:
        down(settings)
        raise
    elapsed = time.monotonic() - started
    logger.info(
        "TorchServe ready in %.1f s: %s v%s at %s (pid %d)",
        elapsed,
        settings.model,
        version,
        settings.inference_url,
        process.pid,
    )
    return Instance(
        settings=settings,
        pid=process.pid,
        version=version,
        keys=keys,
        start_to_ready_s=elapsed,
        registration=reg,
    )


def down(settings: TorchServeSettings) -> list[int]:
    """Stop the instance: SIGTERM its process group, then SIGKILL after ``stop_timeout_s``.

    Returns the pids that were running. Raises TorchServeError if any process survives.
    """
    state = _read_instance(settings)
    pgid = int(state["pgid"]) if state and "pgid" in state else None
    procs = instance_processes(settings, pgid)
    pids = sorted(p.pid for p in procs)
    try:
        killed = stop_processes(
            lambda: [p.pid for p in instance_processes(settings, pgid)],
            timeout_s=settings.stop_timeout_s,
            # Whole groups led by an instance process, the others one by one (a TorchServe
            # started by hand from a shell shares the shell's group: spare the shell).
            groups={p.pgrp for p in procs if p.pgrp in pids},
            children=[pgid] if pgid is not None else [],  # our child when `up` ran here
        )
    except ProcessesSurvived:
        left = instance_processes(settings, pgid)
        raise TorchServeError(f"processes survived shutdown: {left}") from None
    if killed:
        logger.warning("SIGKILL after %.0f s: %s", settings.stop_timeout_s, killed)
    settings.key_file.unlink(missing_ok=True)
    (settings.run_path / INSTANCE_FILE).unlink(missing_ok=True)
    if pids:
        logger.info("TorchServe in %s stopped (pids %s)", settings.run_path, pids)
    return pids


# --------------------------------------------------------------------------- status / reload


def status(settings: TorchServeSettings) -> dict[str, Any]:
    """What runs in the run folder and what the management API says about the model."""
    state = _read_instance(settings) or {}
    pgid = state.get("pgid")
    procs = instance_processes(settings, int(pgid) if pgid is not None else None)
    report: dict[str, Any] = {
        "running": bool(procs),
        "pids": sorted(p.pid for p in procs),
        "ready": False,
        "run_dir": str(settings.run_path),
        **{k: v for k, v in state.items() if k not in ("pid", "pgid")},
    }
    if procs:
        try:
            keys = instance_keys(settings)
            report["versions"] = [
                {
                    "version": entry.get("modelVersion"),
                    "workers": [w.get("status") for w in entry.get("workers", [])],
                    # What TorchServe applies, as its describe-model answer says.
                    "batch_size": entry.get("batchSize"),
                    "max_batch_delay_ms": entry.get("maxBatchDelay"),
                    "min_workers": entry.get("minWorkers"),
                }
                for entry in describe(settings, keys)
            ]
            report["default_version"] = _default_version(settings, keys)
            default = [
                v for v in report["versions"] if v["version"] == str(report["default_version"])
            ]
            report["ready"] = (
                bool(default)
                and all(w == READY for w in default[0]["workers"])
                and len(default[0]["workers"]) >= (default[0]["min_workers"] or 1)
            )
        except (FileNotFoundError, ValueError, httpx.HTTPError, TorchServeError) as exc:
            report["error"] = str(exc)
    return report


def reload(settings: TorchServeSettings) -> int:
    """Serve the newest valid published version; return it. See the module docstring."""
    state = _read_instance(settings)
    if state is None or not instance_processes(settings, int(state["pgid"])):
        raise TorchServeError(f"no TorchServe instance runs in {settings.run_path}")
    # The newest valid version (newer broken ones refused and listed), its archive staged.
    newest, archive, manifest, refused = stage_served_version(settings, pinned=False)
    _update_instance(settings, refused_versions=[r.as_dict() for r in refused])
    if not settings.enable_model_api:
        down(settings)
        return up(settings.model_copy(update={"version": newest})).version
    try:
        keys = instance_keys(settings)
    except (FileNotFoundError, ValueError) as exc:
        raise TorchServeError(f"cannot read the management key: {exc}") from None
    served = {int(str(entry["modelVersion"])) for entry in describe(settings, keys)}
    default = _default_version(settings, keys)
    if default == newest:
        return newest
    if newest not in served:
        reg = _registration(settings, manifest)
        response = _management(
            settings,
            keys,
            "POST",
            "/models",
            params={
                "url": archive.name,
                "model_name": settings.model,
                "initial_workers": reg.workers,
                "batch_size": reg.batch_size,
                "max_batch_delay": reg.max_batch_delay_ms,
                "response_timeout": settings.response_timeout_s,
                "synchronous": "true",
            },
            timeout=settings.start_timeout_s,
        )
        if response.status_code != 200:
            raise TorchServeError(f"registering v{newest} failed: {response.text}")
        registered = (_read_instance(settings) or {}).get("registration", {})
        _update_instance(settings, registration={**registered, str(newest): reg.as_dict()})
    response = _management(settings, keys, "PUT", f"/models/{settings.model}/{newest}/set-default")
    if response.status_code != 200:
        raise TorchServeError(f"set-default v{newest} failed: {response.text}")
    # TorchServe drops requests still queued for a version it unregisters (its workers are
    # stopped at once, pytorch/serve#1101; seen here as a request that never got an answer).
    # So the version just replaced stays registered, idle and ready for a rollback, and only
    # versions that stopped being the default at an earlier reload are unregistered.
    for old in sorted(served - {newest, default}):
        response = _management(
            settings, keys, "DELETE", f"/models/{settings.model}/{old}", timeout=60.0
        )
        if response.status_code != 200:
            raise TorchServeError(f"unregistering v{old} failed: {response.text}")
        (settings.model_store / mar_name(settings.model, old)).unlink(missing_ok=True)
    logger.info("TorchServe now serves %s v%d (was v%s)", settings.model, newest, default)
    registered = (_read_instance(settings) or {}).get("registration", {})
    kept = {str(newest), str(default)}
    _update_instance(
        settings,
        version=newest,
        registration={v: got for v, got in registered.items() if v in kept},
    )
    return newest


def _default_version(settings: TorchServeSettings, keys: Keys) -> int:
    response = _management(settings, keys, "GET", f"/models/{settings.model}")
    if response.status_code != 200:
        raise TorchServeError(f"describe failed: HTTP {response.status_code} {response.text}")
    return int(str(response.json()[0]["modelVersion"]))


def _update_instance(settings: TorchServeSettings, **changes: Any) -> None:
    state = _read_instance(settings)
    if state is not None:
        state.update(changes)
        (settings.run_path / INSTANCE_FILE).write_text(json.dumps(state, indent=2) + "\n")
