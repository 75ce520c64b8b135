"""``python -m services.gateway``: serve the gateway with uvicorn.

Every setting is an environment variable ``GATEWAY_*``; ``--settings`` prints them all. A bad
value stops the process with pydantic's message naming the variable (exit status 2). The
gateway starts whether or not the engines are up: ``/readyz`` says which ones answer.
"""

from __future__ import annotations

import sys

from services.common.cli import serve
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    return serve("gateway", __doc__.split("\n\n")[0], GatewaySettings, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
