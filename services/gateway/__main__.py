"""``python -m services.gateway``: serve the gateway with uvicorn.

Every setting is an environment variable ``GATEWAY_*``; ``--settings`` prints them all. A bad
value stops the process with pydantic's message naming the variable (exit status 2). The
gateway starts whether or not the engines are up: ``/readyz`` says which ones answer.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from services.common.settings import configure_logging, settings_table
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--settings", action="store_true", help="print the settings table (markdown) and exit"
    )
    args = parser.parse_args(argv)
    if args.settings:
        print(settings_table(GatewaySettings))
        return 0
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"gateway: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
