"""Which run folder the engines' status/reload commands act on, without variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stack.settings import StackSettings, locate_run_dir


def test_the_running_instance_is_found_standalone_first_then_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHSERVE_RUN_DIR", raising=False)
    standalone, stack = tmp_path / "torchserve", tmp_path / "stack" / "torchserve"
    running: set[Path] = set()

    def locate() -> Path:
        return locate_run_dir(
            "torchserve", "TORCHSERVE_RUN_DIR", standalone, running.__contains__, [stack]
        )

    assert locate() == standalone  # nothing runs: the standalone folder ("not running")
    running.add(stack)
    assert locate() == stack  # `make up` runs it
    running.add(standalone)
    assert locate() == standalone  # both: the standalone one, as before
    monkeypatch.setenv("TORCHSERVE_RUN_DIR", str(tmp_path / "mine"))
    running.discard(standalone)
    assert locate() == standalone  # an explicit variable is never second-guessed


def test_the_stack_folders_come_from_the_stack_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_RUN_DIR", str(tmp_path / "runs" / "stack"))
    monkeypatch.delenv("TRITON_RUN_DIR", raising=False)
    expected = (tmp_path / "runs" / "stack" / "triton").resolve()
    assert StackSettings().engine_run_dir("triton") == expected
    found = locate_run_dir("triton", "TRITON_RUN_DIR", tmp_path / "triton", expected.__eq__)
    assert found == expected
