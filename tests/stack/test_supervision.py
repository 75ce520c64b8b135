"""The stack's supervision gives up on a program that cannot start, instead of a restart loop.

The real predictor, configured exactly as the local stack runs it (its ``[program:predictor]``
section from :func:`services.stack.supervisor.program_section`), runs under a real supervisord
on a repository whose only version is corrupt: it fails at every start, and supervisord puts
it in FATAL after :data:`~services.stack.supervisor.START_RETRIES` retries. With the old
``startsecs=3`` each failed start outlived the start window and the loop never ended.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.stack.settings import StackSettings
from services.stack.supervisor import START_RETRIES, program_section, programs
from tests.conftest import PublishedModel, flip_byte
from tests.processes import free_port, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _supervisord_config(run: Path, section: str) -> str:
    return f"""[unix_http_server]
file={run / "supervisor.sock"}
chmod=0700

[supervisord]
logfile={run / "supervisord.log"}
pidfile={run / "supervisord.pid"}
childlogdir={run}
nodaemon=false

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{run / "supervisor.sock"}

{section}"""


def test_a_predictor_that_cannot_start_goes_fatal_after_a_few_tries(
    published_model: PublishedModel, tmp_path: Path
) -> None:
    repo = published_model.copy_repository(tmp_path)
    flip_byte(repo / published_model.manifest.artifacts["torchscript"].path)
    run = tmp_path / "run"
    run.mkdir()
    settings = StackSettings(run_dir=run, repository=repo, model=published_model.model)
    predictor = next(p for p in programs(settings) if p.name == "predictor")
    # On a free port, not the stack's 8100.
    predictor = dataclasses.replace(
        predictor, environment=predictor.environment | {"PREDICTOR_PORT": str(free_port())}
    )
    config = run / "supervisord.conf"
    config.write_text(_supervisord_config(run, program_section(predictor, run)))

    def ctl(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(config), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout

    subprocess.run([str(BIN / "supervisord"), "-c", str(config)], check=True)
    try:
        # Each start fails in seconds; four of them and the back-off (1+2+3 s) well within this.
        wait_for(lambda: "FATAL" in ctl("status", "predictor"), 240, "predictor FATAL", 0.5)
    finally:
        ctl("shutdown")
        wait_for(lambda: not (run / "supervisord.pid").exists(), 60, "supervisord to exit")
    log = (run / "supervisord.log").read_text()
    assert log.count("spawned: 'predictor'") == START_RETRIES + 1, log
    assert "entered FATAL state, too many start retries too quickly" in log
    assert "sha256 mismatch" in (run / "predictor.log").read_text()
    spawned = [int(pid) for pid in re.findall(r"spawned: 'predictor' with pid (\d+)", log)]
    assert not [pid for pid in spawned if psutil.pid_exists(pid)]
