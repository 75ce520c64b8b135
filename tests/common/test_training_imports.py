"""Training depends on the repository's write side, not on the engines that serve it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import training, training.cli, training.publish
from training.publish import publish_checkpoint
print(json.dumps(sorted(sys.modules)))
"""


def test_training_and_its_publish_path_import_no_serving_engine() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.splitlines()[-1])
    assert "training.publish" in modules and "services.common.publishing" in modules
    engines = [
        name
        for name in modules
        if name.split(".")[:2] in (["services", "torchserve"], ["services", "triton"])
    ]
    assert engines == [], f"training imported {engines}"
