"""Docs that match the code: every setting and every make target the README names exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from loadtests.targets import LoadTestSettings
from services.gateway.settings import GatewaySettings
from services.predictor.settings import PredictorSettings
from services.stack.settings import StackSettings
from services.torchserve.config import TorchServeSettings
from services.triton.settings import TritonSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "settings_cls",
    [
        GatewaySettings,
        PredictorSettings,
        TorchServeSettings,
        TritonSettings,
        StackSettings,
        LoadTestSettings,
    ],
)
def test_every_setting_is_documented(settings_cls: type[BaseSettings]) -> None:
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    missing = [
        f"{prefix}{name.upper()}"
        for name in settings_cls.model_fields
        if f"\n| `{prefix}{name.upper()}` |" not in README
    ]
    assert not missing, f"README's settings reference has no row for {missing}"


def test_every_make_target_in_readme_exists() -> None:
    listed = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    targets = {line.split()[0] for line in listed.splitlines() if line.strip()}
    named = set(re.findall(r"`make ([a-z][a-z-]+)", README))
    assert named, "the README names no make target"
    assert named <= targets, f"README names unknown targets: {sorted(named - targets)}"
