"""Reading the versioned model repository that ``python -m training publish`` writes.

Layout (Triton's, see README "Model repository")::

    <repo>/<model>/config.pbtxt              onnxruntime_onnx
    <repo>/<model>/labels.txt
    <repo>/<model>/<version>/model.onnx
    <repo>/<model>/<version>/manifest.json   the commit point: a version exists once this does
    <repo>/<model>_torchscript/config.pbtxt  pytorch_libtorch
    <repo>/<model>_torchscript/<version>/model.pt
    <repo>/<model>_int8/config.pbtxt         onnxruntime_onnx, int8 (published with --int8)
    <repo>/<model>_int8/<version>/model.onnx

The manifest lists every artifact with its sha256 (paths relative to the repository root).
Every engine verifies a version before serving it: the predictor through :func:`load_version`,
the TorchServe handler and Triton's twins through :func:`services.common.runtime.verify_file`
on the one file they run (the check itself is written once, in the runtime).

Which version an engine starts on is chosen here too, once for all of them:
:func:`newest_valid` walks the published versions newest first and keeps the first that loads,
recording every newer one it refused (:class:`RefusedVersion`, with the reason). So a version
whose bytes went bad after publishing is an error line and a refused entry, not an outage:
the engines start on the version before it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import IntegrityError as IntegrityError
from services.common.errors import RepositoryError as RepositoryError
from services.common.imaging import InputSpec
from services.common.runtime import sha256_file as sha256_file
from services.common.runtime import verify_file
from services.common.serving import ServingConfig

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
TORCHSCRIPT_NAME = "model.pt"
TORCHSCRIPT_SUFFIX = "_torchscript"
INT8_SUFFIX = "_int8"
#: The manifest's artifact keys of the model files.
ONNX_ARTIFACT = "onnx"
TORCHSCRIPT_ARTIFACT = "torchscript"
INT8_ARTIFACT = "onnx_int8"
MANIFEST_SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Artifact(BaseModel):
    """One file of a version, relative to the repository root."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Int8Record(BaseModel):
    """How the version's int8 model did at its accuracy gate (``publish --int8``)."""

    accuracy_fp32: float = Field(ge=0.0, le=1.0)
    accuracy_int8: float = Field(ge=0.0, le=1.0)
    top1_agreement: float = Field(ge=0.0, le=1.0)
    margin_pp: float = Field(ge=0.0)
    min_agreement: float = Field(ge=0.0, le=1.0)
    held_out_images: int = Field(ge=1)
    calibration_images: int = Field(ge=1)
    calibration_seed: int


