"""The shared model runtime: integrity, engines, warm-up, answers, and the copy models carry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.common import runtime
from services.common.errors import IntegrityError, RepositoryError, ServiceError
from services.common.imaging import ImageDecodeError, decode_and_preprocess
from services.common.repository import load_version
from services.common.runtime import EngineError, FloatArray
from tests.conftest import PublishedModel


def _batch(published: PublishedModel) -> FloatArray:
    spec = published.manifest.input_spec
    return np.stack([decode_and_preprocess(data, spec) for data in published.images])


class TestIntegrity:
    def test_a_matching_file_passes(self, tmp_path: Path) -> None:
        path = tmp_path / "model.bin"
        path.write_bytes(b"weights")
        runtime.verify_file(path, runtime.sha256_file(path), "m/1/model.bin")

    def test_one_changed_byte_is_refused_naming_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "model.bin"
        path.write_bytes(b"weights")
        expected = runtime.sha256_file(path)
        path.write_bytes(b"weighta")
        with pytest.raises(IntegrityError, match=r"^m/1/model.bin: sha256 mismatch"):
            runtime.verify_file(path, expected, "m/1/model.bin")

    def test_a_missing_file_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(IntegrityError, match=r"^m/1/model\.bin: missing$"):
            runtime.verify_file(tmp_path / "absent", "0" * 64, "m/1/model.bin")

    def test_the_repository_verifies_through_the_runtime(self, repo_copy: Path) -> None:
        """One sha256 check: load_version's refusal is the runtime's IntegrityError."""
        model_file = next((repo_copy / "classifier").glob("*/model.onnx"))
        model_file.write_bytes(model_file.read_bytes()[:-1] + b"\x00")
        with pytest.raises(IntegrityError, match=r"^classifier/\d+/model.onnx: sha256 mismatch"):
            load_version(repo_copy, "classifier")


class TestEngines:
    @pytest.mark.parametrize("kind", ["torchscript", "onnx"])
    def test_each_engine_gives_the_eager_models_top1(
        self, published_model: PublishedModel, kind: runtime.EngineKind
    ) -> None:
        version = load_version(published_model.repo, published_model.model)
        path = version.torchscript_path if kind == "torchscript" else version.onnx_path
        engine = runtime.create_engine(kind, path, "cpu")
        logits = engine.infer(_batch(published_model))
        assert logits.dtype == np.float32
        assert logits.shape == (len(published_model.images), len(version.labels))
        assert logits.argmax(axis=1).tolist() == published_model.expected_top1

    def test_both_engines_agree_on_the_logits(self, published_model: PublishedModel) -> None:
        version = load_version(published_model.repo, published_model.model)
        batch = _batch(published_model)
        scripted = runtime.create_engine("torchscript", version.torchscript_path).infer(batch)
        exported = runtime.create_engine("onnx", version.onnx_path).infer(batch)
        assert np.abs(scripted - exported).max() < 1e-4

    def test_a_file_that_is_no_model_is_an_engine_error(self, tmp_path: Path) -> None:
        junk = tmp_path / "model.onnx"
        junk.write_bytes(b"not a model")
        kinds: list[runtime.EngineKind] = ["onnx", "torchscript"]
        for kind in kinds:
            with pytest.raises(EngineError, match="cannot load"):
                runtime.create_engine(kind, junk)

    def test_cuda_where_there_is_none_is_refused(self) -> None:
        if runtime.cuda_available():
            pytest.skip("this machine has CUDA")
        with pytest.raises(EngineError, match="CUDA is not available"):
            runtime.resolve_device("cuda")
        assert runtime.resolve_device("auto") == "cpu"


class _Fixed:
    """An engine that answers ``logits`` whatever the batch (for warm-up's checks)."""

    kind: runtime.EngineKind = "onnx"
    platform = "test"
    device = "cpu"

    def __init__(self, classes: int, value: float = 0.0, extra_rows: int = 0) -> None:
        self.classes, self.value, self.extra_rows = classes, value, extra_rows
        self.sizes: list[int] = []

    def infer(self, batch: FloatArray) -> FloatArray:
        self.sizes.append(len(batch))
        return np.full((len(batch) + self.extra_rows, self.classes), self.value, np.float32)


class TestWarmUp:
    def test_every_batch_size_runs_the_given_number_of_times(self) -> None:
        engine = _Fixed(10)
        runtime.warm_up(engine, (3, 32, 32), 10, runtime.warmup_sizes(32), runs=2)
        assert engine.sizes == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32]

    def test_sizes_cover_a_max_that_is_no_power_of_two(self) -> None:
        assert runtime.warmup_sizes(1) == [1]
        assert runtime.warmup_sizes(24) == [1, 2, 4, 8, 16, 24]

    def test_an_output_that_does_not_fit_the_labels_is_refused(self) -> None:
        with pytest.raises(EngineError, match=r"expected \[1, 10\]"):
            runtime.warm_up(_Fixed(7), (3, 32, 32), 10, [1], what="v3")
        with pytest.raises(EngineError, match="v3 returned shape"):
            runtime.warm_up(_Fixed(10, extra_rows=1), (3, 32, 32), 10, [2], what="v3")

    def test_non_finite_logits_are_refused(self) -> None:
        with pytest.raises(EngineError, match="non-finite"):
            runtime.warm_up(_Fixed(10, value=float("nan")), (3, 32, 32), 10, [1])


