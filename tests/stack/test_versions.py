"""New versions through the whole local stack under load (issue 16).

A stack of its own (`make up` on a copy of the session's repository) with several clients
sending through the gateway to every engine and to compare mode. A new version is published
(the real ``publish_checkpoint``) and `make reload` run: every engine serves it, as the
gateway's ``/readyz`` and the answers say, within the time README.md promises, and no request
fails. Then a version with one flipped byte in ``model.pt``: `make reload` fails (its command
exits 1) naming the refusal, every engine keeps serving the version before it and reports the
refusal with its reason in ``/readyz``, and again no request fails.

Answers the gateway failed over to another engine (``X-Failover-From``) are no failure for the
client; they are printed (run with ``-s``) so a run says which engine could not answer.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.publishing import move_into_place
from services.common.repository import read_manifest
from tests.conftest import (
    REPO_ROOT,
    LocalStack,
    PublishedModel,
    StackSlot,
    flip_byte,
    new_local_stack,
)
from tests.processes import wait_for
from tests.stack.test_local_stack import BACKENDS
from tests.stack.traffic import COMPARE, Traffic

pytestmark = pytest.mark.slow

#: README.md, "New versions, no restart": "every engine serves the new version within 2
#: minutes" (counted here from the moment the version is in the repository).
RELOAD_LIMIT_S = 120.0
#: Client threads sending at once (the development machine has two cores).
CLIENTS = 4
#: What each client sends to in turn: every engine, and all of them at once.
ROTATION = (*BACKENDS, COMPARE)


@dataclass
class VersionsStack:
    stack: LocalStack
    published: PublishedModel  # the session's model; ``repo`` is this stack's repository


@pytest.fixture(scope="module")
def versions_stack(
    published_model: PublishedModel,
    stack_slot: StackSlot,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VersionsStack]:
    base = tmp_path_factory.mktemp("versions-stack")
    repository = published_model.copy_repository(base)
    stack = new_local_stack(base, repository)
    try:
        stack_slot.hold(stack)
        yield VersionsStack(stack, dataclasses.replace(published_model, repo=repository))
    finally:
        stack_slot.release(stack)


def _readyz(stack: LocalStack) -> dict[str, dict[str, Any]]:
    backends: dict[str, dict[str, Any]] = httpx.get(
        f"{stack.gateway_url}/readyz", timeout=5
    ).json()["backends"]
    return backends


@dataclass
class Reload:
    """`make reload` while /readyz is watched: its result, and the seconds from ``since``
    until each engine's /readyz first showed ``version`` (absent: it never did)."""

    done: subprocess.CompletedProcess[str]
    seconds: dict[str, float]
    finished: float  # time.monotonic() when `make reload` returned


def _reload_watching(stack: LocalStack, version: int, since: float) -> Reload:
    process = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "reload"],
        cwd=REPO_ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, float] = {}

    def look() -> None:
        try:
            engines = _readyz(stack)
        except (httpx.HTTPError, ValueError, KeyError):
            return
        for backend in BACKENDS:
            state = engines.get(backend, {})
            if backend not in seen and state.get("ready") and state.get("version") == str(version):
                seen[backend] = time.monotonic() - since

    while process.poll() is None and time.monotonic() - since < 540:
        look()
        time.sleep(0.25)
    stdout, stderr = process.communicate(timeout=60)
    finished = time.monotonic()
    look()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return Reload(done, seen, finished)


def _wait_for_answers(traffic: Traffic, since: float, count: int, what: str) -> None:
    """Each of ``ROTATION``'s targets answered ``count`` requests sent after ``since``."""
    targets = [*BACKENDS, *(f"{COMPARE}/{b}" for b in BACKENDS)]
    wait_for(
        lambda: all(len(traffic.answers_since(since, t)) >= count for t in targets),
        180,
        what,
        interval=0.5,
    )


def _versions_since(traffic: Traffic, since: float) -> dict[str, set[str]]:
    targets = [*BACKENDS, *(f"{COMPARE}/{b}" for b in BACKENDS)]
    return {t: {a.version for a in traffic.answers_since(since, t)} for t in targets}


def _report(title: str, reload: Reload, traffic: Traffic) -> None:
    seconds = ", ".join(f"{b} {s:.1f}s" for b, s in sorted(reload.seconds.items()))
    print(
        f"\n{title}: /readyz on the new version after {seconds}; "
        f"`make reload` exit {reload.done.returncode}"
    )
    print(reload.done.stdout.rstrip())
    print(
        f"{traffic.answered} requests, {len(traffic.failures)} failed, "
        f"{len(traffic.failovers)} failed over"
    )
    for line in [*traffic.failures, *traffic.failovers][:20]:
        print(f"  {line[:500]}")


