"""The repository's write side (services.common.publishing), without torch or a real model.

Versions here are made of small files (an "onnx" and a "torchscript" of a few bytes) and
packagers written for the test, so numbering, the commit point, pruning, the atomic writes and
packager failures are checked in milliseconds.
"""

from __future__ import annotations

import fcntl
import json
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.common import publishing
from services.common.publishing import (
    DEFAULT_PACKAGERS,
    Packager,
    PackagerBase,
    PublishingError,
    prune,
    resolve_packager,
    resolve_packagers,
    stage_version,
    write_text_atomic,
    write_version_dir,
)
from services.common.repository import (
    Artifact,
    Manifest,
    list_versions,
    load_version,
    read_manifest,
    sha256_file,
)
from services.common.serving import ServingConfig

MODEL = "classifier"


def manifest_for(version: int, artifacts: dict[str, Artifact], **extra: object) -> Manifest:
    return Manifest(
        model=MODEL,
        version=version,
        created_at="2025-01-01T00:00:00+00:00",
        torch_version="test",
        arch="test",
        dataset={},
        metrics={},
        input={"shape": [3, 8, 8]},
        output={"name": "logits"},
        labels=["a", "b"],
        artifacts=artifacts,
        **extra,
    )


def publish(
    repo: Path,
    packagers: Sequence[str | Packager] = (),
    serving: ServingConfig | None = None,
    keep: int | None = None,
) -> int:
    """What training.publish does, with files of a few bytes for the model."""
    with stage_version(repo, MODEL) as staged:
        staged.version_dir.mkdir(parents=True)
        staged.torchscript_dir.mkdir(parents=True)
        onnx = staged.version_dir / "model.onnx"
        onnx.write_bytes(f"onnx {staged.version}".encode())
        torchscript = staged.torchscript_dir / "model.pt"
        torchscript.write_bytes(f"pt {staged.version}".encode())
        artifacts = {"onnx": staged.artifact(onnx), "torchscript": staged.artifact(torchscript)}
        extra = {} if serving is None else {"serving": serving}
        staged.commit(manifest_for(staged.version, artifacts, **extra), packagers)
        if keep is not None:
            prune(repo, MODEL, keep, packagers)
        return staged.version


