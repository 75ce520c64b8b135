"""loadtests.perf_analyzer's pieces that need no server: input data, apt isolation, locating.

perf_analyzer itself runs against real engines in tests/clients/test_clients.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from loadtests import perf_analyzer
from loadtests.perf_analyzer_bench import Row, Target, table


def test_bytes_input_data_is_tritons_serialised_form() -> None:
    blobs = [b"\x89PNG first", b"second image"]
    data = perf_analyzer.bytes_input_data("IMAGE", blobs)
    decoded = [base64.b64decode(step["IMAGE"]["b64"]) for step in data["data"]]
    assert decoded == [len(b).to_bytes(4, "little") + b for b in blobs]


def test_tensor_and_torchserve_input_data(tmp_path: Path) -> None:
    data = perf_analyzer.tensor_input_data("input", [b"\x00\x00\x80\x3f"])
    assert base64.b64decode(data["data"][0]["input"]["b64"]) == b"\x00\x00\x80\x3f"
    files = perf_analyzer.torchserve_input_data([tmp_path / "a.png"])
    assert files == {"data": [{"TORCHSERVE_INPUT": [str(tmp_path / "a.png")]}]}


def test_apt_configuration_stays_in_its_own_folder(tmp_path: Path) -> None:
    options = perf_analyzer.apt_options(tmp_path)
    settings = dict(option.split("=", 1) for option in options[1::2])
    for name in ("sourcelist", "sourceparts", "preferencesparts"):
        assert settings[f"Dir::Etc::{name}"].startswith(str(tmp_path))
    assert settings["Dir::State"].startswith(str(tmp_path))
    assert settings["Dir::State::status"].startswith(str(tmp_path))
    assert settings["Dir::Cache"].startswith(str(tmp_path))


def test_locate_finds_only_a_finished_setup(tmp_path: Path) -> None:
    assert perf_analyzer.locate(tmp_path) is None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "perf_analyzer").write_bytes(b"")
    assert perf_analyzer.locate(tmp_path) is None, "no ready.json: the setup did not finish"
    loader = tmp_path / "trixie" / perf_analyzer.LIB_DIR / perf_analyzer.LOADER
    (tmp_path / "ready.json").write_text(json.dumps({"loader": str(loader)}))
    found = perf_analyzer.locate(tmp_path)
    assert found is not None and found.loader == loader
    assert found.command(["--version"])[:2] == [str(loader), "--library-path"]
    assert found.command(["--version"])[-2:] == [str(tmp_path / "bin/perf_analyzer"), "--version"]


def test_table_names_a_failed_row() -> None:
    target = Target("predictor", "grpc", "classifier", "127.0.0.1:1", {"data": []})
    measured = perf_analyzer.Measurement(4, 100, 250.0, 3.0, 5.0, 9.0, 3.5)
    text = table([Row(target, measured), Row(target, None, "connection refused")])
    rows = text.splitlines()[2:]
    assert rows[0] == (
        "| predictor | gRPC | classifier | 4 | 100 | 250.0 | 3.00 | 5.00 | 9.00 | ok |"
    )
    assert rows[1].endswith("| failed: connection refused |")
