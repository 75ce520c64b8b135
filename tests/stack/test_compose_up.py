"""`docker compose up` for real: the project's images built, the stack brought up on a Docker
engine, checked against real digits, taken down, nothing left behind (`make compose-test`).

The engine is the machine's own, or a dockerd this test starts (tests/docker_engine.py). What
no registry can give here comes from Debian packages and is used by the test only
(tests/stack/compose/compose.test.yaml says which and why): the Python base image, Prometheus,
and the project's own image running the local tritonserver in place of NGC Triton. Grafana is
not started (its provisioning is checked in test_compose_static.py).

The stack comes up once for the module (:func:`stack`); the tests run in file order against
it, the destructive ones (killing the predictor, scaling it) last.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.docker_engine import CACHE_DIR, Engine, base_image, docker_engine, wheel_mirror
from tests.processes import free_ports, wait_for
from tests.stack.test_compose_static import COMPOSE_FILE, CPU_OVERRIDE, compose_binary
from training.digits import HeldOutDigit, held_out_digits

# A cold build of the images alone takes longer than the suite's 600 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
TEST_OVERRIDE = REPO / "tests" / "stack" / "compose" / "compose.test.yaml"
PROJECT = "image-serving-stack-test"
BACKENDS = ("predictor", "torchserve", "triton")
SERVERS = ("predictor", "torchserve", "triton", "gateway", "prometheus")
IMAGES = {
    "app": "image-serving-stack-test/app:0.1.0",
    "torchserve": "image-serving-stack-test/torchserve:0.1.0",
    "prometheus": "image-serving-stack-test/prometheus:0.1.0",
}


@dataclass
class ComposeStack:
    engine: Engine
    gateway_url: str
    prometheus_url: str
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        command = [str(compose_binary()), "-p", PROJECT, "--project-directory", str(REPO)]
        for file in (COMPOSE_FILE, CPU_OVERRIDE, TEST_OVERRIDE):
            command += ["-f", str(file)]
        done = subprocess.run(
            [*command, *args],
            cwd=REPO,
            env=self.engine.env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                f"{(done.stdout + done.stderr)[-6000:]}\n{self.diagnosis()}"
            )
        return done.stdout + done.stderr

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """``docker inspect`` of the project's containers (of one service), running or not."""
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service is not None:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = self.engine.docker_cli("ps", "-aq", *filters).split()
        return self.engine.inspect(*ids) if ids else []

    def diagnosis(self) -> str:
        """Each container's state, last health probe and log tail: why something failed."""
        lines = []
        try:
            for container in self.containers():
                state = container["State"]
                health = state.get("Health") or {}
                probes = health.get("Log") or [{}]
                lines.append(
                    f"--- {container['Name']}: {state['Status']} exit={state['ExitCode']} "
                    f"health={health.get('Status')} probe={probes[-1].get('Output', '')!r}"
                )
                logs = subprocess.run(
                    [self.engine.docker, "logs", "--tail", "25", container["Id"]],
                    env=self.engine.env(),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                lines.append((logs.stdout + logs.stderr)[-2500:])
        except Exception as exc:  # diagnosis must not hide the failure it explains
            lines.append(f"(no diagnosis: {exc})")
        return "\n".join(lines)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={PROJECT}"
        return {
            kind: self.engine.docker_cli(*command, "--filter", label).split()
            for kind, command in {
                "containers": ("ps", "-aq"),
                "networks": ("network", "ls", "-q"),
                "volumes": ("volume", "ls", "-q"),
            }.items()
        }


def _stamp(value: str) -> float:
    """Seconds since the epoch of one of Docker's RFC 3339 times (nanoseconds cut to micro)."""
    day, _, rest = value.partition("T")
    clock = rest.rstrip("Z").split("+")[0]
    whole, _, fraction = clock.partition(".")
    parsed = datetime.fromisoformat(f"{day}T{whole}.{(fraction + '000000')[:6]}+00:00")
    return parsed.timestamp()


def timeline(stack: ComposeStack) -> str:
    """When each container started, finished (the trainer) and first passed its healthcheck
    (of the last five probes Docker keeps), in seconds from the first start: where `up --wait`
    spent its time."""
    rows = []
    for container in stack.containers():
        state = container["State"]
        probes = (state.get("Health") or {}).get("Log") or []
        healthy_at = next((p["End"] for p in probes if p.get("ExitCode") == 0), None)
        finished = state["FinishedAt"] if not state["Running"] else None
        rows.append((container["Name"].lstrip("/"), state["StartedAt"], finished, healthy_at))
    origin = min(_stamp(started) for _, started, _, _ in rows)
    lines = ["compose-test timeline (s from the first start):"]
    for name, started, finished, healthy_at in sorted(rows, key=lambda r: r[1]):
        line = f"  {name}: started {_stamp(started) - origin:.0f}"
        if finished is not None and not finished.startswith("0001"):
            line += f", exited {_stamp(finished) - origin:.0f}"
        if healthy_at is not None:
            line += f", healthy {_stamp(healthy_at) - origin:.0f}"
        lines.append(line)
    return "\n".join(lines)


def _tear_down(stack: ComposeStack) -> None:
    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=300)
    left = stack.leftovers()
    assert not any(left.values()), f"compose down left {left}"


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    """Engine, base image, images built, `up --wait`; afterwards down with volumes and the
    engine stopped when this test started it."""
    started = time.monotonic()
    with docker_engine() as engine:
        print(f"\ncompose-test phase: engine {time.monotonic() - started:.0f}s")
        started = time.monotonic()
        base = base_image(engine)
        print(f"compose-test phase: base image {time.monotonic() - started:.0f}s")
        gateway_port, prometheus_port = free_ports(2)
        stack = ComposeStack(
            engine,
            gateway_url=f"http://127.0.0.1:{gateway_port}",
            prometheus_url=f"http://127.0.0.1:{prometheus_port}",
            env={
                "COMPOSE_TEST_BASE_IMAGE": base,
                "COMPOSE_TEST_GATEWAY_PORT": str(gateway_port),
                "COMPOSE_TEST_PROMETHEUS_PORT": str(prometheus_port),
            },
        )
        # A run killed half-way leaves its project behind: start from nothing.
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        try:
            log = CACHE_DIR / "build.log"
            with wheel_mirror(engine):
                started = time.monotonic()
                log.write_text(stack.compose("--progress", "plain", "build", timeout=2000))
            print(f"compose-test phase: build {time.monotonic() - started:.0f}s (log: {log})")
            for image in (base, *IMAGES.values()):
                size = int(engine.docker_cli("image", "inspect", "--format", "{{.Size}}", image))
                print(f"compose-test image: {image} {size / 1e9:.2f} GB")
            started = time.monotonic()
            stack.compose("up", "--wait", "--wait-timeout", "600", timeout=700)
            print(f"compose-test phase: up --wait {time.monotonic() - started:.0f}s")
            print(timeline(stack))
            yield stack
        finally:
            started = time.monotonic()
            _tear_down(stack)
            print(f"compose-test phase: down {time.monotonic() - started:.0f}s")
        started = time.monotonic()
    print(f"compose-test phase: engine stop {time.monotonic() - started:.0f}s")


# --------------------------------------------------------------------------- helpers


def predict(url: str, digit: HeldOutDigit, backend: str, timeout: float = 30) -> httpx.Response:
    body = {"image": base64.b64encode(digit.png).decode()}
    return httpx.post(f"{url}/predict", params={"backend": backend}, json=body, timeout=timeout)


def engines_ready(stack: ComposeStack) -> dict[str, bool]:
    try:
        body = httpx.get(f"{stack.gateway_url}/readyz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {name: bool(state["ready"]) for name, state in body["backends"].items()}


def in_container(stack: ComposeStack, container_id: str, *command: str) -> str:
    return stack.engine.docker_cli("exec", container_id, *command, timeout=60)


def healthy(container: dict[str, Any]) -> bool:
    state = container["State"]
    return bool(state["Running"] and (state.get("Health") or {}).get("Status") == "healthy")


@dataclass
class Load:
    """Requests through the gateway from a few threads until stopped: every answer kept."""

    url: str
    backend: str
    digit: HeldOutDigit
    threads: int = 4
    answers: list[tuple[int, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                response = predict(self.url, self.digit, self.backend, timeout=60)
            except httpx.HTTPError as exc:  # a lost request: the gateway itself failed us
                self.errors.append(repr(exc))
                continue
            self.answers.append(
                (
                    response.status_code,
                    response.headers.get("x-backend", ""),
                    response.headers.get("x-failover-from", ""),
                )
            )

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._work) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=90)


# --------------------------------------------------------------------------- the checks


def test_trainer_published_version_1_and_exited_0(stack: ComposeStack) -> None:
    [trainer] = stack.containers("trainer")
    assert trainer["State"]["Status"] == "exited"
    assert trainer["State"]["ExitCode"] == 0
    [predictor] = stack.containers("predictor")
    listing = in_container(stack, predictor["Id"], "ls", "/srv/models/repository/classifier")
    assert listing.split() == ["1"] or "1" in listing.split(), listing
    manifest = json.loads(
        in_container(
            stack, predictor["Id"], "cat", "/srv/models/repository/classifier/1/manifest.json"
        )
    )
    assert manifest["version"] == 1


def test_every_service_is_healthy_and_the_gateway_sees_three_ready_engines(
    stack: ComposeStack,
) -> None:
    for service in SERVERS:
        containers = stack.containers(service)
        assert containers, f"no {service} container"
        for container in containers:
            assert healthy(container), f"{service}: {container['State']}"
    assert engines_ready(stack) == dict.fromkeys(BACKENDS, True)


def test_predict_through_each_backend_and_compare_mode_gives_the_true_digit(
    stack: ComposeStack,
) -> None:
    digits = held_out_digits(20)
    top1: dict[str, list[int]] = {}
    for backend in BACKENDS:
        answers = []
        for digit in digits:
            response = predict(stack.gateway_url, digit, backend)
            assert response.status_code == 200, response.text
            assert response.headers["x-backend"] == backend
            body = response.json()
            assert body["model"] == "classifier" and body["version"] == "1"
            answers.append(body["predictions"][0]["class_id"])
        top1[backend] = answers
        correct = sum(a == d.label for a, d in zip(answers, digits, strict=True))
        assert correct >= 18, f"{backend}: {correct}/20 right ({answers})"
    assert top1["predictor"] == top1["torchserve"] == top1["triton"]
    digit = next(d for d, a in zip(digits, top1["predictor"], strict=True) if a == d.label)
    response = predict(stack.gateway_url, digit, "all")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["agree"] is True and sorted(body["answered"]) == sorted(BACKENDS)
    for result in body["results"]:
        assert result["predictions"][0]["class_id"] == digit.label, result


def _prometheus(stack: ComposeStack, query: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=10
    )
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def test_prometheus_scrapes_every_target_and_the_gateway_histogram_per_backend(
    stack: ComposeStack,
) -> None:
    def all_up() -> bool:
        targets = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=10).json()
        active = targets["data"]["activeTargets"]
        return {t["labels"]["job"] for t in active} == {*SERVERS} and all(
            t["health"] == "up" for t in active
        )

    wait_for(all_up, 60, "every Prometheus target up", interval=1)
    digit = held_out_digits(1)[0]
    for backend in BACKENDS:
        for _ in range(3):
            assert predict(stack.gateway_url, digit, backend).status_code == 200
    query = "sum by (backend) (gateway_request_duration_seconds_count)"

    def counted() -> dict[str, float]:
        return {r["metric"]["backend"]: float(r["value"][1]) for r in _prometheus(stack, query)}

    wait_for(
        lambda: all(counted().get(backend, 0) >= 3 for backend in BACKENDS),
        60,
        "the gateway histogram's requests of every backend in Prometheus",
        interval=1,
    )


