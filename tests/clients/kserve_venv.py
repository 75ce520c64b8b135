"""The KServe SDK's virtual environment, built once and reused while its requirements hold.

``kserve`` 0.21 pins ``psutil<6`` and ``python-dateutil<3`` (this project has 7.2 and 4.0), so
it cannot join the project's environment. :func:`kserve_python` builds one of its own in
``.cache/kserve-venv`` from ``kserve-requirements.txt`` (every package pinned, installed with
``--no-deps`` so pip resolves nothing) with this machine's pip settings, and returns its
interpreter; later calls find it by the requirements' digest. :func:`run_calls` runs
:mod:`tests.clients.kserve_calls` there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".cache" / "kserve-venv"
REQUIREMENTS = Path(__file__).with_name("kserve-requirements.txt")
CALLS = Path(__file__).with_name("kserve_calls.py")
STAMP = "requirements.sha256"
BUILD_TIMEOUT_S = 900


def _digest() -> str:
    text = REQUIREMENTS.read_bytes() + sys.version.encode()
    return hashlib.sha256(text).hexdigest()


def kserve_python(venv: Path = VENV) -> Path:
    """The interpreter of the KServe SDK's environment, built first when absent or stale."""
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / "kserve-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / STAMP
        if python.exists() and stamp.exists() and stamp.read_text().strip() == _digest():
            return python
        if venv.exists():
            shutil.rmtree(venv)
        # python -m venv from inside a venv bases the new one on the same base interpreter.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        install = [
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--no-compile", "-r", str(REQUIREMENTS),
        ]  # fmt: skip
        done = subprocess.run(install, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"building {venv} failed:\n{done.stderr[-3000:]}")
        check = subprocess.run(
            [str(python), "-c", "import kserve; print(kserve.__file__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check.returncode != 0:
            raise RuntimeError(f"kserve does not import in {venv}:\n{check.stderr[-3000:]}")
        stamp.write_text(_digest() + "\n")
        return python


def run_calls(python: Path, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make ``calls`` (see :mod:`tests.clients.kserve_calls`) with the SDK; one answer each."""
    done = subprocess.run(
        [str(python), str(CALLS)],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CALLS.parent,  # not the checkout: nothing of the project on its path
    )
    if done.returncode != 0:
        raise RuntimeError(f"kserve_calls.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers
