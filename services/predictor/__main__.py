"""``python -m services.predictor``: serve the newest model of the repository with uvicorn.

Every setting is an environment variable ``PREDICTOR_*``; ``--settings`` prints them all.
A bad value, or no servable model, stops the process with a one-line reason (exit status 2
for bad settings, uvicorn's 3 for a failed start-up).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from services.common.settings import configure_logging, settings_table
from services.predictor.app import create_app
from services.predictor.settings import PredictorSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.predictor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--settings", action="store_true", help="print the settings table (markdown) and exit"
    )
    args = parser.parse_args(argv)
    if args.settings:
        print(settings_table(PredictorSettings))
        return 0
    try:
        settings = PredictorSettings()
    except ValidationError as exc:
        print(f"predictor: invalid settings:\n{exc}", file=sys.stderr)
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