class Manifest(BaseModel):
    """Everything needed to serve and audit one published version."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = MANIFEST_SCHEMA_VERSION
    model: str
    version: int = Field(ge=1)
    created_at: str
    torch_version: str
    arch: str
    dataset: dict[str, Any]
    metrics: dict[str, float]
    input: dict[str, Any]
    output: dict[str, Any]
    labels: list[str] = Field(min_length=1)
    artifacts: dict[str, Artifact]
    #: Older manifests carry no block: they are served with the defaults.
    serving: ServingConfig = Field(default_factory=ServingConfig)
    #: Present when the version was published with an int8 model (artifact ``onnx_int8``).
    int8: Int8Record | None = None
    #: The version's folders outside its manifest's, relative to the repository root
    #: (``classifier_torchscript/3``, ``preprocess/3``, ...): what pruning removes with it.
    #: Older manifests carry none (pruning then removes the folders it knows by name).
    folders: list[str] = Field(default_factory=list)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.input)


class ModelVersion(BaseModel):
    """A verified version: its manifest and absolute artifact paths."""

    manifest: Manifest
    onnx_path: Path
    torchscript_path: Path
    #: None when the version has no int8 model.
    onnx_int8_path: Path | None = None

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def version_dir(repo: Path, model: str, version: int) -> Path:
    return repo / model / str(version)


def list_versions(repo: Path, model: str) -> list[int]:
    """Published versions (numeric folders holding a manifest), oldest first."""
    model_dir = repo / model
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.name.isdigit() and (child / MANIFEST_NAME).is_file()
    )


def read_manifest(repo: Path, model: str, version: int) -> Manifest:
    path = version_dir(repo, model, version) / MANIFEST_NAME
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RepositoryError(f"{model} version {version} has no manifest at {path}") from None
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"manifest {path} is unreadable: {exc}") from None


def verify_artifacts(repo: Path, manifest: Manifest) -> None:
    """Raise :class:`IntegrityError` unless every artifact exists with its recorded sha256."""
    for artifact in manifest.artifacts.values():
        verify_file(repo / artifact.path, artifact.sha256, artifact.path)


def newest_version(repo: Path, model: str) -> int:
    """The newest published version of ``model`` (not verified: :func:`load_version` does)."""
    versions = list_versions(repo, model)
    if not versions:
        raise RepositoryError(
            f"no published version of {model!r} in {repo} "
            "(run `make train-and-publish` or `python -m training train-and-publish`)"
        )
    return versions[-1]


def load_version(repo: Path, model: str, version: int | None = None) -> ModelVersion:
    """Verified version ``version``, or the newest published one when ``version`` is None."""
    if version is None:
        version = newest_version(repo, model)
    manifest = read_manifest(repo, model, version)
    if manifest.model != model or manifest.version != version:
        raise RepositoryError(
            f"manifest in {version_dir(repo, model, version)} describes "
            f"{manifest.model} v{manifest.version}"
        )
    verify_artifacts(repo, manifest)
    int8 = manifest.artifacts.get(INT8_ARTIFACT)
    return ModelVersion(
        manifest=manifest,
        onnx_path=repo / manifest.artifacts[ONNX_ARTIFACT].path,
        torchscript_path=repo / manifest.artifacts[TORCHSCRIPT_ARTIFACT].path,
        onnx_int8_path=repo / int8.path if int8 else None,
    )


# --- choosing the version to serve --------------------------------------------------------------


class NoValidVersion(RepositoryError):
    """Every published version was refused (or none is published): nothing can be served."""

    def __init__(self, message: str, refused: list[RefusedVersion]) -> None:
        super().__init__(message)
        self.refused = refused


def relative_to_repository(message: str, repo: Path) -> str:
    """``message`` with every path under ``repo`` written relative to it (``/srv/repo/classifier/3
    /manifest.json`` -> ``classifier/3/manifest.json``): what a refusal reason may show to
    whoever reads ``/readyz``, which names artifacts, never the server's file system."""
    roots = {str(repo), str(repo.absolute()), str(repo.resolve())}
    for root in sorted(roots, key=len, reverse=True):  # the longest first: one may prefix another
        message = message.replace(root.rstrip("/") + "/", "")
    return message


@dataclass(frozen=True)
class RefusedVersion:
    """A published version an engine would not serve, and why (the loader's error message,
    paths relative to the repository: :func:`relative_to_repository`)."""

    version: int
    reason: str

    def as_dict(self) -> dict[str, int | str]:
        """``{"version": N, "reason": "..."}``: how ``/readyz`` and the launchers report it."""
        return {"version": self.version, "reason": self.reason}


@dataclass(frozen=True)
class Chosen(Generic[T]):
    """What :func:`newest_valid` picked: the loader's result for ``version``, and the newer
    versions it refused on the way, newest first."""

    version: int
    loaded: T
    refused: list[RefusedVersion]


def newest_valid(
    repo: Path,
    model: str,
    load: Callable[[int], T],
    refusable: tuple[type[Exception], ...] = (RepositoryError,),
) -> Chosen[T]:
    """Try ``load`` on each published version of ``model``, newest first; return the first
    that loads, with the newer ones it refused.

    An exception of a ``refusable`` type refuses that version (one error line in the log) and
    the walk goes on to the one before; anything else propagates. Raises
    :class:`NoValidVersion` when no version is published or every one was refused (the
    message names each refusal)."""
    versions = list_versions(repo, model)
    if not versions:
        raise NoValidVersion(
            f"no published version of {model!r} in {repo} "
            "(run `make train-and-publish` or `python -m training train-and-publish`)",
            [],
        )
    refused: list[RefusedVersion] = []
    for version in reversed(versions):
        try:
            loaded = load(version)
        except refusable as exc:
            refused.append(RefusedVersion(version, relative_to_repository(str(exc), repo)))
            logger.error("refused %s v%d: %s", model, version, exc)
            continue
        if refused:
            logger.warning(
                "serving %s v%d: newer %s refused",
                model,
                version,
                ", ".join(f"v{r.version}" for r in refused),
            )
        return Chosen(version, loaded, refused)
    reasons = "; ".join(f"v{r.version}: {r.reason}" for r in refused)
    raise NoValidVersion(f"no valid version of {model!r} in {repo}: {reasons}", refused)


def newest_valid_version(repo: Path, model: str) -> Chosen[ModelVersion]:
    """The newest version of ``model`` whose manifest reads and whose every artifact matches
    its sha256 (:func:`load_version`), with the newer ones refused: what the TorchServe and
    Triton launchers start on."""
    return newest_valid(repo, model, lambda version: load_version(repo, model, version))