def _publish_corrupt(published: PublishedModel, scratch: Path) -> int:
    """Publish the session's checkpoint as the next version with one byte of ``model.pt``
    flipped, into the live repository without a moment in which the good files are there.

    Published into a copy first and the byte flipped there; then the version's folders are
    renamed into the live repository, the manifest's folder last, as publishing commits (a
    version exists once its manifest does). Publishing in place and flipping afterwards would
    let the predictor, which polls the repository by itself, load the good files first."""
    from training.publish import publish_checkpoint

    copy = published.copy_repository(scratch)
    bad = publish_checkpoint(published.checkpoint, copy)
    flip_byte(copy / f"{published.model}_torchscript" / str(bad) / "model.pt")
    manifest = read_manifest(copy, published.model, bad)
    for folder in [*manifest.folders, f"{published.model}/{bad}"]:
        move_into_place(copy / folder, published.repo / folder)
    return bad


def _publish_and_reload(
    stack: LocalStack, published: PublishedModel, publish: Callable[[], int], after: int
) -> tuple[int, Reload, Traffic]:
    """Under traffic from every client to every engine and compare mode: ``publish`` a version
    (newer than ``after``), then `make reload`, watching each engine's /readyz; the version,
    the reload and the traffic."""
    with Traffic(stack, published.images, threads=CLIENTS, backends=ROTATION) as traffic:
        _wait_for_answers(traffic, 0.0, 2, "first answers from every engine")
        version = publish()
        assert version > after
        reload = _reload_watching(stack, version, time.monotonic())
        _wait_for_answers(traffic, reload.finished, 5, "answers after `make reload`")
    return version, reload, traffic


@pytest.mark.timeout(1800)  # with the session model and the `make up` of the fixture
def test_a_new_version_is_served_by_every_engine_within_the_readme_time_with_no_failed_request(
    versions_stack: VersionsStack,
) -> None:
    from training.publish import publish_checkpoint

    stack, published = versions_stack.stack, versions_stack.published
    old = published.version
    engines = _readyz(stack)
    assert {b: engines[b]["version"] for b in BACKENDS} == dict.fromkeys(BACKENDS, str(old))
    new, reload, traffic = _publish_and_reload(
        stack,
        published,
        lambda: publish_checkpoint(published.checkpoint, published.repo),
        old,
    )
    _report(f"v{old} -> v{new}", reload, traffic)
    done = reload.done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert traffic.failures == [], traffic.failures[:10]
    assert set(reload.seconds) == set(BACKENDS), (reload.seconds, done.stdout)
    slow = {b: s for b, s in reload.seconds.items() if s > RELOAD_LIMIT_S}
    assert not slow, f"engines on v{new} only after more than {RELOAD_LIMIT_S:g}s: {slow}"
    # Requests sent once `make reload` returned are answered by the new version, by every
    # engine and by every row of compare mode; before, answers named only the two versions.
    assert _versions_since(traffic, reload.finished) == {
        t: {str(new)} for t in _versions_since(traffic, reload.finished)
    }
    assert traffic.versions == {str(old), str(new)}
    engines = _readyz(stack)
    assert {b: engines[b]["version"] for b in BACKENDS} == dict.fromkeys(BACKENDS, str(new))
    assert all(engines[b]["refused_versions"] == [] for b in BACKENDS), engines


@pytest.mark.timeout(1200)
def test_a_corrupt_version_is_refused_by_every_engine_which_keeps_serving_with_no_failed_request(
    versions_stack: VersionsStack, tmp_path: Path
) -> None:
    stack, published = versions_stack.stack, versions_stack.published
    engines = _readyz(stack)
    good = int(engines["predictor"]["version"])
    assert {b: engines[b]["version"] for b in BACKENDS} == dict.fromkeys(BACKENDS, str(good))
    bad, reload, traffic = _publish_and_reload(
        stack,
        published,
        lambda: _publish_corrupt(published, tmp_path),
        good,
    )
    _report(f"v{good} -> corrupt v{bad}", reload, traffic)
    done = reload.done
    # `python -m services.stack reload` exits 1; make says so and exits 2 itself.
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\breload\] Error 1$", done.stderr, re.MULTILINE), done.stderr[-3000:]
    for backend in BACKENDS:  # each engine's line, then its refusal
        assert f"{backend:<10} v{good}" in done.stdout, done.stdout
    assert done.stdout.count(f"refused v{bad}: ") == len(BACKENDS), done.stdout
    assert "sha256 mismatch" in done.stdout, done.stdout
    assert traffic.failures == [], traffic.failures[:10]
    assert reload.seconds == {}, f"an engine served the corrupt v{bad}: {reload.seconds}"
    assert traffic.versions == {str(good)}
    engines = _readyz(stack)
    for backend in BACKENDS:
        entry = engines[backend]
        assert entry["ready"] is True and entry["version"] == str(good), (backend, entry)
        refused = entry["refused_versions"]
        assert [int(r["version"]) for r in refused] == [bad], (backend, refused)
        assert refused[0]["reason"].startswith(
            f"{published.model}_torchscript/{bad}/model.pt: sha256 mismatch"
        ), (backend, refused)
