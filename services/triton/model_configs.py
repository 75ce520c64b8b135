"""Triton model configs for a published model, all generated from its manifest.

One description, the version's :class:`~services.common.repository.Manifest`, gives every
``config.pbtxt``; batching, instances and the pixel limit come from its ``serving`` block
(:class:`~services.common.serving.ServingConfig`, written by publish):

=========================  =================  ===============================================
model                      platform/backend   what it is
=========================  =================  ===============================================
``<model>``                onnxruntime_onnx   the classifier (native; containers)
``<model>_torchscript``    pytorch_libtorch   the same network as TorchScript (native)
``preprocess``             python             encoded image bytes -> normalised FP32 CHW
``<model>_ensemble``       ensemble           IMAGE -> preprocess -> <model> -> LOGITS
``<model>_int8``           onnxruntime_onnx   the int8 model (versions published with --int8)
``<model>_int8_ensemble``  ensemble           IMAGE -> preprocess -> <model>_int8 -> LOGITS
=========================  =================  ===============================================

The int8 pair exists once a version with an int8 model was published; a later version without
one leaves it serving the newest version that had one.

The local launcher has only Triton's python backend, so it serves *twins*: python-backend
configs with the native models' names, inputs and outputs, run by one generic ``model.py``
(:mod:`services.triton.models.twin`) on the same version files; only there do the launcher's
optional ``TRITON_*`` overrides (:meth:`~services.triton.settings.TritonSettings.serving_for`)
and its ``preprocess`` settings apply. Text generation is pure (the ``*_config`` functions);
:func:`write_triton_models` and :func:`write_local_repository` put it on disk atomically
(:mod:`services.common.publishing`: temporary file or folder, then rename).

:class:`TritonConfigs` is the publish-side packager
(:class:`services.common.publishing.Packager`): it stages each version's ``preprocess`` and
ensemble folders with the version, writes these configs into the repository before each
commit and removes a pruned version's ``preprocess`` and ensemble folders.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.common.publishing import (
    FileSource,
    PackagerBase,
    remove_dir,
    write_text_atomic,
    write_version_dir,
)
from services.common.repository import (
    INT8_ARTIFACT,
    INT8_SUFFIX,
    MANIFEST_NAME,
    TORCHSCRIPT_SUFFIX,
    Artifact,
    Manifest,
    RefusedVersion,
    load_version,
    newest_valid_version,
    version_dir,
)
from services.common.runtime import portable_files
from services.common.serving import ServingConfig
from services.triton.protocol import (
    ENSEMBLE_SUFFIX,
    IMAGE_INPUT,
    LOGITS_OUTPUT,
    PREPROCESS_MODEL,
    PREPROCESSED_OUTPUT,
    REFUSED_VERSIONS_PARAMETER,
)
from services.triton.settings import TritonSettings

#: pytorch_libtorch binds tensors by position when names follow ``<name>__<index>``; names taken
#: from ``forward()`` arguments are not stable across tracing, so the convention is the safe one.
TORCHSCRIPT_INPUT = "INPUT__0"
TORCHSCRIPT_OUTPUT = "OUTPUT__0"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
INPUT_SPEC_FILE = "input_spec.json"
#: The python models' sources, copied as ``model.py`` into each version folder.
MODELS_DIR = Path(__file__).resolve().parent / "models"
PREPROCESS_SOURCE = MODELS_DIR / "preprocess.py"
TWIN_SOURCE = MODELS_DIR / "twin.py"

#: ``preprocess`` in the published configs (the local launcher takes TRITON_PREPROCESS_*):
#: decoding is the server's CPU work, not the model's, so these are not in the serving block.
DEFAULT_PREPROCESS_INSTANCE_COUNT = 1
DEFAULT_PREPROCESS_QUEUE_DELAY_US = 100

Runtime = Literal["onnxruntime", "torchscript", "onnxruntime_int8"]
_TRITON_DTYPES = {
    "FP16", "FP32", "FP64", "BF16", "INT8", "INT16", "INT32", "INT64",
    "UINT8", "UINT16", "UINT32", "UINT64", "BOOL", "STRING",
}  # fmt: skip


@dataclass(frozen=True)
class PreprocessOptions:
    """How many ``preprocess`` instances decode, and how long its queue waits to batch."""

    instance_count: int = DEFAULT_PREPROCESS_INSTANCE_COUNT
    queue_delay_us: int = DEFAULT_PREPROCESS_QUEUE_DELAY_US


@dataclass(frozen=True)
class Tensor:
    """One model input or output as config.pbtxt describes it (batch dimension excluded)."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def data_type(self) -> str:
        return f"TYPE_{self.dtype}"