def test_only_the_gateway_is_published_engines_stay_internal_and_unprivileged(
    stack: ComposeStack,
) -> None:
    published: dict[str, list[str]] = {}
    for container in stack.containers():
        service = container["Config"]["Labels"]["com.docker.compose.service"]
        bindings = container["HostConfig"]["PortBindings"] or {}
        published[service] = sorted(
            f"{b['HostIp']}:{b['HostPort']}->{port}"
            for port, hosts in bindings.items()
            for b in hosts
        )
        networks = set(container["NetworkSettings"]["Networks"])
        if service in BACKENDS:
            assert networks == {f"{PROJECT}_backend"}, (service, networks)
        if service == "trainer":
            assert networks == {"none"}
            continue
        # Inside: the main process runs as a non-root user, with no capability and no way to
        # gain privileges.
        status = dict(
            line.split(":", 1)
            for line in in_container(stack, container["Id"], "cat", "/proc/1/status").splitlines()
            if ":" in line
        )
        uid = int(status["Uid"].split()[0])
        assert uid != 0, f"{service} runs as root"
        assert status["NoNewPrivs"].strip() == "1", service
        assert int(status["CapEff"], 16) == 0, service
        assert int(status["CapBnd"], 16) == 0, service
    gateway_port = stack.gateway_url.rsplit(":", 1)[1]
    prometheus_port = stack.prometheus_url.rsplit(":", 1)[1]
    assert {s: p for s, p in published.items() if p} == {
        "gateway": [f"127.0.0.1:{gateway_port}->8000/tcp"],
        "prometheus": [f"127.0.0.1:{prometheus_port}->9090/tcp"],
    }
    backend = stack.engine.inspect(f"{PROJECT}_backend")[0]
    assert backend["Internal"] is True


def _restarted_and_healthy(stack: ComposeStack, service: str, restarts_before: int) -> bool:
    containers = stack.containers(service)
    return bool(containers) and all(
        c["RestartCount"] > restarts_before and healthy(c) for c in containers
    )


