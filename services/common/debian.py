"""Debian packages the project's commands install for themselves when they are absent.

The local stack needs Debian's ``prometheus``, the engine bench ``wrk``: both are one apt
package, installed the same way (as root, non-interactive, without recommends) so that a fresh
Debian machine runs the commands as they are written.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

logger = logging.getLogger(__name__)


class PackageError(RuntimeError):
    """A package is missing and cannot be installed here; the message says what to do."""


def apt_install(package: str, why: str) -> None:
    """Install Debian's ``package`` (``why`` names what needs it, for the log and the error);
    PackageError when not root, without apt-get, or when apt-get fails."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageError(
            f"{why} needs Debian's {package} package: apt-get install {package} (as root)"
        )
    logger.info("installing Debian's %s package for %s (apt-get)", package, why)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PackageError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
