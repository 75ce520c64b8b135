"""``python -m services.predictor``: serve the newest model of the repository with uvicorn.

Every setting is an environment variable ``PREDICTOR_*``; ``--settings`` prints them all.
A bad value, or no servable model, stops the process with a one-line reason (exit status 2
for bad settings, uvicorn's 3 for a failed start-up).
"""

from __future__ import annotations

import sys

from services.common.cli import serve
from services.predictor.app import create_app
from services.predictor.settings import PredictorSettings


def main(argv: list[str] | None = None) -> int:
    return serve(
        "predictor",
        __doc__.split("\n\n")[0],
        PredictorSettings,
        create_app,
        argv,
        describe=PredictorSettings.overrides_report,
        workers=lambda settings: settings.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