class Recorder(PackagerBase):
    """Adds one file to the version folder, one shared file, and notes every call."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        self.calls.append(("package", manifest.version))
        extra = version_dir / "extra.bin"
        extra.write_bytes(b"extra")
        return {"extra": publishing.artifact(staging, extra)}

    def write_shared(self, repo: Path, manifest: Manifest) -> None:
        self.calls.append(("write_shared", manifest.version))
        write_text_atomic(repo / MODEL / "shared.txt", f"v{manifest.version}\n")

    def prune(self, repo: Path, model: str, versions: Sequence[int]) -> None:
        self.calls.append(("prune", list(versions)))


class Failing(PackagerBase):
    name = "failing"

    def __init__(self, where: str) -> None:
        self.where = where

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        (version_dir / "half-written").write_bytes(b"x")
        if self.where == "package":
            raise RuntimeError("packager failed")
        return {}

    def write_shared(self, repo: Path, manifest: Manifest) -> None:
        if self.where == "write_shared":
            raise RuntimeError("shared files failed")


def leftovers(repo: Path) -> list[Path]:
    """Staging folders beside the repository and temporary files inside it."""
    staging = list(repo.parent.glob(f".{repo.name}.staging-*"))
    hidden = [p for p in repo.rglob(".*") if p.name != publishing.LOCK_NAME]
    return staging + hidden


# --- numbering and the commit point ---------------------------------------------------------


def test_versions_are_numbered_and_committed_with_their_manifest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert publish(repo) == 1
    assert publish(repo, serving=ServingConfig(max_batch_size=8)) == 2
    assert list_versions(repo, MODEL) == [1, 2]
    loaded = load_version(repo, MODEL)  # every sha256 checks
    assert loaded.version == 2 and loaded.manifest.serving.max_batch_size == 8
    assert loaded.torchscript_path == repo / "classifier_torchscript" / "2" / "model.pt"
    assert read_manifest(repo, MODEL, 1).serving == ServingConfig()
    assert leftovers(repo) == []


def test_numbering_skips_folders_no_manifest_committed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo)
    (repo / "classifier_torchscript" / "4").mkdir(parents=True)  # a publish that crashed
    (repo / MODEL / "6").mkdir()  # a version folder without its manifest
    assert list_versions(repo, MODEL) == [1]
    assert publishing.next_version(repo, MODEL) == 7
    assert publish(repo) == 7
    assert list_versions(repo, MODEL) == [1, 7]


def test_the_manifest_folder_is_renamed_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    moved: list[Path] = []
    real_move = publishing.move_into_place

    def recording_move(staged: Path, final: Path) -> None:
        moved.append(final.relative_to(repo.resolve()))
        real_move(staged, final)

    class OtherModel(PackagerBase):
        """Stages a version folder of another model, as a packager may."""

        name = "other"

        def package(
            self, staging: Path, manifest: Manifest, version_dir: Path
        ) -> dict[str, Artifact]:
            folder = staging / "zz_other" / str(manifest.version)
            folder.mkdir(parents=True)
            (folder / "file").write_text("x")
            return {}

    monkeypatch.setattr(publishing, "move_into_place", recording_move)
    publish(repo, [OtherModel()])
    assert moved[-1] == Path(MODEL) / "1"
    assert sorted(moved[:-1]) == [Path("classifier_torchscript/1"), Path("zz_other/1")]
    assert (repo / "zz_other" / "1" / "file").read_text() == "x"


def test_a_crash_before_the_commit_rename_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    publish(repo)
    real_move = publishing.move_into_place

    def crash_on_commit(staged: Path, final: Path) -> None:
        if final.parent.name == MODEL:
            raise OSError("simulated crash before the commit rename")
        real_move(staged, final)

    monkeypatch.setattr(publishing, "move_into_place", crash_on_commit)
    with pytest.raises(OSError, match="simulated crash"):
        publish(repo)
    monkeypatch.undo()
    assert list_versions(repo, MODEL) == [1]
    assert (repo / "classifier_torchscript" / "2").is_dir()  # half way: skipped, not reused
    assert not list(tmp_path.glob(".repo.staging-*"))
    assert publish(repo) == 3


def test_stale_staging_folders_are_removed_and_the_lock_is_held(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    stale = tmp_path / ".repo.staging-0123456789ab"
    (stale / MODEL / "1").mkdir(parents=True)
    with stage_version(repo, MODEL) as staged:
        assert not stale.exists()
        assert staged.root.parent == repo.resolve().parent
        with (repo / publishing.LOCK_NAME).open("a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second publisher waits
        staged.version_dir.mkdir(parents=True)
    assert not staged.root.exists()  # the staging folder goes, committed or not
    assert list_versions(repo, MODEL) == []
    with (repo / publishing.LOCK_NAME).open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


# --- packagers ------------------------------------------------------------------------------


def test_packagers_add_files_artifacts_and_shared_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    recorder = Recorder()
    publish(repo, [recorder])
    manifest = read_manifest(repo, MODEL, 1)
    assert manifest.artifacts["extra"].path == "classifier/1/extra.bin"
    assert manifest.artifacts["extra"].sha256 == sha256_file(repo / MODEL / "1" / "extra.bin")
    assert (repo / MODEL / "shared.txt").read_text() == "v1\n"
    assert recorder.calls == [("package", 1), ("write_shared", 1)]
    load_version(repo, MODEL, 1)


@pytest.mark.parametrize("where", ["package", "write_shared"])
def test_a_failing_packager_leaves_nothing_published(tmp_path: Path, where: str) -> None:
    repo = tmp_path / "repo"
    publish(repo)
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="failed"):
        publish(repo, [recorder, Failing(where)])
    assert list_versions(repo, MODEL) == [1]
    assert not (repo / MODEL / "2").exists()
    assert not (repo / "classifier_torchscript" / "2").exists()
    if where == "package":  # nothing reached the repository: not even the shared files
        assert recorder.calls == [("package", 2)]
        assert not (repo / MODEL / "shared.txt").exists()
    assert leftovers(repo) == []
    assert load_version(repo, MODEL).version == 1


def test_packagers_may_not_record_an_artifact_twice(tmp_path: Path) -> None:
    class Clashing(PackagerBase):
        name = "clashing"

        def package(
            self, staging: Path, manifest: Manifest, version_dir: Path
        ) -> dict[str, Artifact]:
            return {"onnx": manifest.artifacts["onnx"]}

    repo = tmp_path / "repo"
    with pytest.raises(PublishingError, match=r"clashing adds artifacts \['onnx'\]"):
        publish(repo, [Clashing()])
    assert list_versions(repo, MODEL) == []


def test_default_packagers_are_found_by_name() -> None:
    found = resolve_packagers()
    assert [p.name for p in found] == ["torchserve", "triton"]
    assert len(found) == len(DEFAULT_PACKAGERS)
    assert all(isinstance(p, Packager) for p in found)
    for bad, message in [
        ("services.common.publishing", "not of the form"),
        ("services.nowhere:Thing", "cannot be loaded"),
        ("services.common.publishing:LOCK_NAME", "is not a packager"),
    ]:
        with pytest.raises(PublishingError, match=message):
            resolve_packager(bad)


# --- prune ----------------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_tells_the_packagers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    recorder = Recorder()
    for _ in range(3):
        publish(repo, [recorder])
    assert prune(repo, MODEL, 2, [recorder]) == [1]
    assert list_versions(repo, MODEL) == [2, 3]
    assert not (repo / MODEL / "1").exists()
    assert not (repo / "classifier_torchscript" / "1").exists()
    assert recorder.calls[-1] == ("prune", [1])
    assert prune(repo, MODEL, 2, [recorder]) == []
    assert recorder.calls[-1] == ("prune", [1])  # nothing pruned: not called again
    with pytest.raises(PublishingError, match="at least 1"):
        prune(repo, MODEL, 0)
    assert leftovers(repo) == []


# --- atomic writes --------------------------------------------------------------------------


def test_write_text_atomic_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "config.pbtxt"
    write_text_atomic(target, "one\n")
    write_text_atomic(target, "two\n")
    assert target.read_text() == "two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "half \udcff")  # fails while writing the temporary file
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.pbtxt"]


def test_write_version_dir_is_a_no_op_or_a_swap(tmp_path: Path) -> None:
    source = tmp_path / "model.py"
    source.write_text("print('hi')\n")
    model_dir = tmp_path / "preprocess"
    files: dict[str, publishing.FileSource] = {"model.py": source, "spec.json": "{}"}
    folder = write_version_dir(model_dir, 3, files)
    inode = folder.stat().st_ino
    assert write_version_dir(model_dir, 3, files).stat().st_ino == inode  # same content
    changed = write_version_dir(model_dir, 3, {**files, "spec.json": json.dumps({"a": 1})})
    assert changed.stat().st_ino != inode
    assert json.loads((changed / "spec.json").read_text()) == {"a": 1}
    assert (changed / "model.py").read_bytes() == source.read_bytes()
    assert stat.S_IMODE(changed.stat().st_mode) == 0o755
    assert sorted(p.name for p in model_dir.iterdir()) == ["3"]  # no temporary folder left
