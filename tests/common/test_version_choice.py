"""Which version an engine starts on: the newest valid one, the newer ones refused with why."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.repository import (
    MANIFEST_NAME,
    NoValidVersion,
    RefusedVersion,
    RepositoryError,
    newest_valid,
    newest_valid_version,
)
from tests.conftest import CorruptNewest


def _versions(repo: Path, *numbers: int) -> None:
    for number in numbers:
        folder = repo / "classifier" / str(number)
        folder.mkdir(parents=True)
        (folder / MANIFEST_NAME).write_text("{}")


def test_the_walk_goes_newest_first_and_stops_at_the_first_that_loads(tmp_path: Path) -> None:
    _versions(tmp_path, 1, 2, 3, 4)
    tried: list[int] = []

    def load(version: int) -> str:
        tried.append(version)
        if version > 2:
            raise RepositoryError(f"v{version} is bad")
        return f"loaded v{version}"

    chosen = newest_valid(tmp_path, "classifier", load)
    assert (chosen.version, chosen.loaded) == (2, "loaded v2")
    assert chosen.refused == [RefusedVersion(4, "v4 is bad"), RefusedVersion(3, "v3 is bad")]
    assert tried == [4, 3, 2]
    assert chosen.refused[0].as_dict() == {"version": 4, "reason": "v4 is bad"}


def test_only_refusable_errors_refuse_a_version(tmp_path: Path) -> None:
    _versions(tmp_path, 1, 2)

    def load(version: int) -> int:
        raise KeyError("a bug, not a bad version")

    with pytest.raises(KeyError):
        newest_valid(tmp_path, "classifier", load)


def test_no_valid_version_names_every_refusal(tmp_path: Path) -> None:
    with pytest.raises(NoValidVersion, match="no published version of 'classifier'"):
        newest_valid(tmp_path, "classifier", lambda version: version)
    _versions(tmp_path, 1, 2)

    def load(version: int) -> int:
        raise RepositoryError(f"v{version} is bad")

    with pytest.raises(NoValidVersion, match="v2: v2 is bad; v1: v1 is bad") as raised:
        newest_valid(tmp_path, "classifier", load)
    assert [r.version for r in raised.value.refused] == [2, 1]


def test_a_flipped_byte_in_the_newest_version_falls_back_to_the_one_before(
    corrupt_newest: CorruptNewest,
) -> None:
    chosen = newest_valid_version(corrupt_newest.repo, corrupt_newest.published.model)
    assert chosen.version == chosen.loaded.version == corrupt_newest.good
    assert [r.version for r in chosen.refused] == [corrupt_newest.bad]
    assert "torchscript sha256 mismatch" in chosen.refused[0].reason
