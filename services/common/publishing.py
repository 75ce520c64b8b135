"""Writing the versioned model repository: the write side of :mod:`services.common.repository`.

This module owns the repository's layout on the way in: version numbers, the staging folder,
the publish lock, the commit renames, pruning and atomic file and folder writes. Publishing one
version (``python -m training publish`` does this through :func:`stage_version`)::

    with stage_version(repo, model) as staged:      # lock held, number picked
        ... write model.onnx into staged.version_dir, model.pt into staged.torchscript_dir ...
        staged.commit(manifest, packagers)          # packagers, manifest, fsync, commit

1. :func:`stage_version` takes the repository lock (an advisory ``flock`` on
   ``<repo>/.publish.lock``: one publisher at a time), removes the staging folders of crashed
   publishes and picks the number (:func:`next_version`: one more than any numbered folder of
   the model, committed or not, so a number a crashed publish half-used is skipped, never
   reused). Its staging folder, ``<parent>/.<repo name>.staging-<id>/``, sits beside the
   repository (same file system, so the commit is a rename) and is laid out like it:
   ``<model>/<v>/`` (the manifest's folder), ``<model>_torchscript/<v>/`` and, with
   ``--int8``, ``<model>_int8/<v>/``. It is removed
   when the ``with`` block ends, whatever happened.
2. :meth:`StagedVersion.commit`: every packager adds its files to the staged ``<model>/<v>/``
   and names the artifacts it added (recorded, with their sha256, in the manifest); the
   manifest is written there and the whole staging tree fsynced. Only then is the repository
   touched: each packager writes what lies outside version folders (Triton's ``config.pbtxt``
   and labels, its ``preprocess`` and ensemble models), each file or folder written beside and
   renamed in, and the staged version folders are renamed into place, **the manifest's folder
   last: that rename is the commit point** (:func:`~services.common.repository.list_versions`
   sees only versions with a manifest). A crash or an error at any step leaves the previous
   versions serving and no half version visible.
3. :func:`prune` deletes all but the newest N versions, each one's manifest folder first, then
   lets every packager remove what it keeps for those versions.

Packagers (:class:`Packager`) are how each engine adds its own files without the publisher
knowing the engines: the TorchServe archive builder
(:class:`services.torchserve.archive.TorchServeArchive`) and the Triton config writer
(:class:`services.triton.model_configs.TritonConfigs`). They are found by name:
:data:`DEFAULT_PACKAGERS` lists ``"module:attribute"`` strings that :func:`resolve_packagers`
imports with :mod:`importlib` at publish time (an attribute that is a class is instantiated
without arguments). So ``training``, which calls this module, never imports
``services.torchserve`` or ``services.triton`` itself, and another packager is one more name
(callers may pass their own list, of names or of packager objects).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from services.common.repository import (
    INT8_SUFFIX,
    MANIFEST_NAME,
    TORCHSCRIPT_SUFFIX,
    Artifact,
    Manifest,
    RepositoryError,
    list_versions,
    sha256_file,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".publish.lock"

#: The packagers every publish runs, in order, as ``"module:attribute"`` names.
DEFAULT_PACKAGERS: tuple[str, ...] = (
    "services.torchserve.archive:TorchServeArchive",
    "services.triton.model_configs:TritonConfigs",
)


class PublishingError(RepositoryError):
    """A version could not be published (a packager that cannot be found or that clashes)."""


# --- packagers --------------------------------------------------------------------------------


@runtime_checkable
class Packager(Protocol):
    """What an engine adds to each published version. :class:`PackagerBase` has no-op hooks."""

    @property
    def name(self) -> str:
        """A short name for messages (``torchserve``, ``triton``)."""
        ...

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        """Add files to ``version_dir`` (the staged ``<model>/<v>/``) and return the artifacts
        to record in the manifest, paths relative to ``staging`` (see :func:`artifact`).

        ``staging`` is laid out like the repository, so ``staging / artifact.path`` finds the
        version's files; ``manifest`` lists those written so far (without the packagers')."""
        ...

    def write_shared(self, repo: Path, manifest: Manifest) -> None:
        """Write what lies outside the version folders into the live repository, atomically
        file by file, before the commit (so it must suit the versions already served too)."""
        ...

    def prune(self, repo: Path, model: str, versions: Sequence[int]) -> None:
        """Remove what this packager keeps for ``versions``, which :func:`prune` just deleted."""
        ...


class PackagerBase:
    """A packager that does nothing: subclasses set ``name`` and override the hooks they need."""

    name = "base"

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        return {}

    def write_shared(self, repo: Path, manifest: Manifest) -> None:
        return None

    def prune(self, repo: Path, model: str, versions: Sequence[int]) -> None:
        return None


def resolve_packager(name: str) -> Packager:
    """The packager ``"module:attribute"`` names (a class is instantiated without arguments)."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise PublishingError(f"packager {name!r} is not of the form 'module:attribute'")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise PublishingError(f"packager {name!r} cannot be loaded: {exc}") from exc
    packager = found() if isinstance(found, type) else found
    if not isinstance(packager, Packager):
        raise PublishingError(f"{name!r} is not a packager (name, package, write_shared, prune)")
    return packager


