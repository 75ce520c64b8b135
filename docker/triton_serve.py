"""Start tritonserver with its shared-memory, logging, model-repository and trace APIs
restricted (the Triton image's command; the other arguments are passed through).

Those APIs, open, would let any client on the backend network map memory into the server,
change its logging or load models, and nothing in the stack uses them. So HTTP and gRPC
requests to them must carry a header key, drawn at random for each start and kept nowhere:
they are closed. The local launcher does the same (services/triton/launcher.py,
RESTRICTED_APIS, which a test keeps equal to the list here). Standard library only: it runs
on the image's own Python.
"""

from __future__ import annotations

import os
import secrets
import sys

RESTRICTED_APIS = ("shared-memory", "logging", "model-repository", "trace")
HEADER = "triton-admin-key"


def main() -> None:
    restricted = f"{','.join(RESTRICTED_APIS)}:{HEADER}={secrets.token_hex(16)}"
    command = [
        "tritonserver",
        *sys.argv[1:],
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