def _dtype(value: Any) -> str:
    dtype = str(value or "FP32").upper().removeprefix("TYPE_")
    aliases = {"FLOAT32": "FP32", "FLOAT": "FP32", "BYTES": "STRING"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"{value!r} is not a Triton data type")
    return dtype


def input_tensor(manifest: Manifest) -> Tensor:
    """The classifier's input, from the manifest's input spec (e.g. ``input`` FP32 [3,32,32])."""
    spec = manifest.input_spec
    return Tensor(spec.name, _dtype(spec.dtype), spec.shape)


def output_tensor(manifest: Manifest) -> Tensor:
    """The classifier's output (e.g. ``logits`` FP32 [10]); dims default to one per label."""
    output = manifest.output
    dims = output.get("shape") or output.get("dims") or [len(manifest.labels)]
    dims = [int(d) for d in dims]
    if dims and dims[0] == -1 and len(dims) > 1:
        dims = dims[1:]  # a batch axis written into the manifest is not part of Triton's dims
    return Tensor(
        str(output.get("name", "logits")),
        _dtype(output.get("dtype") or output.get("datatype")),
        tuple(dims),
    )


# --- text rendering (protobuf text format, parsed back by the tests) -------------------------


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string literal


def _tensor_block(tensors: Sequence[Tensor], labels: bool = False, nchw: bool = False) -> str:
    items = []
    for tensor in tensors:
        dims = ", ".join(str(d) for d in tensor.dims)
        lines = [f"    name: {_q(tensor.name)}", f"    data_type: {tensor.data_type}"]
        if nchw:
            lines.append("    format: FORMAT_NCHW")
        lines.append(f"    dims: [ {dims} ]")
        if labels:
            lines.append(f"    label_filename: {_q(LABELS_FILE)}")
        items.append("  {\n" + "\n".join(lines) + "\n  }")
    return "[\n" + ",\n".join(items) + "\n]\n"


def triton_batching(serving: ServingConfig) -> tuple[int, tuple[int, ...]]:
    """Triton's ``max_batch_size`` and preferred batch sizes for a serving config.

    Triton's ``max_batch_size`` caps the batches its dynamic batcher forms *and* the images one
    request may carry (a request is a batch it never splits), where the serving config keeps
    the two apart, as the predictor does: it merges single images up to ``max_batch_size`` and
    runs a request of up to ``max_images_per_request`` images as one batch. So Triton gets the
    larger of the two, and when that is the request limit and no preferred size was given, a
    preferred size of ``max_batch_size``: the batcher forms the largest preferred batch it can,
    so merged batches stay at ``max_batch_size`` while a larger request is still accepted.
    """
    largest = max(serving.max_batch_size, serving.max_images_per_request)
    preferred = tuple(serving.preferred_batch_sizes)
    if not preferred and largest > serving.max_batch_size:
        preferred = (serving.max_batch_size,)
    return largest, preferred


def _dynamic_batching(preferred: Iterable[int], delay_us: int) -> str:
    sizes = ", ".join(str(size) for size in sorted(set(preferred)))
    preferred_line = f"  preferred_batch_size: [ {sizes} ]\n" if sizes else ""
    return f"dynamic_batching {{\n{preferred_line}  max_queue_delay_microseconds: {delay_us}\n}}\n"


