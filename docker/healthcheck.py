"""Container healthcheck: exit 0 when the service is ready, 1 when it is not (Docker's contract).

    healthcheck.py URL
        healthy when GET URL answers HTTP 200 (the predictor's and gateway's /readyz,
        Triton's /v2/health/ready, Locust's web UI)
    healthcheck.py --torchserve-key-file FILE URL
        URL is TorchServe's management API ``/models/<model>``; the request carries the
        management key from TorchServe's key_file.json, and the service is healthy when a
        worker of the default version is READY. TorchServe's own /ping is not enough: it says
        "Healthy" before any worker has loaded the model.
    healthcheck.py --torchserve URL
        the same READY-worker check without a key, for a TorchServe whose token authorization
        is off (Kubernetes: the probe calls the management API on the pod's loopback).

Standard library only, and Python 3.10 syntax at most: the same file runs in the app image and
in the NGC Triton image. The TorchServe check (app image only) counts READY workers with
``services.torchserve.workers``, standard library only too, as TorchServe's other callers do.
The reason for a failure goes to stdout, which Docker keeps in
``docker inspect --format '{{json .State.Health}}' <container>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def fetch(url: str, timeout: float, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:  # a status >= 400 still is an answer
        return int(exc.code), exc.read()


def torchserve_ready(body: bytes) -> str | None:
    """None when a worker of the described (default) version is READY, else why not."""
    # Imported here: only the app image, which has the services package, checks TorchServe.
    from services.torchserve.workers import ready_workers

    try:
        ready = ready_workers(json.loads(body))
    except ValueError:
        return "management API answered something that is not a model description"
    return None if any(ready.values()) else "no READY worker yet"


def check(args: argparse.Namespace) -> str | None:
    """None when healthy, else a one-line reason."""
    headers = {}
    if args.torchserve_key_file is not None:
        try:
            keys = json.loads(Path(args.torchserve_key_file).read_text())
            headers["Authorization"] = f"Bearer {keys['management']['key']}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"no management key in {args.torchserve_key_file}: {exc}"
    try:
        status, body = fetch(args.url, args.timeout, headers)
    except (OSError, ValueError) as exc:  # refused, timed out, bad URL
        return f"{args.url}: {exc}"
    if status != 200:
        return f"{args.url}: HTTP {status} {body[:200]!r}"
    if args.torchserve or args.torchserve_key_file is not None:
        return torchserve_ready(body)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="URL that answers 200 when the service is ready")
    parser.add_argument(
        "--torchserve-key-file", default=None, help="TorchServe's key_file.json (see above)"
    )
    parser.add_argument(
        "--torchserve",
        action="store_true",
        help="URL is TorchServe's /models/<model>: healthy when a worker is READY",
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    reason = check(parser.parse_args(argv))
    if reason is not None:
        sys.stdout.write(f"unhealthy: {reason}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
