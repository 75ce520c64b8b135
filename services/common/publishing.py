"""Writing the versioned model repository: the write side of :mod:`services.common.repository`.

This module owns the repository's layout on the way in: version numbers, the staging folder,
the publish lock, the commit renames, pruning and atomic file and folder writes. Publishing one
version (``python -m training publish`` does this through :func:`stage_version`)::

    with stage_version(repo, model) as staged:      # lock held, number picked
        ... write model.onnx into staged.version_dir, model.pt into staged.torchscript_dir ...
        staged.commit(manifest, packagers)          # packagers, manifest, fsync, commit

1. :func:`stage_version` takes the repository lock (an advisory ``flock`` on
   ``<repo>/.publish.lock``: one publisher at a time), picks the number (:func:`next_version`:
   one more than any numbered folder of the model or version a crashed publish left, committed
   or not, so a number once half-used is skipped, never reused) and then cleans what crashed
   publishes and prunes left (:func:`recover`). Its staging folder,
   ``<parent>/.<repo name>.staging-<id>/``, sits beside the repository (same file system, so
   the commit is a rename) and is laid out like it: ``<model>/<v>/`` (the manifest's folder),
   ``<model>_torchscript/<v>/``, with ``--int8`` ``<model>_int8/<v>/``, and any other
   model's ``<v>/`` a packager stages (Triton's ``preprocess`` and ensembles). It is removed
   when the ``with`` block ends, whatever happened.
2. :meth:`StagedVersion.commit`: every packager adds its files to the staging tree and names
   the artifacts it added (recorded, with their sha256, in the manifest, which also lists the
   version's folders outside its own); the manifest is written there and the whole staging
   tree fsynced. Only then is the repository touched: each packager writes what lies outside
   version folders (Triton's ``config.pbtxt`` files and labels), each file written beside and
   renamed in; a *pending* record (``<repo>/.publish-pending.json``: the version and its
   folders) is written; the staged version folders are renamed into place, **the manifest's
   folder last: that rename is the commit point**; the pending record is removed.
3. :func:`prune` deletes all but the newest N versions: for each, a pending record, its
   manifest folder first (it stops being a version at once), then its other folders; then every
   packager's own clean-up.

What a crash leaves is never a version: every loader of this project lists versions by their
manifest (:func:`~services.common.repository.list_versions`), and the manifest's folder arrives
whole, last. What it does leave (a version's other folders, renamed in before the crash; temp
files; staging folders) the next publish removes under the lock, before anything else: the
folders of a pending record whose version has no manifest, numbered folders of the model without
one, and this module's temp names. (Triton reading the repository itself, in poll mode, is the
one reader that sees a version's other folders during the few renames before the commit.)

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
import json
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
    read_manifest,
    sha256_file,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".publish.lock"
#: The version whose folders are being moved into (or out of) the repository, and those folders.
PENDING_NAME = ".publish-pending.json"

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
    """One more than any numbered folder of the model or pending version, committed or not:
    never overwrite, never reuse a number a crashed publish half-used."""
    numbers = [0]
    for name in version_folders(model):
        folder = repo / name
        if folder.is_dir():
            numbers.extend(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    pending = _read_pending(repo)
    if pending is not None and pending[0] == model:
        numbers.append(pending[1])
    return max(numbers) + 1


def _committed(repo: Path, model: str, version: int) -> bool:
    return (repo / model / str(version) / MANIFEST_NAME).is_file()


def _write_pending(repo: Path, model: str, version: int, folders: Sequence[Path]) -> None:
    record = {"model": model, "version": version, "folders": [str(f) for f in folders]}
    write_text_atomic(repo / PENDING_NAME, json.dumps(record) + "\n")
    fsync_path(repo)


def _clear_pending(repo: Path) -> None:
    (repo / PENDING_NAME).unlink(missing_ok=True)
    fsync_path(repo)


def _read_pending(repo: Path) -> tuple[str, int, list[Path]] | None:
    """The pending record (model, version, folders), or None; an unreadable one is dropped."""
    try:
        record = json.loads((repo / PENDING_NAME).read_text())
        folders = [Path(f) for f in record["folders"]]
        found = (str(record["model"]), int(record["version"]), folders)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring the unreadable %s", repo / PENDING_NAME)
        return None
    if any(f.is_absolute() or ".." in f.parts or len(f.parts) != 2 for f in folders):
        logger.warning("ignoring %s: it names folders outside the repository", PENDING_NAME)
        return None
    return found


def _is_leftover(path: Path) -> bool:
    """A name this module's atomic writes use only while they run (see their docstrings)."""
    name = path.name
    hidden = name.startswith(".") and name not in (LOCK_NAME, PENDING_NAME)
    return hidden and (name.endswith((".tmp", ".replaced")) or name.startswith(".deleted-"))


