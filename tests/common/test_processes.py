"""services.common.processes: a whole process group is stopped, politely first, then not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.common.processes import (
    ProcessesSurvived,
    group_members,
    stop_group,
    stop_processes,
)


def start_group(script: str, members: int) -> subprocess.Popen[bytes]:
    """``sh -c script`` leading a new process group; returns once ``members`` processes run."""
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(process.pid)) < members:
        assert time.monotonic() < deadline, "the group did not start"
        time.sleep(0.02)
    return process


def test_group_members_lists_the_group_and_not_others() -> None:
    process = start_group("sleep 30 & sleep 30 & wait", members=3)
    try:
        members = group_members(process.pid)
        assert process.pid in members and len(members) == 3
        assert not set(members) & set(group_members(os.getpgid(0)))
    finally:
        stop_group(process.pid, timeout_s=5, leader=process)


def test_a_group_that_obeys_sigterm_is_not_killed() -> None:
    process = start_group("sleep 30 & sleep 30 & wait", members=3)
    assert stop_group(process.pid, timeout_s=5, leader=process) == []
    assert group_members(process.pid) == []
    assert process.returncode == -signal.SIGTERM  # reaped, with its real status


def test_what_ignores_sigterm_is_killed_after_the_timeout_and_named() -> None:
    process = start_group("trap '' TERM; sleep 30 & sleep 30 & wait", members=3)
    members = sorted(group_members(process.pid))
    started = time.monotonic()
    killed = stop_group(process.pid, timeout_s=0.5, leader=process)
    assert time.monotonic() - started >= 0.5  # it waited for SIGTERM first
    assert killed == members
    assert group_members(process.pid) == []
    assert process.returncode == -signal.SIGKILL


def test_first_signal_sigkill_kills_everything_at_once() -> None:
    process = start_group("sleep 30 & wait", members=2)
    members = sorted(group_members(process.pid))
    assert stop_group(process.pid, timeout_s=5, first_signal=signal.SIGKILL, leader=process) == (
        members
    )
    assert group_members(process.pid) == []


def test_a_leader_we_do_not_hold_is_reaped_by_pid() -> None:
    process = start_group("sleep 30 & wait", members=2)
    assert stop_group(process.pid, timeout_s=5) == []
    with pytest.raises(ChildProcessError):  # already collected: no zombie left
        os.waitpid(process.pid, 0)


def test_wait_only_when_the_processes_were_told_another_way() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])

    def members() -> list[int]:
        return [process.pid] if process.poll() is None else []

    assert stop_processes(members, timeout_s=10, first_signal=None, children=[process]) == []
    assert process.returncode == 0  # exited on its own: no signal was sent


def test_a_survivor_is_reported() -> None:
    ghost = 2**22 + 12345  # above the default pid_max: no such process, it "never goes away"
    with pytest.raises(ProcessesSurvived) as info:
        stop_processes(lambda: [ghost], timeout_s=0.1, kill_timeout_s=0.1)
    assert info.value.pids == [ghost]
