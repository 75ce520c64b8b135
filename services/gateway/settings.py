"""The gateway's one settings class; every field is an environment variable ``GATEWAY_*``.

``python -m services.gateway --settings`` prints the table the README shows. Lists and maps use
the short forms people type: ``GATEWAY_BACKENDS=predictor,triton`` and
``GATEWAY_WEIGHTS='predictor=90,triton=10'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ServiceSettings

BackendName = Literal["predictor", "torchserve", "triton"]
BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]


class GatewaySettings(ServiceSettings):
    """The gateway: engines, routing, resilience and limits."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""

    model: str = Field(default="classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    """Model name on the engines (TorchServe's model; the predictor's and Triton's
    `<model>_ensemble`)."""
    backends: Annotated[list[BackendName], NoDecode] = Field(
        default_factory=lambda: list(BACKEND_NAMES), min_length=1
    )
    """Engines the gateway may use, comma-separated; also the failover order."""
    default_backend: BackendName = "predictor"
    """Engine for requests without `?backend=` (unless `weights` splits them)."""
    weights: Annotated[dict[BackendName, int], NoDecode] = Field(default_factory=dict)
    """Weighted split of requests without `?backend=`, e.g. `predictor=90,triton=10` (a canary);
    empty sends them all to `default_backend`."""
    failover: bool = True
    """When the chosen engine is down (refused, 5xx, circuit open), answer from the next
    healthy one in `backends` order; the answer's `backend` and `X-Backend` say who served it."""

    predictor_url: str = "http://127.0.0.1:8100"
    """Base URL of the FastAPI predictor (Open Inference Protocol `POST
    /v2/models/<model>_ensemble/infer`, `GET /readyz`)."""
    torchserve_url: str = "http://127.0.0.1:8180"
    """Base URL of TorchServe's inference API (`POST /predictions/<model>`)."""
    torchserve_management_url: str | None = "http://127.0.0.1:8181"
    """Base URL of TorchServe's management API, asked whether the model's workers are READY;
    empty asks the inference API's `/ping` instead (Kubernetes, where the management API is
    out of reach and the Service routes only to pods whose own probe found a READY worker)."""
    torchserve_key_file: Path | None = Path("runs/torchserve/key_file.json")
    """TorchServe's key_file.json (inference and management keys; re-read when TorchServe
    writes new ones); empty when token authorization is off."""
    triton_url: str = "http://127.0.0.1:8200"
    """Base URL of Triton's HTTP endpoint (KServe v2 with the binary tensor extension)."""

    timeout_s: float = Field(default=10.0, gt=0.0)
    """Time an engine has to answer one request (retries included) before the client gets 504."""
    predictor_timeout_s: float | None = Field(default=None, gt=0.0)
    """Timeout for the predictor; unset uses `timeout_s`."""
    torchserve_timeout_s: float | None = Field(default=None, gt=0.0)
    """Timeout for TorchServe; unset uses `timeout_s`."""
    triton_timeout_s: float | None = Field(default=None, gt=0.0)
    """Timeout for Triton; unset uses `timeout_s`."""
    connect_timeout_s: float = Field(default=1.0, gt=0.0)
    """Time to open a TCP connection to an engine (a refused one fails at once)."""
    retries: int = Field(default=1, ge=0, le=5)
    """Extra attempts on the same engine after a refused or dropped connection (classification
    has no side effects, so repeating is safe); never after a timeout or any answer."""
    retry_backoff_s: float = Field(default=0.02, ge=0.0, le=5.0)
    """Wait before the first retry; doubles for each later one."""
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive engine failures (refused, 5xx, timeout) that open its circuit breaker."""
    breaker_reset_s: float = Field(default=10.0, gt=0.0)
    """How long an open breaker sends nothing to its engine before one trial request."""
    health_interval_s: float = Field(default=1.0, gt=0.0)
    """How often every engine's readiness is checked (`/readyz` shows the result)."""
    health_timeout_s: float = Field(default=2.0, gt=0.0)
    """Time one readiness check may take before it counts as timed out."""
    health_timeouts: int = Field(default=3, ge=1)
    """Readiness checks in a row that may time out before a ready engine counts as not ready:
    an engine busy loading a model (Triton during a reload) answers its probes late but still
    serves. A refused connection or a not-ready answer counts at once; 1 makes a timeout count
    at once too."""
    resolve_interval_s: float = Field(default=5.0, ge=0.0)
    """How often an engine's host name is resolved again; calls go to its addresses in turn
    (replicas: `docker compose --scale`, a headless Service), passing over one that refuses.
    0 connects by name (the HTTP client picks one address per connection)."""
    max_connections: int = Field(default=64, ge=1)
    """Pooled keep-alive connections per engine."""
    predictor_coalesce_calls: int = Field(default=1, ge=0, le=64)
    """Calls to the predictor in flight at once before requests that arrive meanwhile are merged
    into one call, one tensor of all their images (split back per request; a merged call
    refused for a bad image is retried request by request); 0 sends every request on its own.
    With 1 the gateway is the batcher and calls carry the most images; 2 lets a predictor with
    spare cores decode one call while its engine runs the other."""

    max_images: int = Field(default=64, ge=1, le=4096)
    """Most images in one request (the `images` list)."""
    api_key: SecretStr | None = None
    """When set, `POST /predict` needs this key in `api_key_header` (401 otherwise)."""
    api_key_header: str = Field(default="X-API-Key", pattern=r"^[A-Za-z0-9-]+$")
    """Header carrying the API key."""

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: Any) -> Any:
        return _split(value) if isinstance(value, str) else value

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        weights: dict[str, str] = {}
        for part in _split(value):
            name, sep, weight = part.partition("=")
            if not sep:
                raise ValueError(f"weight {part!r} is not NAME=NUMBER (e.g. predictor=90)")
            weights[name.strip()] = weight.strip()
        return weights

    @field_validator("torchserve_key_file", mode="before")
    @classmethod
    def _empty_key_file(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("api_key", "torchserve_management_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("predictor_url", "torchserve_url", "torchserve_management_url", "triton_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends lists an engine twice: {self.backends}")
        if self.default_backend not in self.backends:
            raise ValueError(
                f"default_backend {self.default_backend!r} is not among backends {self.backends}"
            )
        unknown = sorted(set(self.weights) - set(self.backends))
        if unknown:
            raise ValueError(f"weights name engines that are not in backends: {unknown}")
        if any(weight < 0 for weight in self.weights.values()):
            raise ValueError("weights must be >= 0")
        if self.weights and sum(self.weights.values()) == 0:
            raise ValueError("weights must not all be 0")
        return self

    def coalesce_calls_for(self, backend: BackendName) -> int:
        """Calls in flight before requests to ``backend`` are merged (0: never; only the
        predictor takes several requests' images in one call)."""
        return self.predictor_coalesce_calls if backend == "predictor" else 0

    def timeout_for(self, backend: BackendName) -> float:
        specific: float | None = getattr(self, f"{backend}_timeout_s")
        return specific if specific is not None else self.timeout_s
