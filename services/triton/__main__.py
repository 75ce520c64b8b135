"""Local tritonserver: ``python -m services.triton up|down|status|run``.

up      generate the python-backend repository, start tritonserver in the background,
        wait until the ensemble is ready (settings: TRITON_* environment variables)
down    stop it (the whole process group: server and python stubs)
status  print whether it runs and is ready
run     generate, then become tritonserver in the foreground (for supervisord)
reload  serve the newest published version without a restart (Triton's repository API);
        a version that fails verification or loading is refused, the served one stays

status and reload find the server the user runs: the one of TRITON_RUN_DIR when that is set,
else a running one in runs/triton (`make triton-up`) or in the stack's runs/stack/triton
(`make up`); reload reads the repository that server was generated from (TRITON_REPOSITORY,
when set, wins).

--settings prints the TRITON_* table, then every override in effect (a TRITON_* batching value
that replaces the model's serving config on this server) beside the model's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from services.common.serving import overrides_report, published_serving
from services.common.settings import settings_table
from services.stack.settings import locate_run_dir
from services.triton.launcher import SOURCE_FILE, LauncherError, LocalTriton
from services.triton.settings import TritonSettings


def _ready(settings: TritonSettings) -> bool:
    try:
        url = f"http://{settings.http_url}/v2/models/{settings.ensemble}/ready"
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def running_server(settings: TritonSettings) -> TritonSettings:
    """``settings`` pointed at the server the user runs (see the module docstring)."""
    run_dir = locate_run_dir(
        "triton",
        "TRITON_RUN_DIR",
        settings.run_dir.resolve(),
        lambda folder: (
            LocalTriton(settings.model_copy(update={"run_dir": folder})).running_pid() is not None
        ),
    )
    found = settings.model_copy(update={"run_dir": run_dir})
    try:
        source = json.loads((found.run_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return found
    if not os.environ.get("TRITON_REPOSITORY") and isinstance(source, dict):
        found = found.model_copy(
            update={"repository": Path(source["repository"]), "model": source["model"]}
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.triton",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=["up", "down", "status", "run", "reload"])
    parser.add_argument(
        "--settings",
        action="store_true",
        help="print the settings table (markdown) and the overrides in effect, then exit",
    )
    args = parser.parse_args(argv)
    if not args.settings and args.command is None:
        parser.error("a command is required (up, down, status, run or reload)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    try:
        settings = TritonSettings()
    except ValidationError as exc:
        print(f"error: invalid TRITON_* settings:\n{exc}", file=sys.stderr)
        return 2
    if args.settings:
        print(settings_table(TritonSettings))
        model, source = published_serving(settings.repository.resolve(), settings.model)
        print("\n" + overrides_report(settings.overrides(model), source))
        return 0
    triton = LocalTriton(settings)
    try:
        if args.command == "up":
            if (pid := triton.running_pid()) is not None:
                print(f"tritonserver already running (pid {pid}, ready={_ready(settings)})")
                return 0
            started = time.monotonic()
            triton.start()
            try:
                triton.wait_ready()
            except LauncherError:
                triton.stop()
                raise
            pid = triton.running_pid()
            print(
                f"tritonserver ready in {time.monotonic() - started:.1f}s (pid {pid}): "
                f"http://{settings.http_url}  grpc {settings.grpc_url}  "
                f"metrics {settings.metrics_url}  "
                f"model {settings.ensemble}; log {triton.log_path}"
            )
        elif args.command == "down":
            print("tritonserver stopped" if triton.stop() else "tritonserver was not running")
        elif args.command == "status":
            found = LocalTriton(running_server(settings))
            pid = found.running_pid()
            if pid is None:
                print(f"tritonserver: not running (looked in {found.run_dir})")
                return 3
            print(
                f"tritonserver: running (pid {pid}) from {found.run_dir}, ready={_ready(settings)}"
            )
        elif args.command == "reload":
            result = LocalTriton(running_server(settings)).reload()
            print(
                f"tritonserver serves {settings.model} v{result.version}"
                + ("" if result.before == result.version else f" (was v{result.before})")
            )
            for version, reason in result.refused.items():
                print(f"refused v{version}: {reason}", file=sys.stderr)
            return 1 if result.refused else 0
        else:
            triton.exec_foreground()
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
