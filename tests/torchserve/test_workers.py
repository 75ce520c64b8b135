"""services.torchserve.workers: READY workers counted from a describe-model answer."""

from __future__ import annotations

import pytest

from services.torchserve.workers import ready_workers


def entry(version: str, *statuses: str) -> dict[str, object]:
    return {
        "modelName": "classifier",
        "modelVersion": version,
        "workers": [{"id": str(9000 + i), "status": s} for i, s in enumerate(statuses)],
    }


def test_ready_workers_per_version_in_the_answers_order() -> None:
    description = [entry("2", "READY", "UNLOADING", "READY"), entry("1", "UNLOADING")]
    assert list(ready_workers(description).items()) == [("2", 2), ("1", 0)]
    assert ready_workers([{"modelVersion": "3"}]) == {"3": 0}  # no workers listed yet
    assert ready_workers([]) == {}


@pytest.mark.parametrize(
    "description", [{"modelVersion": "1"}, ["not an entry"], [{"workers": "READY"}], None]
)
def test_a_malformed_description_is_a_value_error(description: object) -> None:
    with pytest.raises(ValueError):
        ready_workers(description)
