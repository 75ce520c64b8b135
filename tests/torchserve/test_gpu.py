"""The handler on CUDA gives the CPU's answers (skipped without a GPU; `make gpu-check`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.torchserve.archive import build_archive
from services.torchserve.gpu_check import check
from tests.conftest import PublishedModel


@pytest.mark.gpu
def test_handler_on_cuda_matches_cpu(published_model: PublishedModel, tmp_path: Path) -> None:
    mar = build_archive(published_model.repo, published_model.manifest, tmp_path)
    report = check(mar, batch=32)
    assert report["gpu_device"] == "cuda:0", report
    assert report["ok"], report
