"""``python -m services.stack up|down|status`` (what `make up`, `make down`, `make status` run).

up      train and publish first when the repository is empty, install Prometheus when absent,
        start predictor, TorchServe, Triton, the gateway and Prometheus under supervisord,
        wait until the gateway's /readyz reports every engine ready, print the URLs
down    stop everything; fails if any process of the stack survives
status  supervisor's view of each program and the gateway's /readyz
reload  bring every engine to the newest published version without a restart (TorchServe and
        Triton through their launchers, the predictor's own hot reload waited for); exit 1
        when an engine refused it (each one says why and keeps serving what it had)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from services.stack.settings import StackSettings
from services.stack.supervisor import (
    StackError,
    down,
    readiness,
    reload,
    supervisorctl,
    supervisord_pid,
    up,
    urls,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "reload"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = StackSettings()
    try:
        if args.command == "up":
            seconds = up(settings)
            print(f"stack ready in {seconds:.1f}s (logs: {settings.run_dir / 'logs'})")
            for name, url in urls(settings).items():
                print(f"  {name:<15} {url}")
        elif args.command == "reload":
            started = time.monotonic()
            results = reload(settings)
            for result in results:
                print(result.describe())
            print(f"reload took {time.monotonic() - started:.1f}s")
            if any(result.refused for result in results):
                return 1
        elif args.command == "down":
            killed = down(settings)
            print("stack stopped" + (f" (killed stragglers: {killed})" if killed else ""))
        else:
            if supervisord_pid(settings) is None:
                print("stack is not running")
                return 3
            print(supervisorctl(settings, "status").stdout.rstrip())
            answer = readiness(settings)
            print(
                "gateway /readyz: no answer" if answer is None else json.dumps(answer[1], indent=2)
            )
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