def recover(
    repo: Path, model: str, packagers: Iterable[str | Packager] | None = None
) -> list[Path]:
    """Remove what crashed publishes and prunes left; return it. Call it under the lock.

    - staging folders beside the repository;
    - the folders of a pending record whose version has no manifest (a publish that crashed
      before its commit, or a prune after it uncommitted the version);
    - numbered folders of ``model`` (``<model>/N`` and ``<model>_torchscript/N``) without a
      manifest (what a crash left before pending records existed);
    - for each of those versions, what the packagers keep (their ``prune`` hook);
    - this module's temp files and folders (``.*.tmp``, ``.*.replaced``, ``.deleted-*``) in
      the repository and its model folders.
    """
    removed = clean_stale_staging(repo)
    uncommitted: set[int] = set()

    def remove(folder: Path) -> None:
        if folder.exists():
            remove_dir(folder)
            removed.append(folder)

    pending = _read_pending(repo)
    if pending is not None:
        pending_model, version, folders = pending
        if not _committed(repo, pending_model, version):
            for folder in folders:
                remove(repo / folder)
            if pending_model == model:
                uncommitted.add(version)
        _clear_pending(repo)
    for name in version_folders(model):
        folder = repo / name
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name.isdigit() and not _committed(repo, model, int(child.name)):
                    remove(child)
                    uncommitted.add(int(child.name))
    if uncommitted:
        for packager in resolve_packagers(packagers):
            packager.prune(repo, model, sorted(uncommitted))
    for path in (*repo.glob("*"), *repo.glob("*/*")):
        if _is_leftover(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.warning(
            "removed what an interrupted publish left in %s: %s",
            repo,
            ", ".join(str(p.relative_to(repo.parent)) for p in removed),
        )
    return removed


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


def clean_stale_staging(repo: Path) -> list[Path]:
    """Remove the staging folders crashed publishes left beside ``repo`` (call under the lock);
    return them."""
    stale = list(repo.parent.glob(staging_prefix(repo) + "*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


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
        staged = self._staged_version_dirs()
        folders = [str(folder.relative_to(self.root)) for folder in staged[:-1]]
        manifest = manifest.model_copy(update={"artifacts": artifacts, "folders": folders})
        (self.version_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        fsync_tree(self.root)

        # What names no version (configs, labels); replaced file by file, so writing it before
        # the commit is safe for the versions served now.
        for packager in chosen:
            packager.write_shared(self.repo, manifest)
        relative = [folder.relative_to(self.root) for folder in staged]
        _write_pending(self.repo, self.model, self.version, relative)
        for folder in relative:
            if (self.repo / folder).exists():  # the number is new: only a crash left this
                logger.warning("replacing %s, left by an interrupted publish", folder)
                remove_dir(self.repo / folder)
        for folder in relative:  # the manifest's folder last: the commit
            move_into_place(self.root / folder, self.repo / folder)
        _clear_pending(self.repo)
        return manifest

    def _staged_version_dirs(self) -> list[Path]:
        staged = sorted(
            folder
            for folder in self.root.glob(f"*/{self.version}")
            if folder.is_dir() and folder != self.version_dir
        )
        return [*staged, self.version_dir]


@contextlib.contextmanager
def stage_version(
    repo: Path, model: str, packagers: Iterable[str | Packager] | None = None
) -> Iterator[StagedVersion]:
    """Hold the lock and a fresh staging folder for the next version of ``model`` in ``repo``,
    after :func:`recover` removed what interrupted publishes left (``packagers``: those whose
    files it removes too, default :data:`DEFAULT_PACKAGERS`).

    The staging folder is removed when the block ends, committed or not; nothing is a version
    in the repository unless :meth:`StagedVersion.commit` got to its last rename.
    """
    repo = repo.resolve()
    repo.mkdir(parents=True, exist_ok=True)
    root = repo.parent / f"{staging_prefix(repo)}{uuid.uuid4().hex[:12]}"
    try:
        with repository_lock(repo):
            version = next_version(repo, model)  # before recover: a half-used number stays used
            recover(repo, model, packagers)
            yield StagedVersion(repo, model, version, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def prune(
    repo: Path, model: str, keep: int, packagers: Iterable[str | Packager] | None = None
) -> list[int]:
    """Delete all but the newest ``keep`` versions (manifest folder first, then every folder its
    manifest lists); return them.

    Call it holding the lock (inside :func:`stage_version`'s block, after the commit)."""
    if keep < 1:
        raise PublishingError(f"keep must be at least 1, got {keep}")
    removed = []
    for version in list_versions(repo, model)[:-keep]:
        try:
            recorded = [Path(f) for f in read_manifest(repo, model, version).folders]
        except RepositoryError:  # unreadable: what every version has is still known
            recorded = []
        own = [Path(name) / str(version) for name in version_folders(model)]
        folders = own + [f for f in recorded if f not in own]
        # A crash from here on leaves a pending record: the next publish finishes the job.
        _write_pending(repo, model, version, folders)
        for folder in folders:  # the manifest's folder first: no longer a version at once
            remove_dir(repo / folder)
        _clear_pending(repo)
        removed.append(version)
    if removed:
        for packager in resolve_packagers(packagers):
            packager.prune(repo, model, removed)
    return removed
