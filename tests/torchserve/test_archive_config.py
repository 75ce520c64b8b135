"""The archive, the rendered configuration and the handler's request parsing, without a server."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.errors import ServiceError
from services.common.repository import read_manifest
from services.common.serving import DEFAULT_MAX_BATCH_SIZE, ServingConfig
from services.torchserve import handler
from services.torchserve.archive import ArchiveError, build_archive
from services.torchserve.config import (
    TorchServeSettings,
    registration,
    render_config,
    render_profile,
)
from tests.conftest import PublishedModel

HERE = Path(__file__).resolve().parents[2] / "services" / "torchserve"


def test_archive_carries_model_handler_manifest_and_shared_code(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    mar = build_archive(published_model.repo, published_model.manifest, tmp_path)
    assert mar == tmp_path / "classifier.mar"
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.mar"]  # no leftovers
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        assert {
            "model.pt",
            "handler.py",
            "manifest.json",
            "services/__init__.py",
            "services/common/__init__.py",
            "services/common/imaging.py",
            "services/common/repository.py",
            "MAR-INF/MANIFEST.json",
        } <= names
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        assert mar_manifest["model"]["modelName"] == published_model.model
        assert mar_manifest["model"]["modelVersion"] == str(published_model.version)
        assert mar_manifest["model"]["handler"] == "handler.py"
        shipped = json.loads(archive.read("manifest.json"))
        assert shipped["labels"] == published_model.manifest.labels
        model_sha = hashlib.sha256(archive.read("model.pt")).hexdigest()
        assert model_sha == published_model.manifest.artifacts["torchscript"].sha256
        assert (
            archive.read("services/common/imaging.py")
            == (HERE.parent / "common" / "imaging.py").read_bytes()
        )


def test_published_version_already_holds_its_archive(published_model: PublishedModel) -> None:
    mar = published_model.repo / published_model.model / str(published_model.version)
    assert (mar / f"{published_model.model}.mar").is_file()


def test_archive_refuses_a_model_file_that_does_not_match_the_manifest(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    repo = published_model.copy_repository(tmp_path)
    manifest = read_manifest(repo, published_model.model, published_model.version)
    model_pt = repo / manifest.artifacts["torchscript"].path
    model_pt.write_bytes(model_pt.read_bytes() + b"tampered")
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match="sha256"):
        build_archive(repo, manifest, out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("profile", ["local", "compose"])
def test_checked_in_config_matches_the_renderer(profile: str) -> None:
    checked_in = (HERE / f"config.{profile}.properties").read_text()
    assert checked_in == render_profile(profile)  # type: ignore[arg-type]


def test_rendered_config_is_locked_down(tmp_path: Path) -> None:
    settings = TorchServeSettings.model_construct(run_dir=tmp_path)
    props = dict(
        line.split("=", 1)
        for line in render_config(settings, 3).splitlines()
        if line and not line.startswith("#")
    )
    assert props["management_address"] == "http://127.0.0.1:8181"
    assert props["inference_address"] == "http://127.0.0.1:8180"
    assert props["metrics_address"] == "http://127.0.0.1:8182"
    assert props["disable_token_authorization"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert props["max_request_size"] == str(10 * 1024 * 1024)
    assert props["allowed_urls"] == f"file://{tmp_path.resolve()}/model_store/[^/]+[.]mar"
    assert "-Xmx512m" in props["vmargs"]
    models = json.loads(props["models"])
    assert models["classifier"]["3"]["batchSize"] == DEFAULT_MAX_BATCH_SIZE  # serving default
    assert models["classifier"]["3"]["marName"] == props["load_models"] == "classifier-v3.mar"


def test_registration_comes_from_the_serving_config(tmp_path: Path) -> None:
    serving = ServingConfig(max_batch_size=16, max_batch_delay_ms=2.2, instance_count=2)
    settings = TorchServeSettings.model_construct(run_dir=tmp_path)
    props = dict(
        line.split("=", 1)
        for line in render_config(settings, 4, serving=serving).splitlines()
        if line and not line.startswith("#")
    )
    entry = json.loads(props["models"])["classifier"]["4"]
    assert (entry["batchSize"], entry["maxBatchDelay"]) == (16, 3)  # the delay rounded up
    assert (entry["minWorkers"], entry["maxWorkers"]) == (2, 2)
    assert props["default_workers_per_model"] == "2"
    reg = registration(settings, serving)
    assert (reg.batch_size, reg.max_batch_delay_ms, reg.workers, reg.overrides) == (16, 3, 2, {})


def test_overrides_replace_the_model_values_and_say_so(tmp_path: Path) -> None:
    serving = ServingConfig(max_batch_size=16, max_batch_delay_ms=3, instance_count=2)
    settings = TorchServeSettings.model_construct(run_dir=tmp_path, batch_size=4, workers=1)
    reg = registration(settings, serving)
    assert (reg.batch_size, reg.max_batch_delay_ms, reg.workers) == (4, 3, 1)
    assert reg.overrides == {
        "TORCHSERVE_BATCH_SIZE": {"value": 4, "field": "max_batch_size", "model": 16},
        "TORCHSERVE_WORKERS": {"value": 1, "field": "instance_count", "model": 2},
    }


def test_settings_refuse_clashing_ports() -> None:
    with pytest.raises(ValidationError, match="distinct"):
        TorchServeSettings(inference_port=9000, management_port=9000)


class TestParseRequest:
    def test_raw_bytes_with_default_and_header_top_k(self) -> None:
        assert handler.parse_request({"body": bytearray(b"png")}, {}) == (b"png", 5)
        headers = {"X-Top-K": "3", "body": {"content-type": "application/octet-stream"}}
        assert handler.parse_request({"body": b"png"}, headers) == (b"png", 3)

    def test_json_object(self) -> None:
        row = {"body": {"image": "aGk=", "top_k": 2}}
        assert handler.parse_request(row, {}) == (b"hi", 2)

    def test_json_that_torchserve_left_undecoded(self) -> None:
        # "application/json; charset=utf-8" or a form post (curl -d) arrive as bytes.
        row = {"body": b' {"image": "aGk=", "top_k": 4}'}
        assert handler.parse_request(row, {}) == (b"hi", 4)
        headers = {"body": {"content-type": "application/json; charset=utf-8"}}
        assert handler.parse_request({"body": b'{"image": "aGk="}'}, headers) == (b"hi", 5)

    @pytest.mark.parametrize(
        ("row", "headers", "code"),
        [
            ({"body": b"{oops"}, {"body": {"content-type": "application/json"}}, "invalid_json"),
            ({"body": "text"}, {"body": {"content-type": "text/plain"}}, "unsupported_media_type"),
            ({"body": [1]}, {}, "invalid_request"),
            ({"body": {"image": "aGk=", "top_k": 1001}}, {}, "invalid_top_k"),
            ({"body": {"image": None}}, {}, "invalid_type"),
            ({"body": b"png"}, {"x-top-k": "-1"}, "invalid_top_k"),
            ({"body": b"png"}, {"x-top-k": "\u00b2"}, "invalid_top_k"),  # isdigit(), not int
            ({"body": b'{"image": ' + b"[" * 100_000}, {}, "invalid_json"),
            ({"a": b"1", "b": b"2"}, {}, "invalid_request"),
        ],
    )
    def test_mistakes(self, row: dict[str, object], headers: dict[str, object], code: str) -> None:
        with pytest.raises(ServiceError) as caught:
            handler.parse_request(row, headers)
        assert caught.value.code == code
        assert 400 <= caught.value.status_code < 500

    def test_reason_phrase_is_one_printable_line(self) -> None:
        assert handler.reason_phrase("bad\r\nthing\x00 é") == "bad thing"