def _instance_group(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(
        f"parameters {{\n  key: {_q(key)}\n  value: {{ string_value: {_q(value)} }}\n}}\n"
        for key, value in values.items()
    )


def _version_policy(versions: int) -> str:
    return f"version_policy: {{ latest: {{ num_versions: {versions} }} }}\n"


def with_versions(config: str, versions: int) -> str:
    """``config`` serving its ``versions`` newest version folders instead of the newest only
    (the local launcher's reload keeps the old version beside the new one for a moment)."""
    return config.replace(_version_policy(1), _version_policy(versions), 1)


def _header(name: str, engine: str, max_batch_size: int) -> str:
    # Only the newest version is served; the gateway reports the version Triton answers with.
    return (
        "# Generated by services.triton.model_configs from the published manifest: do not edit.\n"
        f"name: {_q(name)}\n{engine}\nmax_batch_size: {max_batch_size}\n" + _version_policy(1)
    )


_NATIVE_PLATFORMS: dict[Runtime, str] = {
    "onnxruntime": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
    "onnxruntime_int8": "onnxruntime_onnx",
}
#: The manifest's artifact each runtime's model folder holds, and the folder's name suffix.
_ARTIFACTS: dict[Runtime, tuple[str, str]] = {
    "onnxruntime": ("onnx", ""),
    "torchscript": ("torchscript", TORCHSCRIPT_SUFFIX),
    "onnxruntime_int8": (INT8_ARTIFACT, INT8_SUFFIX),
}


def runtimes(manifest: Manifest) -> list[Runtime]:
    """The classifier models a version has: ONNX and TorchScript, and int8 when published."""
    found: list[Runtime] = ["onnxruntime", "torchscript"]
    if INT8_ARTIFACT in manifest.artifacts:
        found.append("onnxruntime_int8")
    return found


def model_name(manifest: Manifest, runtime: Runtime) -> str:
    """The Triton model name of ``runtime``'s classifier (``classifier_int8``, ...)."""
    return manifest.model + _ARTIFACTS[runtime][1]


def _classifier_config(
    manifest: Manifest, serving: ServingConfig | None, runtime: Runtime, python_twin: bool
) -> str:
    serving = serving or manifest.serving
    max_batch_size, preferred = triton_batching(serving)
    model_in, model_out = input_tensor(manifest), output_tensor(manifest)
    name = model_name(manifest, runtime)
    if runtime == "torchscript":
        model_in = Tensor(TORCHSCRIPT_INPUT, model_in.dtype, model_in.dims)
        model_out = Tensor(TORCHSCRIPT_OUTPUT, model_out.dtype, model_out.dims)
    if python_twin:
        engine, kind = 'backend: "python"', "KIND_CPU"
    else:
        # KIND_AUTO: on the GPU where the container has one, on the CPU otherwise.
        engine, kind = f"platform: {_q(_NATIVE_PLATFORMS[runtime])}", "KIND_AUTO"
    return (
        _header(name, engine, max_batch_size)
        + f"input {_tensor_block([model_in], nchw=True)}"
        + f"output {_tensor_block([model_out], labels=True)}"
        + _dynamic_batching(preferred, serving.max_batch_delay_us)
        + _instance_group(serving.instance_count, kind)
        + (_parameters({"runtime": runtime}) if python_twin else "")
    )


# ``serving`` defaults to the manifest's own block; the local launcher passes it with its
# overrides applied.


def onnx_config(manifest: Manifest, serving: ServingConfig | None = None) -> str:
    """Native ``<model>/config.pbtxt``: ONNX Runtime, dynamic batching, labels attached."""
    return _classifier_config(manifest, serving, "onnxruntime", python_twin=False)


def torchscript_config(manifest: Manifest, serving: ServingConfig | None = None) -> str:
    """Native ``<model>_torchscript/config.pbtxt`` (libtorch binds ``INPUT__0``/``OUTPUT__0``)."""
    return _classifier_config(manifest, serving, "torchscript", python_twin=False)


def twin_config(manifest: Manifest, runtime: Runtime, serving: ServingConfig | None = None) -> str:
    """A python-backend twin of a native model: same name, inputs, outputs and batching."""
    return _classifier_config(manifest, serving, runtime, python_twin=True)


def preprocess_config(
    manifest: Manifest,
    serving: ServingConfig | None = None,
    options: PreprocessOptions | None = None,
) -> str:
    """``preprocess``: python backend, IMAGE (encoded bytes) -> INPUT (normalised CHW).

    It batches like the classifier (the ensemble hands it the same requests) and refuses
    images over the serving block's ``max_pixels`` before decoding them."""
    serving = serving or manifest.serving
    options = options or PreprocessOptions()
    max_batch_size, preferred = triton_batching(serving)
    model_in = input_tensor(manifest)
    return (
        _header(PREPROCESS_MODEL, 'backend: "python"', max_batch_size)
        + f"input {_tensor_block([Tensor(IMAGE_INPUT, 'STRING', (1,))])}"
        + "output "
        + _tensor_block([Tensor(PREPROCESSED_OUTPUT, model_in.dtype, model_in.dims)])
        + _dynamic_batching(preferred, options.queue_delay_us)
        + _instance_group(options.instance_count, "KIND_CPU")
        + _parameters({"max_pixels": str(serving.max_pixels)})
    )


def int8_config(manifest: Manifest, serving: ServingConfig | None = None) -> str:
    """Native ``<model>_int8/config.pbtxt``: the int8 QDQ model on ONNX Runtime."""
    return _classifier_config(manifest, serving, "onnxruntime_int8", python_twin=False)


def ensemble_config(
    manifest: Manifest,
    serving: ServingConfig | None = None,
    runtime: Runtime = "onnxruntime",
    step_version: int = -1,
) -> str:
    """``<model>_ensemble``: IMAGE -> preprocess -> <model> -> LOGITS (labels attached); with
    ``runtime`` ``onnxruntime_int8``, ``<model>_int8_ensemble`` over the int8 model.

    Both steps use the newest loaded version (-1); publish writes preprocess and classifier
    versions with the same numbers, so the newest of each belong together. The local launcher
    pins them instead (``step_version``: the manifest's version), so that while its reload keeps
    two versions of each step loaded, the ensemble runs exactly the version it names.
    ``label_filename`` on LOGITS lets clients ask Triton's classification extension for
    ``score:index:label``.
    """
    serving = serving or manifest.serving
    model_in, model_out = input_tensor(manifest), output_tensor(manifest)
    steps = (
        "ensemble_scheduling {\n  step [\n"
        "    {\n"
        f"      model_name: {_q(PREPROCESS_MODEL)}\n      model_version: {step_version}\n"
        f"      input_map {{ key: {_q(IMAGE_INPUT)} value: {_q(IMAGE_INPUT)} }}\n"
        f'      output_map {{ key: {_q(PREPROCESSED_OUTPUT)} value: "preprocessed" }}\n'
        "    },\n"
        "    {\n"
        f"      model_name: {_q(model_name(manifest, runtime))}\n"
        f"      model_version: {step_version}\n"
        f'      input_map {{ key: {_q(model_in.name)} value: "preprocessed" }}\n'
        f"      output_map {{ key: {_q(model_out.name)} value: {_q(LOGITS_OUTPUT)} }}\n"
        "    }\n"
        "  ]\n}\n"
    )
    return (
        _header(
            model_name(manifest, runtime) + ENSEMBLE_SUFFIX,
            'platform: "ensemble"',
            triton_batching(serving)[0],
        )
        + f"input {_tensor_block([Tensor(IMAGE_INPUT, 'STRING', (1,))])}"
        + "output "
        + _tensor_block([Tensor(LOGITS_OUTPUT, model_out.dtype, model_out.dims)], labels=True)
        + steps
    )


# --- writing --------------------------------------------------------------------------------


def _labels_text(manifest: Manifest) -> str:
    return "".join(f"{label}\n" for label in manifest.labels)


def preprocess_files(manifest: Manifest) -> dict[str, FileSource]:
    """What ``preprocess/<version>/`` holds: the model, the shared decoder, the input spec."""
    spec = json.dumps(manifest.input_spec.to_dict(), indent=2, sort_keys=True) + "\n"
    return {"model.py": PREPROCESS_SOURCE, **portable_files(), INPUT_SPEC_FILE: spec}


def _ensemble_runtimes(manifest: Manifest) -> list[Runtime]:
    # The TorchScript model is served alone, without an ensemble.
    return [runtime for runtime in runtimes(manifest) if runtime != "torchscript"]


def pipeline_version_files(manifest: Manifest) -> dict[str, dict[str, FileSource]]:
    """Model folder -> what its ``<version>/`` holds, for ``preprocess`` and the ensembles."""
    files: dict[str, dict[str, FileSource]] = {PREPROCESS_MODEL: preprocess_files(manifest)}
    for runtime in _ensemble_runtimes(manifest):  # an ensemble's version folder is empty
        files[model_name(manifest, runtime) + ENSEMBLE_SUFFIX] = {}
    return files


def write_pipeline_configs(
    repo: Path,
    manifest: Manifest,
    serving: ServingConfig | None = None,
    options: PreprocessOptions | None = None,
    step_version: int = -1,
    versions: int = 1,
) -> None:
    """``preprocess`` and the ensembles: configs and labels (no version folder); the ensembles'
    steps pinned to ``step_version`` (-1: the newest loaded), each serving its ``versions``
    newest version folders."""
    write_text_atomic(
        repo / PREPROCESS_MODEL / CONFIG_FILE,
        with_versions(preprocess_config(manifest, serving, options), versions),
    )
    for runtime in _ensemble_runtimes(manifest):
        ensemble_dir = repo / (model_name(manifest, runtime) + ENSEMBLE_SUFFIX)
        config = ensemble_config(manifest, serving, runtime, step_version)
        write_text_atomic(ensemble_dir / CONFIG_FILE, with_versions(config, versions))
        write_text_atomic(ensemble_dir / LABELS_FILE, _labels_text(manifest))


def write_pipeline_versions(repo: Path, manifest: Manifest) -> None:
    """``preprocess/<version>/`` and each ensemble's ``<version>/`` under ``repo`` (the live
    repository, or publish's staging tree)."""
    for name, files in pipeline_version_files(manifest).items():
        write_version_dir(repo / name, manifest.version, files)


def write_pipeline(
    repo: Path,
    manifest: Manifest,
    serving: ServingConfig | None = None,
    options: PreprocessOptions | None = None,
    step_version: int = -1,
    versions: int = 1,
) -> None:
    """``preprocess`` and ``<model>_ensemble``: configs, labels and this version's folders."""
    write_pipeline_configs(repo, manifest, serving, options, step_version, versions)
    write_pipeline_versions(repo, manifest)


def write_triton_configs(repo: Path, manifest: Manifest) -> None:
    """Every Triton config and label file of a version being published (no version folder).

    The native configs and labels of ``<model>`` and ``<model>_torchscript``, then those of
    ``preprocess`` and ``<model>_ensemble``. It needs only the manifest (batching from its
    ``serving`` block), not the version's files, so publish writes it before the version's
    commit (:class:`TritonConfigs`). No environment variable is read: the configs are the
    model's.
    """
    labels = _labels_text(manifest)
    natives = {
        model_name(manifest, runtime): _classifier_config(manifest, None, runtime, False)
        for runtime in runtimes(manifest)
    }
    for name, config in natives.items():
        write_text_atomic(repo / name / CONFIG_FILE, config)
        write_text_atomic(repo / name / LABELS_FILE, labels)
    write_pipeline_configs(repo, manifest)


def write_triton_models(repo: Path, manifest: Manifest) -> None:
    """Every Triton file of a version, version folders of ``preprocess`` and the ensemble
    included, straight into ``repo`` (publish stages those folders instead: see
    :class:`TritonConfigs`)."""
    write_triton_configs(repo, manifest)
    write_pipeline_versions(repo, manifest)


def remove_versions(repo: Path, model: str, versions: Iterable[int]) -> None:
    """Delete the ``preprocess`` and ``<model>_ensemble`` folders of pruned versions.

    Publish's pruning calls this (:class:`TritonConfigs`) beside removing the folders the
    manifest lists (older manifests list none); each is renamed out of Triton's view at once,
    then removed.
    """
    ensembles = (model + ENSEMBLE_SUFFIX, model + INT8_SUFFIX + ENSEMBLE_SUFFIX)
    for version in versions:
        for model_dir in (repo / PREPROCESS_MODEL, *(repo / name for name in ensembles)):
            remove_dir(model_dir / str(version))


class TritonConfigs(PackagerBase):
    """The publish-side packager. ``preprocess/<v>/`` and ``<model>_ensemble/<v>/`` are staged
    with the version (renamed in with it, before its manifest's folder: the commit); the configs
    and labels, which name no version, are written before the commit."""

    name = "triton"

    def package(self, staging: Path, manifest: Manifest, version_dir: Path) -> dict[str, Artifact]:
        write_pipeline_versions(staging, manifest)
        return {}

    def write_shared(self, repo: Path, manifest: Manifest) -> None:
        write_triton_configs(repo, manifest)

    def prune(self, repo: Path, model: str, versions: Sequence[int]) -> None:
        remove_versions(repo, model, versions)


def write_local_repository(
    target: Path,
    source_repo: Path,
    model: str,
    settings: TritonSettings,
    version: int | None = None,
    versions: int = 1,
    refused: Sequence[RefusedVersion] = (),
) -> int:
    """Generate the python-backend repository the local tritonserver serves; return its version.

    The newest *valid* published version of ``model`` in ``source_repo`` is served
    (:func:`~services.common.repository.newest_valid_version`: sha256 of every artifact; newer
    versions that fail are refused, and named with their reasons in the ONNX twin's
    ``refused_versions`` parameter, JSON, which Triton's model config endpoint shows) and keeps
    its number here; :class:`~services.common.repository.NoValidVersion` when none is valid.
    Its serving block, with the overrides of ``settings`` applied
    (:meth:`~services.triton.settings.TritonSettings.serving_for`; ValueError when they do not
    fit the model), sets the batching; ``settings`` also gives preprocess's instances and delay:
    a python twin per native model whose version folder holds the generic ``model.py`` and
    links to the published ``model.onnx`` / ``model.pt`` and ``manifest.json``, plus
    ``preprocess`` and the ensemble. ``target`` is rebuilt from scratch, once the version is
    verified. ``version`` (the one a reload leaves in place) replaces the newest; ``refused``
    then names the newer versions that reload refused (the walk names its own).

    The ensembles' steps are pinned to the version (an answer names the version it ran, even
    while a reload keeps two loaded), and every config serves its ``versions`` newest version
    folders: 2 for the reload's step that adds a version beside the one serving (see
    :meth:`services.triton.launcher.LocalTriton.reload`).
    """
    if version is None:
        chosen = newest_valid_version(source_repo, model)
        manifest, refused = chosen.loaded.manifest, chosen.refused
    else:
        manifest = load_version(source_repo, model, version).manifest
    refused_json = json.dumps([r.as_dict() for r in refused])
    serving = settings.serving_for(manifest.serving)
    options = PreprocessOptions(
        settings.preprocess_instance_count, settings.preprocess_queue_delay_microseconds
    )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    twins = [r for r in runtimes(manifest) if r != "torchscript" or settings.torchscript_twin]
    published_manifest = version_dir(source_repo, model, manifest.version) / MANIFEST_NAME
    for runtime in twins:
        artifact_key = _ARTIFACTS[runtime][0]
        config = twin_config(manifest, runtime, serving)
        if runtime == "onnxruntime":  # what the gateway asks Triton about
            config += _parameters({REFUSED_VERSIONS_PARAMETER: refused_json})
        model_dir = target / model_name(manifest, runtime)
        write_text_atomic(model_dir / CONFIG_FILE, with_versions(config, versions))
        write_text_atomic(model_dir / LABELS_FILE, _labels_text(manifest))
        twin_files: dict[str, FileSource] = {"model.py": TWIN_SOURCE, **portable_files()}
        folder = write_version_dir(model_dir, manifest.version, twin_files)
        artifact = source_repo / manifest.artifacts[artifact_key].path
        (folder / artifact.name).symlink_to(artifact.resolve())
        (folder / MANIFEST_NAME).symlink_to(published_manifest.resolve())
    write_pipeline(target, manifest, serving, options, manifest.version, versions)
    return manifest.version
