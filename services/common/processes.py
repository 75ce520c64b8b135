"""Stopping processes, written once: signal, wait, SIGKILL what is left, reap.

Every server this project starts leads a process group of its own (``start_new_session``),
so one signal reaches it and every child it has (TorchServe's JVM and workers, Triton's python
stubs). :func:`stop_group` stops such a group; :func:`stop_processes` is the same steps for any
set of processes a caller can list (the launchers also look for strays by command line, the
stack for supervisord's descendants). Both return the pids they had to SIGKILL and raise
:class:`ProcessesSurvived` when something outlives even that.

Standard library only: the test helpers import it on hosts that collect only the GPU tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

#: How long a SIGKILLed process may take to disappear before it counts as a survivor.
KILL_TIMEOUT_S = 10.0
_POLL_S = 0.05


class ProcessesSurvived(RuntimeError):
    """Processes still ran after SIGKILL and the wait that followed it."""

    def __init__(self, pids: Collection[int]) -> None:
        self.pids = sorted(pids)
        super().__init__(f"processes survived SIGKILL: {self.pids}")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def processes_naming(folder: Path) -> list[int]:
    """Live processes other than this one whose command line names ``folder``, from /proc (a
    zombie's command line is empty). The servers here name their run folder in theirs."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited while we looked
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def _signal(groups: Collection[int], pids: Collection[int], sig: signal.Signals) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(children: Sequence[int | subprocess.Popen[Any]]) -> None:
    """Collect the exit status of our own children, so that none lingers as a zombie."""
    for child in children:
        if isinstance(child, subprocess.Popen):
            child.poll()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, os.WNOHANG)


def _wait_gone(
    members: Callable[[], Collection[int]],
    children: Sequence[int | subprocess.Popen[Any]],
    timeout_s: float,
) -> list[int]:
    """Poll until ``members()`` is empty or ``timeout_s`` passed; return who is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(children)
        left = sorted(members())
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(_POLL_S)


def stop_processes(
    members: Callable[[], Collection[int]],
    *,
    timeout_s: float,
    groups: Collection[int] = (),
    first_signal: signal.Signals | None = signal.SIGTERM,
    kill_timeout_s: float = KILL_TIMEOUT_S,
    children: Sequence[int | subprocess.Popen[Any]] = (),
) -> list[int]:
    """Stop the processes ``members()`` lists (it is asked again at every poll).

    Sends ``first_signal`` to each process group in ``groups`` and to every member (None: they
    were told to stop another way, only wait), waits up to ``timeout_s`` for the members to be
    gone, then SIGKILLs the groups and whoever is left and waits up to ``kill_timeout_s`` more.
    ``children`` (our own children: a Popen, or a pid) are reaped while waiting.

    Returns the pids that had to be SIGKILLed (all of them when ``first_signal`` is SIGKILL);
    raises :class:`ProcessesSurvived` when some still run after that.
    """
    targets = sorted(members())
    if first_signal is not None:
        _signal(groups, targets, first_signal)
    left = _wait_gone(members, children, timeout_s)
    if left:
        _signal(groups, left, signal.SIGKILL)
        survivors = _wait_gone(members, children, kill_timeout_s)
        if survivors:
            raise ProcessesSurvived(survivors)
    _reap(children)  # what died since the last poll is a zombie now: collect it
    return targets if first_signal == signal.SIGKILL else left


def stop_group(
    pgid: int,
    *,
    timeout_s: float,
    first_signal: signal.Signals = signal.SIGTERM,
    kill_timeout_s: float = KILL_TIMEOUT_S,
    leader: subprocess.Popen[Any] | None = None,
) -> list[int]:
    """Stop process group ``pgid`` (see :func:`stop_processes`) and reap its leader.

    ``leader`` is the group leader when it is our child (its Popen keeps the real exit status);
    without it the leader, if it is our child, is reaped with ``waitpid``. A leader that left
    the group (``setsid``) is stopped too. Returns the pids that had to be SIGKILLed.
    """

    def members() -> list[int]:
        found = group_members(pgid)
        if leader is not None and leader.poll() is None and leader.pid not in found:
            found.append(leader.pid)
        return found

    children: list[int | subprocess.Popen[Any]] = [leader] if leader is not None else [pgid]
    killed = stop_processes(
        members,
        timeout_s=timeout_s,
        groups=[pgid],
        first_signal=first_signal,
        kill_timeout_s=kill_timeout_s,
        children=children,
    )
    if leader is not None:
        leader.wait()  # gone already: this only collects the status
    return killed