def resolve_packagers(packagers: Iterable[str | Packager] | None = None) -> list[Packager]:
    """Packager objects for names or objects; None: :data:`DEFAULT_PACKAGERS`."""
    chosen = DEFAULT_PACKAGERS if packagers is None else packagers
    return [resolve_packager(p) if isinstance(p, str) else p for p in chosen]


def artifact(root: Path, path: Path) -> Artifact:
    """The manifest entry of ``path``: its path relative to ``root``, sha256 and size."""
    return Artifact(
        path=str(path.relative_to(root)), sha256=sha256_file(path), bytes=path.stat().st_size
    )


# --- durability and atomic writes -------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entry table."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: a reader (or a polling Triton) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).chmod(0o644)  # mkstemp makes 0600; the server may run as another user
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FileSource = Path | str  # a file to copy, or the text to write


def _same_content(folder: Path, files: dict[str, FileSource]) -> bool:
    present = {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    if present != set(files):
        return False
    for name, source in files.items():
        wanted = source.read_bytes() if isinstance(source, Path) else source.encode()
        if (folder / name).read_bytes() != wanted:
            return False
    return True


def write_version_dir(model_dir: Path, version: int, files: dict[str, FileSource]) -> Path:
    """Make ``model_dir/<version>`` hold exactly ``files``, built beside and renamed in.

    A name may be a relative path (``services/common/imaging.py``): its folders are created.

    A folder that already holds the same content is left alone (publishing again is a no-op).
    One that differs (say a publish that crashed before its commit left a preprocess folder
    for a version number that is now reused) is swapped for the new content.
    """
    target = model_dir / str(version)
    if target.is_dir() and _same_content(target, files):
        return target
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=model_dir))
    try:
        for name, source in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, staging / name)
            else:
                (staging / name).write_text(source, encoding="utf-8")
        for folder in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            folder.chmod(0o755)
        if target.exists():
            retired = model_dir / f".{version}.{uuid.uuid4().hex[:8]}.replaced"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def remove_dir(folder: Path) -> None:
    """Rename ``folder`` out of sight (one atomic step), then delete it."""
    if folder.exists():
        doomed = folder.with_name(f".deleted-{folder.name}-{uuid.uuid4().hex[:8]}")
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --- numbering, lock, staging, commit, prune ---------------------------------------------------


def version_folders(model: str) -> tuple[str, ...]:
    """The model folders a version may have files in: the manifest's first, then TorchScript's
    and the int8 model's."""
    return model, model + TORCHSCRIPT_SUFFIX, model + INT8_SUFFIX


