"""Generated Triton configs: valid ModelConfig protobufs, true to the ONNX file and each other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from services.common import imaging
from services.common.serving import ServingConfig
from services.triton import model_configs as mc
from services.triton.settings import TritonSettings
from tests.conftest import PublishedModel

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return parse(path.read_text())


def data_type(config_tensor: object) -> str:
    return model_config_pb2.DataType.Name(config_tensor.data_type)  # type: ignore[attr-defined]


def onnx_io(path: Path) -> tuple[list[tuple[str, str, list[int], bool]], ...]:
    """(name, Triton dtype, dims without batch, batch axis dynamic) of each ONNX input/output."""
    graph = onnx.load(str(path)).graph
    initializers = {init.name for init in graph.initializer}

    def describe(values: list[onnx.ValueInfoProto]) -> list[tuple[str, str, list[int], bool]]:
        described = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dims = tensor_type.shape.dim
            described.append(
                (
                    value.name,
                    ONNX_TO_TRITON[tensor_type.elem_type],
                    [d.dim_value for d in dims[1:]],
                    bool(dims[0].dim_param) or dims[0].dim_value == 0,
                )
            )
        return described

    return describe(list(graph.input)), describe(list(graph.output))


def test_native_onnx_config_matches_the_onnx_file(published_model: PublishedModel) -> None:
    repo, model = published_model.repo, published_model.model
    config = read_config(repo / model / "config.pbtxt")
    inputs, outputs = onnx_io(repo / model / str(published_model.version) / "model.onnx")
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    for config_tensors, onnx_tensors in ((config.input, inputs), (config.output, outputs)):
        assert [(t.name, data_type(t), list(t.dims)) for t in config_tensors] == [
            (name, dtype, dims) for name, dtype, dims, _ in onnx_tensors
        ]
        # max_batch_size > 0 means Triton prepends a batch axis: the file must have a free one.
        assert all(dynamic for *_, dynamic in onnx_tensors)
    assert config.output[0].label_filename == "labels.txt"
    serving = published_model.manifest.serving  # the session's model: the serving defaults
    largest, preferred = mc.triton_batching(serving)
    assert config.max_batch_size == largest
    assert list(config.dynamic_batching.preferred_batch_size) == list(preferred)
    assert config.dynamic_batching.max_queue_delay_microseconds == serving.max_batch_delay_us > 0
    assert [g.count for g in config.instance_group] == [serving.instance_count]
    assert (repo / model / "labels.txt").read_text().splitlines() == published_model.manifest.labels


def test_native_torchscript_config_has_the_onnx_dims_under_libtorch_names(
    published_model: PublishedModel,
) -> None:
    repo, model = published_model.repo, published_model.model
    config = read_config(repo / f"{model}_torchscript" / "config.pbtxt")
    inputs, outputs = onnx_io(repo / model / str(published_model.version) / "model.onnx")
    assert config.platform == "pytorch_libtorch"
    assert [(t.name, data_type(t), list(t.dims)) for t in config.input] == [
        ("INPUT__0", inputs[0][1], inputs[0][2])
    ]
    assert [(t.name, data_type(t), list(t.dims)) for t in config.output] == [
        ("OUTPUT__0", outputs[0][1], outputs[0][2])
    ]
    assert (repo / f"{model}_torchscript" / str(published_model.version) / "model.pt").is_file()


def test_preprocess_and_ensemble_are_wired_to_the_classifier(
    published_model: PublishedModel,
) -> None:
    repo, model, version = published_model.repo, published_model.model, published_model.version
    classifier = read_config(repo / model / "config.pbtxt")
    preprocess = read_config(repo / "preprocess" / "config.pbtxt")
    ensemble = read_config(repo / f"{model}_ensemble" / "config.pbtxt")
    assert preprocess.backend == "python"
    assert [(t.name, data_type(t), list(t.dims)) for t in preprocess.input] == [
        ("IMAGE", "TYPE_STRING", [1])
    ]
    assert [(data_type(t), list(t.dims)) for t in preprocess.output] == [
        (data_type(classifier.input[0]), list(classifier.input[0].dims))
    ]
    assert ensemble.platform == "ensemble"
    assert ensemble.max_batch_size <= min(preprocess.max_batch_size, classifier.max_batch_size)
    configs = {"preprocess": preprocess, model: classifier}
    produced = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        step_config = configs[step.model_name]
        assert set(step.input_map) == {t.name for t in step_config.input}
        assert set(step.input_map.values()) <= produced
        assert set(step.output_map) <= {t.name for t in step_config.output}
        produced |= set(step.output_map.values())
    assert [t.name for t in ensemble.output] == ["LOGITS"]
    assert list(ensemble.output[0].dims) == list(classifier.output[0].dims)
    assert ensemble.output[0].label_filename == "labels.txt"
    assert "LOGITS" in produced
    # Same version numbers as the classifier; the decoder carried is the shared one, verbatim.
    assert (repo / f"{model}_ensemble" / str(version)).is_dir()
    version_dir = repo / "preprocess" / str(version)
    assert (version_dir / "services/common/imaging.py").read_bytes() == Path(
        imaging.__file__
    ).read_bytes()
    assert (version_dir / "model.py").read_bytes() == mc.PREPROCESS_SOURCE.read_bytes()
    spec = json.loads((version_dir / "input_spec.json").read_text())
    assert imaging.InputSpec.from_dict(spec) == published_model.manifest.input_spec


def test_python_twins_keep_the_native_interface(published_model: PublishedModel) -> None:
    serving = ServingConfig(instance_count=2, preferred_batch_sizes=(4, 8))
    manifest = published_model.manifest
    for runtime, native in (
        ("onnxruntime", mc.onnx_config),
        ("torchscript", mc.torchscript_config),
    ):
        twin = parse(mc.twin_config(manifest, runtime, serving))  # type: ignore[arg-type]
        original = parse(native(manifest, serving))
        assert twin.backend == "python" and not twin.platform
        assert twin.name == original.name
        assert twin.input == original.input and twin.output == original.output
        assert twin.dynamic_batching == original.dynamic_batching
        assert twin.parameters["runtime"].string_value == runtime
        assert [(g.count, g.kind) for g in twin.instance_group] == [
            (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        ]


def test_batching_and_instances_come_from_the_serving_config(
    published_model: PublishedModel,
) -> None:
    serving = ServingConfig(
        max_batch_size=32,
        preferred_batch_sizes=(16, 4),
        max_batch_delay_ms=0.75,
        instance_count=3,
        max_images_per_request=32,
        max_pixels=1000,
    )
    manifest = published_model.manifest.model_copy(update={"serving": serving})
    for config in (mc.onnx_config(manifest), mc.torchscript_config(manifest)):
        parsed = parse(config)
        assert parsed.max_batch_size == 32
        assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 16]
        assert parsed.dynamic_batching.max_queue_delay_microseconds == 750
        assert [g.count for g in parsed.instance_group] == [3]
    preprocess = parse(mc.preprocess_config(manifest))
    assert preprocess.max_batch_size == 32
    assert list(preprocess.dynamic_batching.preferred_batch_size) == [4, 16]
    assert preprocess.dynamic_batching.max_queue_delay_microseconds == 100
    assert [g.count for g in preprocess.instance_group] == [1]
    assert preprocess.parameters["max_pixels"].string_value == "1000"
    options = mc.PreprocessOptions(instance_count=2, queue_delay_us=50)
    local = parse(mc.preprocess_config(manifest, options=options))
    assert [g.count for g in local.instance_group] == [2]
    assert local.dynamic_batching.max_queue_delay_microseconds == 50
    assert parse(mc.ensemble_config(manifest)).max_batch_size == 32
    # No preferred sizes: the dynamic batcher forms the largest batch it can.
    plain = ServingConfig(max_batch_size=16, max_images_per_request=16)
    parsed = parse(mc.onnx_config(manifest.model_copy(update={"serving": plain})))
    assert parsed.max_batch_size == 16
    assert parsed.HasField("dynamic_batching") and not parsed.dynamic_batching.preferred_batch_size


def test_triton_accepts_the_request_limit_and_merges_up_to_the_batch_size() -> None:
    # A request is one batch to Triton: max_batch_size must hold max_images_per_request, and a
    # preferred size keeps merged batches at the serving config's max_batch_size.
    assert mc.triton_batching(ServingConfig(max_batch_size=32, max_images_per_request=64)) == (
        64,
        (32,),
    )
    assert mc.triton_batching(ServingConfig(max_batch_size=16, max_images_per_request=8)) == (
        16,
        (),
    )
    given = ServingConfig(max_batch_size=16, preferred_batch_sizes=(4, 8))
    assert mc.triton_batching(given) == (64, (4, 8))  # merges stop at 8 already


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValidationError, match="preferred_batch_sizes"):
        TritonSettings(max_batch_size=8, preferred_batch_sizes=[4, 16])
    with pytest.raises(ValidationError, match="must differ"):
        TritonSettings(http_port=9000, grpc_port=9000)


def test_overrides_apply_over_the_model_serving_config() -> None:
    model = ServingConfig(max_batch_size=32, preferred_batch_sizes=(8, 16), instance_count=1)
    assert TritonSettings().serving_for(model) == model
    assert TritonSettings().overrides(model) == []
    smaller = TritonSettings(max_batch_size=8, instance_count=2, max_queue_delay_microseconds=250)
    served = smaller.serving_for(model)
    # The model's preferred sizes that no longer fit are dropped.
    assert (served.max_batch_size, served.preferred_batch_sizes) == (8, (8,))
    assert (served.instance_count, served.max_batch_delay_us) == (2, 250)
    assert TritonSettings(max_batch_size=4).serving_for(model).preferred_batch_sizes == ()
    assert [o.describe() for o in smaller.overrides(model)] == [
        "TRITON_MAX_BATCH_SIZE=8 overrides the model's max_batch_size (32)",
        "TRITON_MAX_QUEUE_DELAY_MICROSECONDS=250 overrides the model's max_batch_delay_us (1000)",
        "TRITON_INSTANCE_COUNT=2 overrides the model's instance_count (1)",
    ]
    with pytest.raises(ValueError, match="do not fit the serving config"):
        TritonSettings(preferred_batch_sizes=[64]).serving_for(model)


def test_writing_again_is_a_no_op_and_leaves_no_temporary_files(
    repo_copy: Path, published_model: PublishedModel
) -> None:
    manifest = published_model.manifest
    mc.write_triton_models(repo_copy, manifest)
    version_dir = repo_copy / "preprocess" / str(manifest.version)
    marker = version_dir.stat().st_ino
    before = {p: p.read_bytes() for p in repo_copy.rglob("*.pbtxt")}
    mc.write_triton_models(repo_copy, manifest)
    assert version_dir.stat().st_ino == marker  # the same folder, not rebuilt
    assert {p: p.read_bytes() for p in repo_copy.rglob("*.pbtxt")} == before
    leftovers = [p for p in repo_copy.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == []


def test_a_stale_preprocess_version_folder_is_replaced(
    repo_copy: Path, published_model: PublishedModel
) -> None:
    manifest = published_model.manifest
    version_dir = repo_copy / "preprocess" / str(manifest.version)
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    (version_dir / "input_spec.json").write_text("{}")  # left by a publish that crashed
    mc.write_triton_models(repo_copy, manifest)
    spec = json.loads((version_dir / "input_spec.json").read_text())
    assert imaging.InputSpec.from_dict(spec) == manifest.input_spec
    assert (version_dir / "model.py").is_file()


def test_the_local_repository_applies_the_overrides_and_publish_does_not(
    repo_copy: Path, published_model: PublishedModel, tmp_path: Path
) -> None:
    published = (repo_copy / "classifier" / "config.pbtxt").read_text()
    settings = TritonSettings(
        max_batch_size=8, instance_count=2, max_image_pixels=5000, preprocess_instance_count=3
    )
    target = tmp_path / "run" / "model_repository"
    mc.write_local_repository(target, repo_copy, published_model.model, settings)
    # Requests keep the model's image limit; merged batches stop at the override.
    largest = published_model.manifest.serving.max_images_per_request
    for name in ("classifier", "classifier_torchscript", "preprocess"):
        config = read_config(target / name / "config.pbtxt")
        assert config.max_batch_size == largest, name
        assert list(config.dynamic_batching.preferred_batch_size) == [8], name
    twin = read_config(target / "classifier" / "config.pbtxt")
    assert [g.count for g in twin.instance_group] == [2]
    preprocess = read_config(target / "preprocess" / "config.pbtxt")
    assert [g.count for g in preprocess.instance_group] == [3]
    assert preprocess.parameters["max_pixels"].string_value == "5000"
    assert read_config(target / "classifier_ensemble" / "config.pbtxt").max_batch_size == largest
    assert (repo_copy / "classifier" / "config.pbtxt").read_text() == published
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        mc.write_local_repository(
            target, repo_copy, published_model.model, TritonSettings(preferred_batch_sizes=[512])
        )


def test_local_repository_twins_link_the_published_files(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    target = tmp_path / "run" / "model_repository"
    version = mc.write_local_repository(
        target, published_model.repo, published_model.model, TritonSettings()
    )
    assert version == published_model.version
    version = str(published_model.version)
    onnx_link = target / "classifier" / version / "model.onnx"
    published = published_model.repo / "classifier" / version / "model.onnx"
    assert onnx_link.is_symlink() and onnx_link.resolve() == published.resolve()
    pt_link = target / "classifier_torchscript" / version / "model.pt"
    assert (
        pt_link.resolve().read_bytes()
        == (published_model.repo / "classifier_torchscript" / version / "model.pt").read_bytes()
    )
    for name in ("classifier", "classifier_torchscript"):
        assert (target / name / version / "model.py").read_bytes() == mc.TWIN_SOURCE.read_bytes()
    assert (target / "preprocess" / version / "services/common/imaging.py").is_file()
    assert (target / "classifier_ensemble" / version).is_dir()


def test_a_tampered_artifact_is_refused(repo_copy: Path, published_model: PublishedModel) -> None:
    from services.common.repository import NoValidVersion

    onnx_path = repo_copy / "classifier" / str(published_model.version) / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(NoValidVersion, match=r"classifier/\d+/model.onnx: sha256 mismatch"):
        mc.write_local_repository(
            repo_copy.parent / "run", repo_copy, published_model.model, TritonSettings()
        )


def test_pruned_versions_lose_their_pipeline_folders(
    repo_copy: Path, published_model: PublishedModel
) -> None:
    manifest = published_model.manifest
    newer = manifest.model_copy(update={"version": manifest.version + 1})
    packager = mc.TritonConfigs()  # what publish runs (services.common.publishing.Packager)
    mc.write_triton_models(repo_copy, newer)
    packager.prune(repo_copy, manifest.model, [manifest.version])
    for name in ("preprocess", f"{manifest.model}_ensemble"):
        remaining = sorted(p.name for p in (repo_copy / name).iterdir() if p.is_dir())
        assert remaining == [str(manifest.version + 1)]


def test_local_ensembles_pin_their_steps_and_a_reload_stage_keeps_two_versions(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """The local ensemble runs exactly the version it names (its steps pinned to it), and the
    repository a reload stages serves two version folders per model; the published configs
    keep -1 (the newest loaded) and one version."""
    target = tmp_path / "run" / "model_repository"
    version = mc.write_local_repository(
        target, published_model.repo, published_model.model, TritonSettings(), versions=2
    )
    ensemble = read_config(target / "classifier_ensemble" / "config.pbtxt")
    assert [s.model_version for s in ensemble.ensemble_scheduling.step] == [version, version]
    for name in ("classifier", "preprocess", "classifier_ensemble"):
        assert read_config(target / name / "config.pbtxt").version_policy.latest.num_versions == 2
    mc.write_local_repository(target, published_model.repo, published_model.model, TritonSettings())
    assert (
        read_config(target / "classifier" / "config.pbtxt").version_policy.latest.num_versions == 1
    )
    published = parse(mc.ensemble_config(published_model.manifest))
    assert [s.model_version for s in published.ensemble_scheduling.step] == [-1, -1]
    assert published.version_policy.latest.num_versions == 1
