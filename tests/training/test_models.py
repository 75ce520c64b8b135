from __future__ import annotations

import pytest
import torch

from training.errors import ConfigError
from training.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("num_classes", [2, 10])
def test_output_shape(arch: str, num_classes: int) -> None:
    model = build_model(arch, num_classes).eval()
    with torch.inference_mode():
        assert model(torch.zeros(4, 3, 32, 32)).shape == (4, num_classes)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="unknown arch 'vit-huge'"):
        build_model("vit-huge", 10)