def next_version(repo: Path, model: str) -> int:
    """One more than any numbered folder of the model, committed or not: never overwrite."""
    numbers = [0]
    for name in version_folders(model):
        folder = repo / name
        if folder.is_dir():
            numbers.extend(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    return max(numbers) + 1


@contextlib.contextmanager
def repository_lock(repo: Path) -> Iterator[None]:
    """One publisher at a time per repository (an advisory flock on ``.publish.lock``)."""
    repo.mkdir(parents=True, exist_ok=True)
    with (repo / LOCK_NAME).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_prefix(repo: Path) -> str:
    return f".{repo.name}.staging-"


def clean_stale_staging(repo: Path) -> None:
    """Remove the staging folders crashed publishes left beside ``repo`` (call under the lock)."""
    for stale in repo.parent.glob(staging_prefix(repo) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def move_into_place(staged: Path, final: Path) -> None:
    """One atomic rename of a finished version folder into the repository."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(final)
    fsync_path(final.parent)


@dataclass(frozen=True)
class StagedVersion:
    """One version being published: its number and its staging folder (see the module doc)."""

    repo: Path
    model: str
    version: int
    root: Path

    @property
    def version_dir(self) -> Path:
        """The staged ``<model>/<v>/``: the ONNX file, the packagers' files, the manifest."""
        return self.root / self.model / str(self.version)

    @property
    def torchscript_dir(self) -> Path:
        """The staged ``<model>_torchscript/<v>/``."""
        return self.root / (self.model + TORCHSCRIPT_SUFFIX) / str(self.version)

    @property
    def int8_dir(self) -> Path:
        """The staged ``<model>_int8/<v>/`` (only with ``publish --int8``)."""
        return self.root / (self.model + INT8_SUFFIX) / str(self.version)

    def artifact(self, path: Path) -> Artifact:
        """The manifest entry of a staged file (its path as it will be in the repository)."""
        return artifact(self.root, path)

    def commit(
        self, manifest: Manifest, packagers: Iterable[str | Packager] | None = None
    ) -> Manifest:
        """Run the packagers, write the manifest and commit; return the manifest written."""
        if (manifest.model, manifest.version) != (self.model, self.version):
            raise PublishingError(
                f"manifest of {manifest.model} v{manifest.version} given to the staged "
                f"{self.model} v{self.version}"
            )
        chosen = resolve_packagers(packagers)
        self.version_dir.mkdir(parents=True, exist_ok=True)
        artifacts = dict(manifest.artifacts)
        for packager in chosen:
            added = packager.package(self.root, manifest, self.version_dir)
            clash = sorted(set(added) & set(artifacts))
            if clash:
                raise PublishingError(f"packager {packager.name} adds artifacts {clash} again")
            artifacts.update(added)
        manifest = manifest.model_copy(update={"artifacts": artifacts})
        (self.version_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        fsync_tree(self.root)

        # What names no version, and other models' version folders (Triton's preprocess and
        # ensemble); replaced file by file or folder by folder, so writing it before the commit
        # is safe for the versions served now.
        for packager in chosen:
            packager.write_shared(self.repo, manifest)
        for folder in self._staged_version_dirs():  # the manifest's folder last: the commit
            move_into_place(folder, self.repo / folder.relative_to(self.root))
        return manifest

    def _staged_version_dirs(self) -> list[Path]:
        staged = sorted(
            folder
            for folder in self.root.glob(f"*/{self.version}")
            if folder.is_dir() and folder != self.version_dir
        )
        return [*staged, self.version_dir]


@contextlib.contextmanager
def stage_version(repo: Path, model: str) -> Iterator[StagedVersion]:
    """Hold the lock and a fresh staging folder for the next version of ``model`` in ``repo``.

    The staging folder is removed when the block ends, committed or not; nothing is visible in
    the repository unless :meth:`StagedVersion.commit` got to its last rename.
    """
    repo = repo.resolve()
    repo.mkdir(parents=True, exist_ok=True)
    root = repo.parent / f"{staging_prefix(repo)}{uuid.uuid4().hex[:12]}"
    try:
        with repository_lock(repo):
            clean_stale_staging(repo)
            yield StagedVersion(repo, model, next_version(repo, model), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def prune(
    repo: Path, model: str, keep: int, packagers: Iterable[str | Packager] | None = None
) -> list[int]:
    """Delete all but the newest ``keep`` versions (manifest folder first); return them.

    Call it holding the lock (inside :func:`stage_version`'s block, after the commit)."""
    if keep < 1:
        raise PublishingError(f"keep must be at least 1, got {keep}")
    removed = []
    for version in list_versions(repo, model)[:-keep]:
        for name in version_folders(model):
            remove_dir(repo / name / str(version))
        removed.append(version)
    if removed:
        for packager in resolve_packagers(packagers):
            packager.prune(repo, model, removed)
    return removed
