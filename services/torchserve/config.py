"""TorchServe settings (env prefix ``TORCHSERVE_``) and the ``config.properties`` they render.

One settings class drives both uses:

* local (``python -m services.torchserve up``): everything bound to 127.0.0.1, files under the
  run folder;
* compose: inference and metrics on 0.0.0.0 inside the container, management on the compose
  network only (the port is not published to the host), the same security settings.

How the model batches is not a TorchServe setting: it is the ``serving`` block of the version
registered (:class:`~services.common.serving.ServingConfig`, written by publish), turned into
TorchServe's registration by :func:`registration`: ``max_batch_size`` -> ``batchSize``,
``max_batch_delay_ms`` rounded up -> ``maxBatchDelay``, ``instance_count`` -> min/max workers.
``TORCHSERVE_BATCH_SIZE``, ``TORCHSERVE_MAX_BATCH_DELAY_MS`` and ``TORCHSERVE_WORKERS`` are
optional overrides of those values for this one server (unset: the model's); ``status`` and
``--settings`` name each one in effect.

The checked-in ``config.local.properties`` and ``config.compose.properties`` are this
renderer's output for the two profiles with the default serving config (a test keeps them in
sync), so they can be read or used with a plain ``torchserve --ts-config``.

Security choices (README "TorchServe"):

* token authorization stays ON (TorchServe 0.12 default): TorchServe writes
  ``key_file.json`` (inference, management and API keys) into its working directory, the run
  folder, which is created with mode 0700. ``TORCHSERVE_TOKEN_AUTHORIZATION=false`` turns it
  off, for Kubernetes only (deploy/kubernetes): there several replicas sit behind one Service,
  each with keys of its own that no gateway pod could read, and a NetworkPolicy lets only the
  gateway reach the inference API while the management API stays on the pod's loopback;
* the management API listens on loopback locally; ``enable_model_api`` is on so that new
  versions can be registered without a restart, but ``allowed_urls`` only matches archives
  already in this instance's model store: nobody can make TorchServe download code, and
  registering needs the management key plus write access to the run folder;
* no per-model pip installs, no configuration from environment variables, a capped JVM heap.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.http import DEFAULT_MAX_BODY_BYTES
from services.common.serving import ServingConfig, find_overrides

#: Where TorchServe writes its token-authorization keys, in its working directory.
KEY_FILE_NAME = "key_file.json"

#: Beside the key file: the published versions the launcher refused to serve, and why (a JSON
#: list of ``{"version", "reason"}``, newest first), read by ``status`` and the gateway.
REFUSED_FILE_NAME = "refused_versions.json"

#: The metrics file (TorchServe 0.12's default metrics + the handler's batch counter); the
#: launcher copies it into the run folder.
METRICS_CONFIG = Path(__file__).with_name("metrics.yaml")

Profile = Literal["local", "compose"]


class TorchServeSettings(BaseSettings):
    """Every knob of the local TorchServe instance; each one can be set as TORCHSERVE_<NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="TORCHSERVE_",
        extra="forbid",
        env_ignore_empty=True,
        validate_default=True,
        use_attribute_docstrings=True,  # the docstrings below become field descriptions
    )

    repository: Path = Path("model_repository")
    """Model repository written by `python -m training publish` (Triton layout)."""
    model: str = Field(default="classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
    """Model name: the repository folder and TorchServe's model name."""
    version: int | None = Field(default=None, ge=1)
    """Version to serve at start; None serves the newest published version."""
    run_dir: Path = Path("runs/torchserve")
    """Instance folder: config.properties, key_file.json, tmp/ (TMPDIR), logs/, model_store/."""
    host: str = "127.0.0.1"
    """Address the inference and metrics APIs bind to (0.0.0.0 inside a container)."""
    management_host: str = "127.0.0.1"
    """Address the management API binds to: loopback locally, the internal network in compose."""
    inference_port: int = Field(default=8180, ge=1, le=65535)
    """Inference API port (/predictions/<model>, /ping)."""
    management_port: int = Field(default=8181, ge=1, le=65535)
    """Management API port (/models): register, scale, describe; needs the management key."""
    metrics_port: int = Field(default=8182, ge=1, le=65535)
    """Prometheus metrics port (/metrics, ts_* and the handler's HandlerBatches)."""
    grpc_inference_port: int = Field(default=8183, ge=1, le=65535)
    """gRPC inference port (TorchServe always opens it; bound like `host`)."""
    grpc_management_port: int = Field(default=8184, ge=1, le=65535)
    """gRPC management port (bound like `management_host`)."""
    workers: int | None = Field(default=None, ge=1, le=64)
    """Override of the model's serving ``instance_count``: Python workers for the model (each
    one a process holding it); unset keeps the model's."""
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Override of the model's ``max_batch_size``: most requests TorchServe hands the handler in
    one batch; unset keeps the model's."""
    max_batch_delay_ms: int | None = Field(default=None, ge=0, le=10_000)
    """Override of the model's ``max_batch_delay_ms`` (whole ms): how long TorchServe waits to
    fill a batch; unset keeps the model's (rounded up)."""
    response_timeout_s: int = Field(default=30, ge=1)
    """A worker that takes longer than this on one batch is restarted."""
    job_queue_size: int = Field(default=100, ge=1)
    """Requests queued per model before TorchServe answers 503."""
    max_request_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    """Largest request body TorchServe accepts (413 above); matches the gateway's limit."""
    jvm_heap_mb: int = Field(default=512, ge=128)
    """Java heap cap (-Xmx) of the frontend."""
    token_authorization: bool = True
    """Require TorchServe's keys (key_file.json) on every call; off only where the network
    keeps everyone but the gateway away (the Kubernetes manifests' NetworkPolicy)."""
    token_expiration_min: int = Field(default=7 * 24 * 60, ge=1)
    """Lifetime of the inference and management keys (TorchServe's default is 60)."""
    enable_model_api: bool = True
    """Allow registering versions through the management API (`reload`); off = restart."""
    number_of_gpu: int | None = Field(default=None, ge=0)
    """GPUs TorchServe may use; None lets it detect them (CUDA is used when present)."""
    start_timeout_s: float = Field(default=180.0, gt=0)
    """How long `up` waits for the model's workers to be READY."""
    stop_timeout_s: float = Field(default=30.0, gt=0)
    """How long `down` waits after SIGTERM before it SIGKILLs what is left."""

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        ports = [
            self.inference_port,
            self.management_port,
            self.metrics_port,
            self.grpc_inference_port,
            self.grpc_management_port,
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(f"TorchServe ports must be distinct, got {ports}")
        return self

    # Paths inside the run folder (absolute, because TorchServe runs with cwd = run folder).
    @property
    def run_path(self) -> Path:
        return self.run_dir.expanduser().resolve()

    @property
    def repository_path(self) -> Path:
        return self.repository.expanduser().resolve()

    @property
    def tmp_dir(self) -> Path:
        return self.run_path / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.run_path / "logs"

    @property
    def model_store(self) -> Path:
        return self.run_path / "model_store"

    @property
    def config_file(self) -> Path:
        return self.run_path / "config.properties"

    @property
    def metrics_file(self) -> Path:
        return self.run_path / "metrics.yaml"

    @property
    def key_file(self) -> Path:
        return self.run_path / KEY_FILE_NAME

    def _client_host(self, host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    @property
    def inference_url(self) -> str:
        return f"http://{self._client_host(self.host)}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self._client_host(self.management_host)}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host(self.host)}:{self.metrics_port}"


@dataclass(frozen=True)
class Keys:
    """The keys of TorchServe's key_file.json this project uses (it also holds an "API" key,
    for the model API, which stays off)."""

    inference: str
    management: str


#: What an instance with token authorization off is called with: no key, no header.
NO_KEYS = Keys(inference="", management="")


def auth_header(key: str) -> dict[str, str]:
    """The ``Authorization`` header that carries ``key``; none for an empty key (token
    authorization off)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def instance_keys(settings: TorchServeSettings) -> Keys:
    """The keys to call this instance with: its key_file.json, or :data:`NO_KEYS` when token
    authorization is off (raises like :func:`read_keys`)."""
    return read_keys(settings.key_file) if settings.token_authorization else NO_KEYS


def read_keys(key_file: Path) -> Keys:
    """Parse TorchServe 0.12's key_file.json (raises FileNotFoundError/ValueError)."""
    data = json.loads(key_file.read_text())
    try:
        return Keys(
            inference=str(data["inference"]["key"]),
            management=str(data["management"]["key"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{key_file} has an unexpected shape: {exc}") from None


def read_refused_versions(path: Path) -> list[dict[str, Any]]:
    """The launcher's ``refused_versions.json`` (raises FileNotFoundError/ValueError)."""
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all(
        isinstance(entry, dict) and {"version", "reason"} <= set(entry) for entry in data
    ):
        raise ValueError(f"{path} is not a list of {{version, reason}}")
    return data


def mar_name(model: str, version: int) -> str:
    """File name of a version's archive inside the model store (one file per version)."""
    return f"{model}-v{version}.mar"


@dataclass(frozen=True)
class Registration:
    """How TorchServe batches one version: the model's serving config, overrides applied."""

    batch_size: int
    max_batch_delay_ms: int
    workers: int
    #: The overrides in effect: variable -> {"value": the override, "field": the serving
    #: config's field it replaces, "model": that field's value in TorchServe's unit}.
    overrides: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def registration(settings: TorchServeSettings, serving: ServingConfig) -> Registration:
    """TorchServe's batch size, batch delay (whole ms, rounded up) and workers for a version
    whose manifest says ``serving``, with the ``TORCHSERVE_*`` overrides that are set."""
    model_values = {  # setting -> (the serving field it stands for, its value)
        "batch_size": ("max_batch_size", serving.max_batch_size),
        "max_batch_delay_ms": ("max_batch_delay_ms", math.ceil(serving.max_batch_delay_ms)),
        "workers": ("instance_count", serving.instance_count),
    }
    values = {
        name: int(getattr(settings, name) or value) for name, (_, value) in model_values.items()
    }
    found = find_overrides(settings, model_values)
    return Registration(
        batch_size=values["batch_size"],
        max_batch_delay_ms=values["max_batch_delay_ms"],
        workers=values["workers"],
        overrides={
            o.variable: {"value": int(o.value), "field": o.field, "model": o.model_value}
            for o in found
        },
    )


def model_entry(
    settings: TorchServeSettings, version: int, serving: ServingConfig | None = None
) -> dict[str, object]:
    """The per-version settings TorchServe reads from ``models=`` (and ``reload`` passes)."""
    reg = registration(settings, serving or ServingConfig())
    return {
        "defaultVersion": True,
        "marName": mar_name(settings.model, version),
        "minWorkers": reg.workers,
        "maxWorkers": reg.workers,
        "batchSize": reg.batch_size,
        "maxBatchDelay": reg.max_batch_delay_ms,
        "responseTimeout": settings.response_timeout_s,
    }


def render_config(
    settings: TorchServeSettings,
    version: int,
    *,
    serving: ServingConfig | None = None,
    model_store: str | None = None,
    metrics_config: str | None = None,
    profile: Profile = "local",
) -> str:
    """``config.properties`` text for serving ``version`` of ``settings.model``, whose manifest
    says ``serving`` (None: the serving defaults, as in the checked-in profiles)."""
    store = model_store or str(settings.model_store)
    metrics = metrics_config or str(settings.metrics_file)
    entry = model_entry(settings, version, serving)
    models = {settings.model: {str(version): entry}}
    lines = [
        f"# TorchServe {profile} configuration, rendered by services/torchserve/config.py",
        "# from TorchServeSettings (env prefix TORCHSERVE_) and the version's serving config",
        "# (batchSize, maxBatchDelay, workers). Edit those, not this file.",
        f"inference_address=http://{settings.host}:{settings.inference_port}",
        f"management_address=http://{settings.management_host}:{settings.management_port}",
        f"metrics_address=http://{settings.host}:{settings.metrics_port}",
        f"grpc_inference_address={settings.host}",
        f"grpc_inference_port={settings.grpc_inference_port}",
        f"grpc_management_address={settings.management_host}",
        f"grpc_management_port={settings.grpc_management_port}",
        f"model_store={store}",
        f"load_models={mar_name(settings.model, version)}",
        "models=" + json.dumps(models, separators=(",", ":")),
        f"default_workers_per_model={entry['minWorkers']}",
        f"job_queue_size={settings.job_queue_size}",
        f"default_response_timeout={settings.response_timeout_s}",
        f"max_request_size={settings.max_request_bytes}",
        "metrics_mode=prometheus",
        f"metrics_config={metrics}",
        *(
            [
                "# Token authorization ON: keys in key_file.json in the working directory.",
                "disable_token_authorization=false",
                f"token_expiration_min={settings.token_expiration_min}",
                "# Registering versions needs the management key; only archives already in the",
            ]
            if settings.token_authorization
            else [
                "# Token authorization OFF: only the network keeps callers out (Kubernetes:",
                "# the NetworkPolicy lets only the gateway reach the inference API).",
                "disable_token_authorization=true",
                "# Registering needs the management API; only archives already in the",
            ]
        ),
        "# model store can be registered (allowed_urls matches nothing else).",
        f"enable_model_api={'true' if settings.enable_model_api else 'false'}",
        f"allowed_urls=file://{store}/[^/]+[.]mar",
        "install_py_dep_per_model=false",
        "enable_envvars_config=false",
        f"vmargs=-Xmx{settings.jvm_heap_mb}m -XX:+ExitOnOutOfMemoryError",
    ]
    if settings.number_of_gpu is not None:
        lines.append(f"number_of_gpu={settings.number_of_gpu}")
    return "\n".join(lines) + "\n"


def profile_settings(profile: Profile) -> TorchServeSettings:
    """Default settings of a profile, ignoring the environment (for the checked-in files)."""
    if profile == "local":
        return TorchServeSettings.model_construct()
    # Compose mounts the repository at /models and keeps the run folder (key file included)
    # on a volume the gateway reads; management listens on the compose network, unpublished.
    return TorchServeSettings.model_construct(
        repository=Path("/models"),
        run_dir=Path("/srv/torchserve"),
        host="0.0.0.0",
        management_host="0.0.0.0",
    )


def render_profile(profile: Profile, version: int = 1) -> str:
    """The checked-in reference file of a profile (paths as the profile lays them out)."""
    settings = profile_settings(profile)
    # The local run folder is relative to the repository root here; the launcher writes
    # absolute paths.
    run = settings.run_dir.as_posix()
    return render_config(
        settings,
        version,
        model_store=f"{run}/model_store",
        metrics_config=f"{run}/metrics.yaml",
        profile=profile,
    )
