"""The README's quickstart, run as written against the real local stack (issue 16).

Every shell command of the README's "Quickstart" section (its fenced ```bash blocks: what a
new user types once `make up` is running) is either run here, in README order, with a check of
its exit status and of what it printed, or named in ``EXCEPTED`` with the reason. A command
that is neither fails :func:`test_every_quickstart_command_is_run_or_excepted`, which needs no
stack, so a README edit cannot add an untested command unnoticed.

The stack is the session's ``local_stack`` (tests/conftest.py), on the default ports but with
its run folder and repository in a temporary folder (``STACK_RUN_DIR``, ``STACK_REPOSITORY``).
The commands are written for a checkout's defaults, so :func:`as_run` rewrites exactly the
paths in ``SUBSTITUTIONS``, each with its reason; nothing else of a command is changed.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.stack.settings import StackSettings
from services.stack.supervisor import stack_processes
from tests.conftest import LocalStack, StackSlot

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BACKENDS = {"predictor", "torchserve", "triton"}

#: Quickstart commands not run here, with the reason (a GPU, Docker or a long benchmark).
#: Empty today: every command of the quickstart runs on the CPU-only local stack.
EXCEPTED: dict[str, str] = {}


def quickstart_commands(readme: str) -> list[str]:
    """The shell commands of the README's Quickstart section, in order.

    The section runs from its ``### Quickstart`` heading to the next heading; each fenced
    ```bash block is split into commands: comment lines are dropped, a line ending in ``\\``
    continues on the next, and a trailing ``# comment`` outside quotes is cut off.
    """
    lines = readme.splitlines()
    assert "### Quickstart" in lines, "README.md has no '### Quickstart' section"
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for line in lines[lines.index("### Quickstart") + 1 :]:
        if block is not None:  # inside a fence, where "# ..." is a shell comment
            if line.startswith("```"):
                blocks.append(block)
                block = None
            else:
                block.append(line)
        elif line.startswith("```"):
            block = [] if line.strip() == "```bash" else None
            if block is None:  # another language's fence: skip to its end
                raise AssertionError(f"the Quickstart has a fence other than bash: {line!r}")
        elif re.match(r"#{1,6} ", line):
            break
    assert blocks, "the Quickstart section has no ```bash block"
    commands: list[str] = []
    for fence in blocks:
        pending = ""
        for raw in fence:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append(_strip_comment(pending + line))
            pending = ""
        assert not pending, f"a command ends in a line continuation: {pending!r}"
    return commands


def _strip_comment(command: str) -> str:
    """``command`` without a trailing shell comment: a ``#`` starting a word, outside quotes."""
    quote = ""
    for index, char in enumerate(command):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or command[index - 1].isspace()):
            return command[:index].rstrip()
    return command.rstrip()


@dataclass(frozen=True)
class Substitution:
    """One path of a README command replaced for the test's stack, and why."""

    old: str
    new: Callable[[LocalStack], str]
    why: str


SUBSTITUTIONS = [
    Substitution(
        "runs/stack/",
        lambda stack: f"{stack.run_dir}/",
        "the fixture's stack runs in a temporary STACK_RUN_DIR, not the default runs/stack",
    ),
    Substitution(
        ".venv/bin/",
        lambda stack: f"{ROOT}/.venv/bin/",
        "the commands run in a temporary folder (their digit.png and body.json land there, "
        "not in the checkout), so the checkout's venv is named by its full path",
    ),
    Substitution(
        "make train-and-publish",
        lambda stack: f"make train-and-publish REPO={stack.repository}",
        "the Makefile's REPO defaults to model_repository; the fixture's stack serves its "
        "STACK_REPOSITORY",
    ),
    Substitution(
        "make ",
        lambda stack: f"make --no-print-directory -C {ROOT} -o .venv/.installed ",
        "make runs the checkout's Makefile from the temporary folder, and takes the venv as "
        "installed, as LocalStack.make does (a fresh checkout's pyproject.toml is newer)",
    ),
]


