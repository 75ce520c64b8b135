"""Settings of the local process stack (env prefix ``STACK_``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackSettings(BaseSettings):
    """Where the stack runs and how long it may take; each service keeps its own settings."""

    model_config = SettingsConfigDict(
        env_prefix="STACK_", extra="forbid", validate_default=True, use_attribute_docstrings=True
    )

    run_dir: Path = Path("runs/stack")
    """Supervisor config, sockets, logs and every service's run folder live here."""
    repository: Path = Path("model_repository")
    """Model repository served by every engine; trained and published first when empty."""
    model: str = "classifier"
    """Model name in the repository."""
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    """The one port a user needs."""
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    """Prometheus web UI and HTTP API."""
    prometheus_binary: Path = Path("/usr/bin/prometheus")
    """Debian's prometheus package; installed with apt-get when absent (root only)."""
    scrape_interval_s: int = Field(default=2, ge=1, le=300)
    """How often Prometheus scrapes every /metrics endpoint."""
    server_cpus: str = ""
    """CPU list for `taskset -c` on every server process (e.g. "0" so a load generator can own
    core 1 in benchmarks); empty means no pinning."""
    ready_timeout_s: float = Field(default=420.0, gt=0)
    """How long `up` waits for the gateway's /readyz to report every engine ready."""
    stop_timeout_s: float = Field(default=60.0, gt=0)
    """How long `down` waits for every process to exit before killing what is left."""

    @property
    def torchserve_run_dir(self) -> Path:
        """TorchServe's run folder inside the stack's (its key file is written there)."""
        return self.engine_run_dir("torchserve")

    def engine_run_dir(self, engine: Engine) -> Path:
        """The run folder the stack gives an engine's launcher (``runs/stack/<engine>``)."""
        return self.run_dir.resolve() / engine


Engine = Literal["torchserve", "triton"]


def locate_run_dir(
    engine: Engine,
    variable: str,
    standalone: Path,
    running: Callable[[Path], bool],
    stack_run_dirs: Sequence[Path] | None = None,
) -> Path:
    """The run folder of the ``engine`` instance the user is running, so that ``make
    torchserve-status`` and friends need no variable in stack mode.

    ``variable`` (``TORCHSERVE_RUN_DIR``) set in the environment wins. Otherwise the standalone
    folder (``runs/torchserve``, what ``make torchserve-up`` uses) and the stack's
    (``runs/stack/torchserve``, what ``make up`` uses) are tried in that order and the first
    in which ``running`` finds an instance is returned; with none running, the standalone one
    (whose status then says "not running").
    """
    if os.environ.get(variable):
        return standalone
    if stack_run_dirs is None:
        try:
            stack_run_dirs = [StackSettings().engine_run_dir(engine)]
        except ValueError:  # invalid STACK_* settings: no stack to look in
            stack_run_dirs = []
    for candidate in (standalone, *stack_run_dirs):
        if running(candidate):
            return candidate
    return standalone
