"""Is TorchServe's worker READY: read from the management API's describe-model answer.

TorchServe's ``/ping`` says "Healthy" before any worker has loaded the model, so every place
that asks whether TorchServe can answer (the launcher's ``up`` and ``status``, the gateway's
readiness, the container healthcheck) counts READY workers in ``GET /models/<model>[/<v>]``
with :func:`ready_workers`. Standard library only: the healthcheck imports it in a container.
"""

from __future__ import annotations

READY = "READY"


def ready_workers(description: object) -> dict[str, int]:
    """READY workers per model version (``"modelVersion"`` as text), in the answer's order.

    ``description`` is the parsed JSON of a describe-model answer: a list with one entry per
    version, each with its ``workers``. Raises ValueError when it is not shaped like that.
    """
    if not isinstance(description, list):
        raise ValueError(f"a model description is a list, not {type(description).__name__}")
    ready: dict[str, int] = {}
    for entry in description:
        workers = entry.get("workers", []) if isinstance(entry, dict) else None
        if not isinstance(workers, list):
            raise ValueError(f"malformed model description entry: {str(entry)[:200]}")
        count = sum(1 for w in workers if isinstance(w, dict) and w.get("status") == READY)
        version = str(entry.get("modelVersion"))
        ready[version] = ready.get(version, 0) + count
    return ready
