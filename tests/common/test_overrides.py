"""``--settings`` of every engine names the overrides of the model's serving config in effect.

One parametrised test for the predictor, TorchServe and the local Triton: with no override
set, each says the model's serving config applies; with one set, it names the variable, the
serving field it replaces, the model's value and the version that value comes from.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PublishedModel

#: service -> (its settings prefix, the override to set, the serving field it replaces)
ENGINES = {
    "predictor": ("PREDICTOR_", "PREDICTOR_MAX_BATCH_SIZE", "max_batch_size"),
    "torchserve": ("TORCHSERVE_", "TORCHSERVE_BATCH_SIZE", "max_batch_size"),
    "triton": ("TRITON_", "TRITON_MAX_BATCH_SIZE", "max_batch_size"),
}


def settings_output(service: str, published: PublishedModel, **variables: str) -> str:
    prefix = ENGINES[service][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update({f"{prefix}REPOSITORY": str(published.repo), **variables})
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("service", sorted(ENGINES))
def test_settings_name_the_overrides_in_effect(
    service: str, published_model: PublishedModel
) -> None:
    _, variable, field = ENGINES[service]
    plain = settings_output(service, published_model)
    assert f"| `{variable}` | (none) |" in plain  # an override is unset by default
    assert "no override in effect: the model's serving config applies" in plain
    served = getattr(published_model.manifest.serving, field)
    overridden = settings_output(service, published_model, **{variable: "4"})
    assert (
        f"{variable}=4 overrides the model's {field} ({served}) "
        f"[classifier v{published_model.version}]"
    ) in overridden
    assert "no override in effect" not in overridden
