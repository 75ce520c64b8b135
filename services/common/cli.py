"""The one `python -m services.<name>` entry point shared by the HTTP services.

Reads the service's settings (``--settings`` prints their table, and what ``describe`` adds,
such as the overrides of the model's serving config in effect), then runs its FastAPI app
under uvicorn with the bounded HTTP front end of :mod:`services.common.limits` (header size
and count, read timeouts, lingering close). A bad setting stops the process with pydantic's
message and exit status 2; a failed start-up (no servable model, ...) is uvicorn's exit
status 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.common.limits import bounded_protocol
from services.common.settings import ServiceSettings, configure_logging, settings_table

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def serve(
    name: str,
    description: str,
    settings_cls: type[SettingsT],
    create_app: Callable[[SettingsT], FastAPI],
    argv: list[str] | None = None,
    describe: Callable[[SettingsT], str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    parser.add_argument(
        "--settings", action="store_true", help="print the settings table (markdown) and exit"
    )
    args = parser.parse_args(argv)
    try:
        settings = settings_cls()
    except ValidationError as exc:
        if args.settings:  # the table is still worth printing
            print(settings_table(settings_cls))  # noqa: T201 - a command-line answer
        print(f"{name}: invalid settings:\n{exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.settings:
        print(settings_table(settings_cls))  # noqa: T201 - a command-line answer
        if describe is not None:
            print("\n" + describe(settings))  # noqa: T201
        return 0
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
        http=bounded_protocol(settings.http_limits()),
    )
    return 0
