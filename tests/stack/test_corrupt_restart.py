"""A corrupt newest version through the whole local stack's restarts (issue 17, defect 1).

`make up` on a repository whose newest version has one flipped byte in ``model.pt``
(``corrupt_newest``): every engine, as supervisord runs it, starts on the version before it and
the gateway's ``/readyz`` names the refused one for each. Then, with a client sending through
the gateway to every engine in turn, each engine's server is killed with SIGKILL (supervisord
starts it again, and it walks past the bad version again): no request fails. Then `make down`
and `make up` again: the same version, the same refusals, every request answered.

Before the fix each restart tried the newest version only: the predictor crash-looped, Triton
went FATAL, TorchServe BACKOFF, and the gateway answered 503 until the bad files were moved.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import CorruptNewest, LocalStack, StackSlot, new_local_stack
from tests.processes import wait_for
from tests.stack.test_local_stack import BACKENDS, _supervised_pid, engines_ready
from tests.stack.traffic import Traffic

pytestmark = pytest.mark.slow

#: The process each engine's program runs its server in (supervisord's child, or below it).
SERVER_NAMES = {"predictor": "python", "torchserve": "java", "triton": "tritonserver"}


@dataclass
class CorruptStack:
    stack: LocalStack
    corrupt: CorruptNewest


@pytest.fixture(scope="module")
def corrupt_stack(
    corrupt_newest: CorruptNewest,
    stack_slot: StackSlot,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CorruptStack]:
    base = tmp_path_factory.mktemp("corrupt-stack")
    repository = base / "model_repository"
    shutil.copytree(corrupt_newest.repo, repository, symlinks=True)
    stack = new_local_stack(base, repository)
    try:
        yield CorruptStack(stack_slot.hold(stack), corrupt_newest)
    finally:
        stack_slot.release(stack)


def _assert_serving_previous(corrupt: CorruptStack) -> None:
    """Every engine ready on the good version, the bad one refused (named inside the
    repository), as the gateway's /readyz reports them."""
    body: dict[str, Any] = httpx.get(f"{corrupt.stack.gateway_url}/readyz", timeout=5).json()
    good, bad = corrupt.corrupt.good, corrupt.corrupt.bad
    for backend in BACKENDS:
        entry = body["backends"][backend]
        assert entry["ready"] is True, (backend, entry)
        assert entry["version"] == str(good), (backend, entry)
        refused = entry["refused_versions"]
        assert [r["version"] for r in refused] == [bad], (backend, refused)
        assert refused[0]["reason"].startswith(
            f"classifier_torchscript/{bad}/model.pt: sha256 mismatch"
        ), (backend, refused)


def _server_pid(stack: LocalStack, program: str) -> int:
    """The pid of ``program``'s server: the supervised process itself (the predictor) or the
    server its launcher runs (java, tritonserver)."""
    pid = _supervised_pid(stack, program)
    if pid <= 0:
        raise AssertionError(f"supervisord runs no {program}")
    supervised = psutil.Process(pid)
    for process in [supervised, *supervised.children(recursive=True)]:
        if process.name().startswith(SERVER_NAMES[program]):
            return process.pid
    raise AssertionError(f"no {SERVER_NAMES[program]} process under {program}")


def _new_server(stack: LocalStack, program: str, killed: int) -> bool:
    try:
        return _server_pid(stack, program) != killed
    except (AssertionError, psutil.Error, ValueError):  # between two starts
        return False


def _kill_and_wait(stack: LocalStack, traffic: Traffic, program: str) -> None:
    """SIGKILL ``program``'s server; wait for supervisord's new one to be ready and answer."""
    killed = _server_pid(stack, program)
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(killed), 30, f"{program}'s server to die")
    wait_for(lambda: _new_server(stack, program, killed), 300, f"a new {program} server")
    wait_for(lambda: all(engines_ready(stack).values()), 300, f"{program} ready again")
    before = traffic.answered
    wait_for(lambda: traffic.answered >= before + 6, 60, f"answers after {program}")


def test_after_make_up_every_engine_serves_the_version_before_the_corrupt_one(
    corrupt_stack: CorruptStack,
) -> None:
    _assert_serving_previous(corrupt_stack)


@pytest.mark.timeout(900)
def test_each_engine_killed_with_sigkill_comes_back_on_it_with_zero_client_errors(
    corrupt_stack: CorruptStack,
) -> None:
    stack = corrupt_stack.stack
    with Traffic(stack, corrupt_stack.corrupt.published.images) as traffic:
        wait_for(lambda: traffic.answered >= 6, 60, "first answers")
        for program in BACKENDS:
            _kill_and_wait(stack, traffic, program)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.versions == {str(corrupt_stack.corrupt.good)}
    _assert_serving_previous(corrupt_stack)


@pytest.mark.timeout(900)
def test_make_down_then_make_up_starts_every_engine_on_it_again(
    corrupt_stack: CorruptStack,
) -> None:
    stack = corrupt_stack.stack
    stopped = stack.make("down")
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    started = stack.make("up")
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    _assert_serving_previous(corrupt_stack)
    with Traffic(stack, corrupt_stack.corrupt.published.images) as traffic:
        wait_for(lambda: traffic.answered >= 30, 120, "answers after make up")
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.versions == {str(corrupt_stack.corrupt.good)}