def crash(container: dict[str, Any]) -> None:
    """SIGKILL the container's main process from the host, as a segfault or the OOM killer
    would end it. Not `docker kill`: Docker documents (docker-kill(1)) that a kill with a fatal
    signal disables the restart policy until the container is next started, so `restart:
    unless-stopped` brings back a crashed engine, never one killed or stopped by hand. Not
    `docker exec ... kill -9 1` either: the kernel ignores SIGKILL sent to a PID namespace's
    init from inside it."""
    pid = int(container["State"]["Pid"])
    assert pid > 0, container["State"]
    try:
        os.kill(pid, signal.SIGKILL)
    except PermissionError:
        pytest.fail(f"cannot kill the container's process {pid}: run as root on the engine's host")


def test_crashed_predictor_fails_over_without_5xx_and_comes_back(stack: ComposeStack) -> None:
    [predictor] = stack.containers("predictor")
    restarts = predictor["RestartCount"]
    digit = held_out_digits(1)[0]
    with Load(stack.gateway_url, "predictor", digit) as load:
        wait_for(lambda: len(load.answers) >= 20, 60, "load before the kill")
        crash(predictor)
        wait_for(
            lambda: _restarted_and_healthy(stack, "predictor", restarts),
            240,
            "the restart policy bringing the predictor back, healthy",
            interval=1,
        )
        wait_for(
            lambda: engines_ready(stack) == dict.fromkeys(BACKENDS, True),
            60,
            "/readyz green again",
            interval=0.5,
        )
        settled = len(load.answers)
        wait_for(lambda: len(load.answers) >= settled + 20, 60, "load after the restart")
    statuses = Counter(status for status, _, _ in load.answers)
    assert not load.errors, load.errors[:5]
    assert set(statuses) == {200}, statuses
    failed_over = [a for a in load.answers if a[2] == "predictor"]
    assert failed_over, "no request failed over while the predictor was down"
    assert all(backend in ("torchserve", "triton") for _, backend, _ in failed_over)
    assert load.answers[-1][1] == "predictor"  # served by the predictor again at the end


#: Run inside a predictor container: the images it classified so far (every route).
_IMAGES_SCRIPT = """
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8100/metrics", timeout=10).read().decode()
print(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
          if line.startswith("predictor_images_total")))
"""


def images_classified(stack: ComposeStack, container: dict[str, Any]) -> float:
    return float(in_container(stack, container["Id"], "python", "-c", _IMAGES_SCRIPT))


def test_scaled_predictor_spreads_requests_and_losing_a_replica_loses_none(
    stack: ComposeStack,
) -> None:
    # --no-deps: the trainer has done its job (starting it again would only find version 1).
    stack.compose(
        "up", "--detach", "--wait", "--wait-timeout", "300", "--no-deps",
        "--scale", "predictor=2", "predictor",
        timeout=400,
    )  # fmt: skip
    replicas = stack.containers("predictor")
    assert len(replicas) == 2 and all(healthy(c) for c in replicas), [c["State"] for c in replicas]
    digit = held_out_digits(1)[0]
    # The gateway resolves `predictor` again every GATEWAY_RESOLVE_INTERVAL_S (5 s): once it
    # has, both replicas get calls.
    before = {c["Id"]: images_classified(stack, c) for c in replicas}

    def both_served() -> bool:
        for _ in range(5):
            response = predict(stack.gateway_url, digit, "predictor")
            assert response.status_code == 200 and response.headers["x-backend"] == "predictor"
        return all(images_classified(stack, c) > before[c["Id"]] for c in replicas)

    wait_for(both_served, 60, "requests reaching both predictor replicas", interval=0.5)
    before = {c["Id"]: images_classified(stack, c) for c in replicas}
    for _ in range(20):
        assert predict(stack.gateway_url, digit, "predictor").status_code == 200
    shares = {c["Id"][:12]: images_classified(stack, c) - before[c["Id"]] for c in replicas}
    # In turn, one call each; the gateway's readiness checks take turns too.
    assert all(share >= 5 for share in shares.values()), shares

    victim = replicas[0]
    with Load(stack.gateway_url, "predictor", digit) as load:
        wait_for(lambda: len(load.answers) >= 20, 60, "load before the kill")
        crash(victim)
        # Long enough for the gateway to resolve the name again without the dead replica.
        time.sleep(12)
    statuses = Counter(status for status, _, _ in load.answers)
    assert not load.errors, load.errors[:5]
    assert set(statuses) == {200}, statuses
    served = Counter(backend for _, backend, _ in load.answers)
    # The surviving replica answered every call the dead one would have had: none failed
    # over to another engine.
    assert set(served) == {"predictor"}, served
