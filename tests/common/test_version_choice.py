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
    model, bad = corrupt_newest.published.model, corrupt_newest.bad
    assert chosen.refused[0].reason.startswith(f"{model}_torchscript/{bad}/model.pt: sha256 mis")


def test_a_refusal_names_files_relative_to_the_repository(
    repo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason goes into every engine's /readyz: the artifact's path inside the repository,
    never where the repository lies on the server (given absolute, relative or through a link)."""
    (version,) = [int(p.name) for p in (repo_copy / "classifier").iterdir() if p.name.isdigit()]
    (repo_copy / "classifier" / str(version) / "model.onnx").unlink()
    newer = repo_copy / "classifier" / str(version + 1)
    newer.mkdir()
    (newer / MANIFEST_NAME).write_text("{not json")
    link = repo_copy.parent / "link"
    link.symlink_to(repo_copy)
    monkeypatch.chdir(repo_copy.parent)
    for repo in (repo_copy, link, Path(repo_copy.name)):
        with pytest.raises(NoValidVersion) as raised:
            newest_valid_version(repo, "classifier")
        reasons = [r.reason for r in raised.value.refused]
        assert reasons[0].startswith(f"manifest classifier/{version + 1}/manifest.json is unre")
        assert reasons[1] == f"classifier/{version}/model.onnx: missing", reasons
        assert all(str(repo_copy.parent) not in reason for reason in reasons), reasons
