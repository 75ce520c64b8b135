"""The one `python -m services.<name>` entry point shared by the HTTP services.

Reads the service's settings (``--settings`` prints their table, and what ``describe`` adds,
such as the overrides of the model's serving config in effect), then runs its FastAPI app
under uvicorn with the bounded HTTP front end of :mod:`services.common.limits` (header size
and count, read timeouts, lingering close). A bad setting stops the process with pydantic's
message and exit status 2; a failed start-up (no servable model, ...) is uvicorn's exit
status 3.

With ``workers`` above 1 the service runs as that many processes on one listening socket,
under uvicorn's process supervisor (which restarts a worker that dies): each worker builds its
own settings and app in the spawned process (:class:`WorkerConfig`), so nothing but import
paths crosses the process boundary, and the workers share one Prometheus multiprocess folder
(:func:`services.common.metrics.multiprocess_folder`) so that ``/metrics`` answers for all of
them whichever worker is asked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.importer import import_from_string
from uvicorn.supervisors import Multiprocess

from services.common.limits import bounded_protocol
from services.common.metrics import multiprocess_folder
from services.common.settings import ServiceSettings, configure_logging, settings_table

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def import_path(obj: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level class or function, for uvicorn's importer."""
    return f"{obj.__module__}:{obj.__qualname__}"


class WorkerConfig(uvicorn.Config):
    """A uvicorn config that builds the service inside each worker process.

    The parent pickles the config into every worker it spawns; the settings class and app
    factory travel as import paths and are only resolved in :meth:`load`, in the worker, from
    that process's environment (the parent's, inherited)."""

    def __init__(self, settings_path: str, app_path: str, **kwargs: Any) -> None:
        super().__init__(app=app_path, **kwargs)
        self.settings_path = settings_path

    def load(self) -> None:
        if not self.loaded:
            settings = import_from_string(self.settings_path)()
            configure_logging(settings.log_level)
            self.http = bounded_protocol(settings.http_limits())
            self.app = import_from_string(self.app)(settings)
        super().load()


def serve(
    name: str,
    description: str,
    settings_cls: type[SettingsT],
    create_app: Callable[[SettingsT], FastAPI],
    argv: list[str] | None = None,
    describe: Callable[[SettingsT], str] | None = None,
    workers: Callable[[SettingsT], int] | None = None,
) -> int:
    """Run the service; ``workers`` reads its process count from the settings (1 if None)."""
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
    count = workers(settings) if workers is not None else 1
    if count > 1:
        with multiprocess_folder():
            config = WorkerConfig(
                import_path(settings_cls),
                import_path(create_app),
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                access_log=settings.access_log,
                lifespan="on",
                workers=count,
            )
            supervisor = Multiprocess(config, sockets=[config.bind_socket()])
            supervisor.run()
        # uvicorn's supervisor stops when a worker fails before serving; say so as uvicorn does.
        if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
            return STARTUP_FAILURE
        return 0
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