def as_run(command: str, stack: LocalStack) -> str:
    """``command`` with every substitution of ``SUBSTITUTIONS`` applied, in order."""
    for substitution in SUBSTITUTIONS:
        command = command.replace(substitution.old, substitution.new(stack))
    return command


@dataclass
class Run:
    """A README command's run: where it ran and what it printed."""

    cwd: Path
    stack: LocalStack
    stdout: str


def _answer(run: Run) -> dict[str, object]:
    answer = json.loads(run.stdout)
    assert isinstance(answer, dict), answer
    assert "error" not in answer, answer
    return answer


def _check_prediction(answer: dict[str, object], backend: str | None) -> None:
    """A `/predict` answer: a digit 0-9 with its score, from the engine asked for."""
    assert answer["model"] == "classifier", answer
    assert int(str(answer["version"])) >= 1, answer
    assert answer["backend"] in (BACKENDS if backend is None else {backend}), answer
    predictions = answer["predictions"]
    assert isinstance(predictions, list) and predictions, answer
    top = predictions[0]
    assert top["class_id"] in range(10), top
    assert top["label"] == str(top["class_id"]), top  # the digits' labels are "0" ... "9"
    assert 0.0 < top["score"] <= 1.0, top


def check_png(run: Run) -> None:
    assert (run.cwd / "digit.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def check_body(run: Run) -> None:
    body = json.loads((run.cwd / "body.json").read_text())
    assert list(body) == ["image"], body
    assert base64.b64decode(body["image"]) == (run.cwd / "digit.png").read_bytes()


def check_predict(run: Run) -> None:
    _check_prediction(_answer(run), None)


def check_predict_triton(run: Run) -> None:
    _check_prediction(_answer(run), "triton")


def check_compare(run: Run) -> None:
    answer = _answer(run)
    assert answer["agree"] is True, answer
    assert answer["version_mismatch"] is False, answer
    results = answer["results"]
    assert isinstance(results, list), answer
    assert {result["backend"] for result in results} == BACKENDS, answer
    for result in results:
        assert result["status"] == 200, result
        _check_prediction(result, result["backend"])
        assert result["latency_ms"] > 0, result


def check_torchserve_direct(run: Run) -> None:
    _check_prediction(_answer(run), "torchserve")


def check_status(run: Run) -> None:
    """Every program up in supervisord's view and every engine ready at the gateway.

    Right after `make up` an engine may still be ``STARTING``: supervisord counts it started
    only after its start window (60 s for the predictor, 120 s for Triton), while it already
    answers; anything else (``BACKOFF``, ``FATAL``, ``EXITED``) is a failure.
    """
    for program in ("gateway", "predictor", "torchserve", "triton", "prometheus"):
        assert re.search(rf"^{program}\s+(RUNNING|STARTING)\b", run.stdout, re.M), run.stdout
    readyz = json.loads(run.stdout[run.stdout.index("{") :])
    assert {name for name, state in readyz["backends"].items() if state["ready"]} == BACKENDS


def check_train_and_publish(run: Run) -> None:
    published = re.search(
        r"published classifier version (\d+) to .*: test accuracy (\d\.\d{4}), "
        r"train-and-publish took \d+\.\ds",
        run.stdout,
    )
    assert published, run.stdout
    assert int(published.group(1)) >= 2, run.stdout  # `make up` published version 1
    assert float(published.group(2)) > 0.5, run.stdout  # ten classes: chance is 0.1


def check_reload(run: Run) -> None:
    """Every engine on the newest published version (the one `make train-and-publish` made)."""
    newest = max(
        int(p.parent.name) for p in (run.stack.repository / "classifier").glob("*/manifest.json")
    )
    versions = dict(re.findall(r"^(predictor|torchserve|triton)\s+v(\d+)", run.stdout, re.M))
    assert versions == dict.fromkeys(BACKENDS, str(newest)), run.stdout
    assert "refused" not in run.stdout, run.stdout
    assert re.search(r"^reload took \d+\.\ds$", run.stdout, re.M), run.stdout


def check_down(run: Run) -> None:
    assert "stack stopped" in run.stdout, run.stdout
    settings = StackSettings(run_dir=run.stack.run_dir, repository=run.stack.repository)
    assert not stack_processes(settings), "a process of the stack survived `make down`"


#: Every quickstart command run here, as the README writes it, and the check of its output.
CHECKS: dict[str, Callable[[Run], None]] = {
    ".venv/bin/python -c 'from training.digits import held_out_pngs; "
    'open("digit.png", "wb").write(held_out_pngs(1)[0])\'': check_png,
    """printf '{"image": "%s"}' "$(base64 -w0 digit.png)" > body.json""": check_body,
    "curl -s localhost:8000/predict -H 'content-type: application/json' -d @body.json": (
        check_predict
    ),
    "curl -s 'localhost:8000/predict?backend=triton' -H 'content-type: application/json' "
    "-d @body.json": check_predict_triton,
    "curl -s 'localhost:8000/predict?backend=all' -H 'content-type: application/json' "
    "-d @body.json": check_compare,
    "curl -s localhost:8180/predictions/classifier -T digit.png "
    '-H "Authorization: Bearer $(jq -r .inference.key runs/stack/torchserve/key_file.json)"': (
        check_torchserve_direct
    ),
    "make status": check_status,
    "make train-and-publish": check_train_and_publish,
    "make reload": check_reload,
    "make down": check_down,  # last: the slot is told the stack is down (the next test starts it)
}


def test_every_quickstart_command_is_run_or_excepted() -> None:
    """No quickstart command goes untested, and no entry here names one the README dropped."""
    commands = quickstart_commands(README.read_text())
    assert len(commands) == len(set(commands)), commands
    unknown = [c for c in commands if c not in CHECKS and c not in EXCEPTED]
    assert not unknown, f"quickstart commands neither run nor excepted here: {unknown}"
    stale = sorted((set(CHECKS) | set(EXCEPTED)) - set(commands))
    assert not stale, f"entries for commands the quickstart no longer has: {stale}"
    assert not set(CHECKS) & set(EXCEPTED), "a command both run and excepted"


def test_comments_are_cut_outside_quotes_only() -> None:
    """The splitter keeps a ``#`` inside quotes or a word, and cuts a trailing comment."""
    assert _strip_comment("make status   # the view") == "make status"
    assert _strip_comment("echo '# kept' \"a #b\" x#y") == "echo '# kept' \"a #b\" x#y"
    text = "### Quickstart\n```bash\n# a comment\ncurl a \\\n  -d b  # c\n```\n## Next\n"
    assert quickstart_commands(text) == ["curl a -d b"]


@pytest.mark.timeout(900)  # the stack's start (up to 540 s, as LocalStack.make allows) + ~3 min
def test_quickstart_runs_as_written(
    local_stack: LocalStack, stack_slot: StackSlot, tmp_path: Path
) -> None:
    """Each quickstart command, in README order, exits 0 and prints what the README says."""
    # The README's localhost:8000 / :8180 are the fixture's own ports: nothing to substitute.
    assert local_stack.gateway_url == "http://127.0.0.1:8000"
    assert local_stack.torchserve_url == "http://127.0.0.1:8180"
    for command in quickstart_commands(README.read_text()):
        if command in EXCEPTED:
            continue
        shell = as_run(command, local_stack)
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-o", "errexit", "-o", "pipefail", "-c", shell],
            cwd=tmp_path,
            env=local_stack.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{shell}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        CHECKS[command](Run(tmp_path, local_stack, done.stdout))
        print(f"{time.monotonic() - started:6.1f} s  {command}")  # shown by pytest -rA
        if command == "make down":
            stack_slot.stopped(local_stack)