class TestAnswers:
    def test_top_k_is_best_first_with_labels_and_softmax_scores(self) -> None:
        logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, 0.0]], dtype=np.float32)
        answers = runtime.top_k_predictions(logits, ["a", "b", "c"], 2)
        assert [[p["label"] for p in row] for row in answers] == [["b", "c"], ["a", "b"]]
        assert answers[1][0]["class_id"] == 0  # a tie goes to the lower class id
        expected = np.exp(2.0) / np.exp([0.0, 2.0, 1.0]).sum()
        assert answers[0][0]["score"] == pytest.approx(expected)

    def test_top_k_is_clamped_to_the_classes(self) -> None:
        answers = runtime.top_k_predictions(np.zeros((1, 3), np.float32), ["a", "b", "c"], 99)
        assert len(answers[0]) == 3


class TestErrors:
    def test_every_error_carries_its_status(self) -> None:
        assert ImageDecodeError("x", "not_an_image").status_code == 400
        assert ImageDecodeError("x", "image_too_large").status_code == 413
        assert ImageDecodeError("x", "invalid_type").status_code == 422
        for error in (ImageDecodeError("x", "corrupt_image"), EngineError("x")):
            assert isinstance(error, ServiceError)
        assert EngineError("x").status_code == 503
        assert issubclass(IntegrityError, RepositoryError)


def test_the_carried_copy_runs_without_the_project(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    """What a model folder carries (portable_files) imports and runs on its own: no FastAPI,
    no pydantic, nothing of services.common that it does not carry, and it checks itself."""
    carried = tmp_path / "version"
    for relative, source in runtime.portable_files().items():
        (carried / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, carried / relative)
    onnx = load_version(published_model.repo, published_model.model).onnx_path
    script = f"""
import json, sys
sys.path.insert(0, {str(carried)!r})
from services.common import imaging, runtime
runtime.require_carried(__import__("pathlib").Path({str(carried)!r}))
engine = runtime.create_engine("onnx", __import__("pathlib").Path({str(onnx)!r}))
spec = imaging.InputSpec()
image = open({str(tmp_path / "digit.png")!r}, "rb").read()
logits = engine.infer(imaging.decode_and_preprocess(image, spec)[None])
print(json.dumps({{
    "top1": int(logits.argmax()),
    "modules": sorted(m for m in sys.modules if m.startswith("services")),
    "files": sorted(
        getattr(sys.modules[m], "__file__", "") or ""
        for m in sys.modules if m.startswith("services")
    ),
    "heavy": sorted(m for m in ("fastapi", "pydantic", "starlette", "torch") if m in sys.modules),
}}))
"""
    (tmp_path / "digit.png").write_bytes(published_model.images[0])
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["top1"] == published_model.expected_top1[0]
    assert report["heavy"] == []
    assert all(Path(f).resolve().is_relative_to(carried.resolve()) for f in report["files"])
    assert set(report["modules"]) == {
        "services",
        "services.common",
        "services.common.errors",
        "services.common.imaging",
        "services.common.runtime",
    }
