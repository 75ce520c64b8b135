"""``python -m services.torchserve up|down|status|reload|render-config``.

Settings come from the environment (``TORCHSERVE_*``, see services/torchserve/config.py).

    up [--foreground]   start and wait until the model's workers are READY; with --foreground
                        stay attached (for supervisord/containers) and stop it on SIGTERM/SIGINT
    down                stop it; fails if any TorchServe process of the run folder survives
    status              JSON: processes, URLs, served versions and worker states; exit 0 when
                        the default version's workers are all READY, 3 not running, 4 not ready
    reload              serve the newest published version (register + set-default, no restart)
    render-config       print the config.properties of a profile (local or compose)

status and reload find the instance the user runs: the one in TORCHSERVE_RUN_DIR when that is
set, else a running one in runs/torchserve (`make torchserve-up`) or in the stack's
runs/stack/torchserve (`make up`); reload reads the repository that instance serves
(TORCHSERVE_REPOSITORY, when set, wins).

--settings prints the TORCHSERVE_* table, then every override in effect (a batching value
that replaces the model's serving config on this server) beside the model's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx
from pydantic import ValidationError

from services.common.serving import Override, overrides_report, published_serving
from services.common.settings import settings_table
from services.stack.settings import locate_run_dir
from services.torchserve.config import TorchServeSettings, registration, render_profile
from services.torchserve.launcher import (
    TorchServeError,
    down,
    instance_processes,
    instance_state,
    reload,
    status,
    up,
)

logger = logging.getLogger("services.torchserve")


def _foreground(settings: TorchServeSettings) -> int:
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    instance = up(settings, console=True)
    print(f"TorchServe ready in {instance.start_to_ready_s:.1f} s at {settings.inference_url}")
    sys.stdout.flush()
    try:
        while not stop.wait(1.0):
            if not instance_processes(settings, instance.pid):
                logger.error("TorchServe exited on its own; see %s", settings.log_dir)
                return 1
    finally:
        down(settings)
    return 0


def running_instance(settings: TorchServeSettings) -> TorchServeSettings:
    """``settings`` pointed at the instance the user runs (see the module docstring)."""
    run_dir = locate_run_dir(
        "torchserve",
        "TORCHSERVE_RUN_DIR",
        settings.run_path,
        lambda folder: bool(instance_processes(settings.model_copy(update={"run_dir": folder}))),
    )
    found = settings.model_copy(update={"run_dir": run_dir})
    served = (instance_state(found) or {}).get("repository")
    if served and not os.environ.get("TORCHSERVE_REPOSITORY"):
        found = found.model_copy(update={"repository": Path(served)})
    return found


def _print_settings(settings: TorchServeSettings) -> None:
    print(settings_table(TorchServeSettings))
    serving, source = published_serving(settings.repository_path, settings.model, settings.version)
    found = [
        Override(variable, entry["value"], entry["field"], entry["model"])
        for variable, entry in registration(settings, serving).overrides.items()
    ]
    print("\n" + overrides_report(found, source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.torchserve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--settings",
        action="store_true",
        help="print the settings table (markdown) and the overrides in effect, then exit",
    )
    commands = parser.add_subparsers(dest="command")
    up_parser = commands.add_parser("up", help="start TorchServe and wait until READY")
    up_parser.add_argument("--foreground", action="store_true", help="stay attached")
    commands.add_parser("down", help="stop TorchServe (no process left behind)")
    commands.add_parser("status", help="print the instance's state as JSON")
    commands.add_parser("reload", help="serve the newest published version")
    render = commands.add_parser("render-config", help="print a profile's config.properties")
    render.add_argument("--profile", choices=["local", "compose"], default="local")
    args = parser.parse_args(argv)
    if not args.settings and args.command is None:
        parser.error("a command is required")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "render-config":
        sys.stdout.write(render_profile(args.profile))
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll
    try:
        settings = TorchServeSettings()
    except ValidationError as exc:
        logger.error("invalid TORCHSERVE_* settings: %s", exc)
        return 2
    if args.settings:
        _print_settings(settings)
        return 0
    try:
        if args.command == "up":
            if args.foreground:
                return _foreground(settings)
            started = time.monotonic()
            instance = up(settings)
            print(
                f"TorchServe serves {settings.model} v{instance.version} at "
                f"{settings.inference_url} (ready in {time.monotonic() - started:.1f} s); "
                + (
                    f"keys in {settings.key_file}"
                    if settings.token_authorization
                    else "token authorization off"
                )
            )
        elif args.command == "down":
            pids = down(settings)
            print(f"stopped (pids {pids})" if pids else "not running")
        elif args.command == "status":
            report = status(running_instance(settings))
            print(json.dumps(report, indent=2))
            if not report["running"]:
                return 3
            return 0 if report.get("ready") else 4
        elif args.command == "reload":
            print(f"serving {settings.model} v{reload(running_instance(settings))}")
    except (TorchServeError, httpx.HTTPError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
