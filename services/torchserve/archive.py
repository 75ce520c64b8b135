"""Build the TorchServe archive (``<model>.mar``) of one published version.

The archive holds, at its root (the folder TorchServe extracts and puts on the worker's
``PYTHONPATH``)::

    MAR-INF/MANIFEST.json     written by torch-model-archiver (handler, version, runtime)
    model.pt                  the version's TorchScript file, sha256-checked on the way in
    handler.py                services/torchserve/handler.py
    manifest.json             the version's manifest (labels, input spec, sha256 of model.pt)
    services/__init__.py      + services/common/*.py: the shared decoding code

torch-model-archiver's ``--extra-files`` copies a *folder's contents* to the archive root (a
file goes to the root by its base name), so the shared code is staged as
``<staging>/services/common/...`` and that staging folder is passed: the worker then imports
``services.common.imaging`` exactly as the repository does.

The archiver stages files in ``$TMPDIR/<model-name>`` (shared by every archiver run with the
same model name), so it runs as a subprocess with a private ``TMPDIR``; the result is written
under a temporary name in ``out_dir`` and renamed, so readers never see half an archive.

:class:`TorchServeArchive` is the publish-side packager
(:class:`services.common.publishing.Packager`): publish builds the archive into the staged
version folder and records it in the manifest as the ``torchserve_archive`` artifact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from services.common.publishing import PackagerBase, artifact
from services.common.repository import MANIFEST_NAME, Artifact, Manifest, version_dir

logger = logging.getLogger(__name__)

HANDLER_PATH = Path(__file__).with_name("handler.py")
COMMON_DIR = Path(__file__).resolve().parent.parent / "common"
SERVICES_INIT = COMMON_DIR.parent / "__init__.py"
ARCHIVE_TIMEOUT_S = 300
#: The manifest's name for a version's archive.
ARCHIVE_ARTIFACT = "torchserve_archive"


class ArchiveError(RuntimeError):
    """The archive could not be built (missing or mismatching model file, archiver failure)."""


def archive_name(model: str) -> str:
    return f"{model}.mar"


def archive_path(repo: Path, model: str, version: int) -> Path:
    """Where a published version keeps its archive: ``<repo>/<model>/<version>/<model>.mar``."""
    return version_dir(repo, model, version) / archive_name(model)


def _copy_verified(src: Path, dst: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with src.open("rb") as reader, dst.open("wb") as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            writer.write(chunk)
    if digest.hexdigest() != sha256:
        raise ArchiveError(
            f"{src}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
            f"{sha256[:12]}..."
        )


def _stage(staging: Path, repo: Path, manifest: Manifest) -> Path:
    """Lay out model.pt and the extra files; return the model file's staged path."""
    artifact = manifest.artifacts.get("torchscript")
    if artifact is None:
        raise ArchiveError(f"{manifest.model} v{manifest.version} has no torchscript artifact")
    source = repo / artifact.path
    if not source.is_file():
        raise ArchiveError(f"TorchScript file missing: {source}")
    model_file = staging / "model.pt"
    _copy_verified(source, model_file, artifact.sha256)

    extra = staging / "extra"
    common = extra / "services" / "common"
    common.mkdir(parents=True)
    shutil.copy2(SERVICES_INIT, extra / "services" / "__init__.py")
    for source_file in sorted(COMMON_DIR.glob("*.py")):
        shutil.copy2(source_file, common / source_file.name)
    (extra / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    return model_file


def build_archive(repo: Path, manifest: Manifest, out_dir: Path) -> Path:
    """Write ``out_dir/<model>.mar`` (archive version = manifest.version) and return its path.

    model.pt is read from the manifest's artifact path under ``repo`` (publish passes its
    staging folder, laid out like the repository) and must match the manifest's sha256.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / archive_name(manifest.model)
    with tempfile.TemporaryDirectory(prefix=f".{manifest.model}-mar-", dir=out_dir) as tmp:
        staging = Path(tmp)
        model_file = _stage(staging, repo, manifest)
        export_dir = staging / "export"
        archiver_tmp = staging / "archiver-tmp"
        export_dir.mkdir()
        archiver_tmp.mkdir()
        # The archiver splits --extra-files on commas.
        if "," in str(staging):
            raise ArchiveError(f"output folder path must not contain a comma: {out_dir}")
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            manifest.model,
            "--version",
            str(manifest.version),
            "--serialized-file",
            str(model_file),
            "--handler",
            str(HANDLER_PATH),
            "--extra-files",
            str(staging / "extra"),
            "--export-path",
            str(export_dir),
            "--archive-format",
            "default",
        ]
        env = {**os.environ, "TMPDIR": str(archiver_tmp), "TEMP": str(archiver_tmp)}
        try:
            result = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                timeout=ARCHIVE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ArchiveError(f"torch-model-archiver ran past {ARCHIVE_TIMEOUT_S} s") from exc
        built = export_dir / archive_name(manifest.model)
        if result.returncode != 0 or not built.is_file():
            raise ArchiveError(
                f"torch-model-archiver failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        partial = out_dir / f".{archive_name(manifest.model)}.{os.getpid()}.tmp"
        shutil.move(str(built), partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(target)
    logger.info("built %s (%s v%s)", target, manifest.model, manifest.version)
    return target


class TorchServeArchive(PackagerBase):
    """Publish's packager: ``<model>.mar`` in the version folder, recorded in the manifest."""

    name = "torchserve"

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        mar = build_archive(staging, manifest, version_dir)
        return {ARCHIVE_ARTIFACT: artifact(staging, mar)}
