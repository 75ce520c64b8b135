"""A publish or a prune killed at any rename: no loader sees the half version, and the next
publish leaves nothing of it behind.

Each crash is real: a subprocess publishes (the real default packagers, the session model's
files) and ``os._exit``s at its k-th rename, k = 1 .. every rename a publish makes, so no
``finally`` runs and whatever it had written stays. Then the loaders look (the repository's
version listing and the newest valid version, the local Triton's twin generation, the TorchServe
launcher's choice of archive) and must all see version 1 only; then a normal publish (and
``--keep``) runs, after which every numbered folder of the repository belongs to a committed
version and no temp file, staging folder or pending record is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import publishing
from services.common.repository import list_versions, newest_valid_version
from services.torchserve.launcher import stage_served_version
from services.triton.model_configs import write_local_repository
from services.triton.settings import TritonSettings
from tests.conftest import PublishedModel
from tests.torchserve.conftest import torchserve_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

#: Republishes the newest version's files as the next version (what training.publish commits,
#: without the export); with a crash point k > 0 the process dies at its k-th rename. It prints
#: the number of renames a whole run made.
SCRIPT = """
import os, shutil, sys
from pathlib import Path
from services.common.publishing import prune, stage_version
from services.common.repository import list_versions, read_manifest

repo, model, crash_at, keep = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
renames = 0
real = {"rename": os.rename, "replace": os.replace}

def counted(name):
    def rename(*args, **kwargs):
        global renames
        renames += 1
        if renames == crash_at:
            os._exit(17)  # a crash: no finally, no clean-up
        return real[name](*args, **kwargs)
    return rename

os.rename, os.replace = counted("rename"), counted("replace")
first = read_manifest(repo, model, list_versions(repo, model)[-1])
with stage_version(repo, model) as staged:
    staged.version_dir.mkdir(parents=True)
    staged.torchscript_dir.mkdir(parents=True)
    files = {}
    for key, folder, name in (
        ("onnx", staged.version_dir, "model.onnx"),
        ("torchscript", staged.torchscript_dir, "model.pt"),
    ):
        shutil.copyfile(repo / first.artifacts[key].path, folder / name)
        files[key] = staged.artifact(folder / name)
    staged.commit(first.model_copy(update={"version": staged.version, "artifacts": files}))
    if keep:
        prune(repo, model, keep)
print(renames)
"""


def run_publish(repo: Path, model: str, crash_at: int = 0, keep: int = 0) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(repo), model, str(crash_at), str(keep)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout.strip() or done.stderr[-2000:]


def loaders_see(repo: Path, model: str, tmp: Path) -> dict[str, object]:
    """The version each loader would serve from ``repo``."""
    twin = tmp / "twin"
    triton = write_local_repository(twin, repo, model, TritonSettings())
    twin_versions = sorted({p.name for p in twin.glob("*/*") if p.name.isdigit()})
    settings = torchserve_settings(repo, model, tmp / "ts")
    settings.model_store.mkdir(parents=True, exist_ok=True)
    torchserve, _, _, _ = stage_served_version(settings)
    return {
        "listed": list_versions(repo, model),
        "newest_valid": newest_valid_version(repo, model).version,
        "triton": triton,
        "triton_folders": twin_versions,
        "torchserve": torchserve,
    }


def orphans(repo: Path, model: str) -> list[str]:
    """What belongs to no committed version: numbered folders of a version without a manifest,
    this module's temp names, staging folders beside the repository, a pending record."""
    committed = {str(v) for v in list_versions(repo, model)}
    found = [
        str(p.relative_to(repo))
        for p in repo.glob("*/*")
        if p.name.isdigit() and p.name not in committed
    ]
    found += [
        str(p.relative_to(repo))
        for p in repo.rglob(".*")
        if p.name != publishing.LOCK_NAME and "__pycache__" not in p.parts
    ]
    found += [p.name for p in repo.parent.glob(f".{repo.name}.staging-*")]
    return found


def _single_version_repo(published_model: PublishedModel, folder: Path) -> Path:
    repo = published_model.copy_repository(folder)
    assert list_versions(repo, published_model.model) == [1]
    return repo


def test_a_crash_at_any_rename_of_a_publish_is_invisible_and_cleaned_by_the_next(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    model = published_model.model
    reference = _single_version_repo(published_model, tmp_path / "reference")
    status, renames = run_publish(reference, model)
    assert status == 0, renames
    total = int(renames)
    assert list_versions(reference, model) == [1, 2]
    assert orphans(reference, model) == []
    manifest = json.loads((reference / model / "2" / "manifest.json").read_text())
    assert sorted(manifest["folders"]) == [
        f"{model}_ensemble/2",
        f"{model}_torchscript/2",
        "preprocess/2",
    ]
    assert total >= 5  # configs, labels, the pending record, four version folders

    for crash_at in range(1, total + 1):
        case = tmp_path / f"crash-{crash_at}"
        repo = _single_version_repo(published_model, case)
        status, output = run_publish(repo, model, crash_at)
        assert status == 17, (crash_at, output)  # the last rename is the commit: never done
        assert loaders_see(repo, model, case) == {
            "listed": [1],
            "newest_valid": 1,
            "triton": 1,
            "triton_folders": ["1"],
            "torchserve": 1,
        }, crash_at
        status, output = run_publish(repo, model, keep=1)
        assert status == 0, (crash_at, output)
        newest = list_versions(repo, model)
        assert len(newest) == 1 and newest[0] >= 2, (crash_at, newest)
        assert orphans(repo, model) == [], crash_at
        assert loaders_see(repo, model, case)["torchserve"] == newest[0]


def test_a_crash_at_any_rename_of_a_prune_is_finished_by_the_next_publish(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """``--keep 1`` with two versions: killed at each rename of the prune (the renames of the
    commit before it run first), the next publish with --keep leaves only whole versions."""
    model = published_model.model
    reference = _single_version_repo(published_model, tmp_path / "reference")
    status, publish_renames = run_publish(reference, model)
    assert status == 0, publish_renames
    status, with_prune = run_publish(reference, model, keep=1)
    assert status == 0, with_prune
    assert list_versions(reference, model) == [3]
    first_prune_rename = int(publish_renames) + 1
    for crash_at in range(first_prune_rename, int(with_prune) + 1):
        case = tmp_path / f"crash-{crash_at}"
        repo = _single_version_repo(published_model, case)
        assert run_publish(repo, model)[0] == 0
        status, output = run_publish(repo, model, crash_at, keep=1)
        assert status == 17, (crash_at, output)
        assert 3 in list_versions(repo, model), crash_at  # committed before the prune began
        status, output = run_publish(repo, model, keep=1)
        assert status == 0, (crash_at, output)
        assert list_versions(repo, model) == [4], crash_at
        assert orphans(repo, model) == [], crash_at
