"""Local tritonserver: ``python -m services.triton up|down|status|run``.

up      generate the python-backend repository, start tritonserver in the background,
        wait until the ensemble is ready (settings: TRITON_* environment variables)
down    stop it (the whole process group: server and python stubs)
status  print whether it runs and is ready
run     generate, then become tritonserver in the foreground (for supervisord)

--settings prints the TRITON_* table, then every override in effect (a TRITON_* batching value
that replaces the model's serving config on this server) beside the model's value.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import httpx
from pydantic import ValidationError

from services.common.serving import overrides_report, published_serving
from services.common.settings import settings_table
from services.triton.launcher import LauncherError, LocalTriton
from services.triton.settings import TritonSettings


def _ready(settings: TritonSettings) -> bool:
    try:
        url = f"http://{settings.http_url}/v2/models/{settings.ensemble}/ready"
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.triton",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=["up", "down", "status", "run"])
    parser.add_argument(
        "--settings",
        action="store_true",
        help="print the settings table (markdown) and the overrides in effect, then exit",
    )
    args = parser.parse_args(argv)
    if not args.settings and args.command is None:
        parser.error("a command is required (up, down, status or run)")
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
            pid = triton.running_pid()
            if pid is None:
                print("tritonserver: not running")
                return 3
            print(f"tritonserver: running (pid {pid}), ready={_ready(settings)}")
        else:
            triton.exec_foreground()
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
