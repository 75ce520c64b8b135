"""What the load tests send to each backend, and how every answer is checked.

A *target* is one way of asking for a prediction: through the gateway with
``?backend=<engine>`` (``gateway:predictor`` ...) or straight to an engine in its own protocol
(``direct:predictor`` JSON ``/predict``, ``direct:torchserve`` raw image bytes with the
inference key, ``direct:triton`` the KServe v2 binary tensor extension with Triton's
classification output). Each target builds its request bodies once and parses an answer into
an :class:`Answer`, raising :class:`AnswerError` when the body does not follow the contract.

Payloads are real test images: the held-out (test) split of scikit-learn's digits, drawn the
way training draws it, encoded as PNG once. The label check needs an expected class per image:
:func:`compute_reference` asks the target once per image, one request at a time, before any
load. Under load every answer must name the same class; a difference means answers were mixed
up between concurrent or batched requests, or that the model changed mid-run. Images whose two
best classes are nearly tied are left out, so float noise from different batch sizes can never
flip a correct answer. Agreement with the true digits is measured too and reported.

No Locust import here: ``bench.py`` computes the references with this module before it starts
Locust, in a process gevent never patches, and the unit tests exercise the parsers directly.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.settings import GatewaySettings
from services.predictor.settings import PredictorSettings
from services.stack.settings import StackSettings
from services.torchserve.config import KEY_FILE_NAME, TorchServeSettings, read_keys
from services.triton.protocol import LOGITS_OUTPUT, binary_infer_request, ensemble_name
from services.triton.settings import TritonSettings
from training.digits import held_out_digits

logger = logging.getLogger(__name__)

BACKENDS = ("predictor", "torchserve", "triton")
#: Every target: through the gateway to each engine, and straight to each engine.
TARGETS = tuple(f"gateway:{b}" for b in BACKENDS) + tuple(f"direct:{b}" for b in BACKENDS)
#: The seed and held-out fraction ``training.trainer.TrainConfig`` splits digits with.


def _gateway_url() -> str:
    return f"http://127.0.0.1:{GatewaySettings().port}"


def _gateway_api_key() -> str | None:
    key = GatewaySettings().api_key
    return key.get_secret_value() if key else None


def _gateway_api_key_header() -> str:
    return GatewaySettings().api_key_header


def _predictor_url() -> str:
    return f"http://127.0.0.1:{PredictorSettings().port}"


def _torchserve_url() -> str:
    return TorchServeSettings().inference_url


def _torchserve_key_file() -> Path:
    """The key file of the stack's TorchServe (`make up`) if there is one, else of a TorchServe
    started on its own (`python -m services.torchserve up`)."""
    in_stack = StackSettings().torchserve_run_dir / KEY_FILE_NAME
    standalone = TorchServeSettings().key_file
    return standalone if standalone.exists() and not in_stack.exists() else in_stack


def _triton_url() -> str:
    return f"http://127.0.0.1:{TritonSettings().http_port}"


class LoadTestSettings(BaseSettings):
    """Where the load goes and what it sends; each field is an environment variable LOADTEST_*.

    The engine addresses default to the engines' own settings (PREDICTOR_PORT, TORCHSERVE_*,
    TRITON_HTTP_PORT), so a stack started with non-default ports is found the same way.
    """

    model_config = SettingsConfigDict(
        env_prefix="LOADTEST_",
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
        use_attribute_docstrings=True,
    )

    gateway_url: str = Field(default_factory=_gateway_url)
    """Gateway base URL (Locust's --host overrides it for the gateway users)."""
    gateway_api_key: str | None = Field(default_factory=_gateway_api_key)
    """Key for the gateway when it requires one (default: GATEWAY_API_KEY)."""
    gateway_api_key_header: str = Field(default_factory=_gateway_api_key_header)
    """Header carrying that key (default: GATEWAY_API_KEY_HEADER)."""
    predictor_url: str = Field(default_factory=_predictor_url)
    """Predictor base URL for the direct-to-engine users."""
    torchserve_url: str = Field(default_factory=_torchserve_url)
    """TorchServe inference API base URL for the direct-to-engine users."""
    torchserve_token: str | None = None
    """TorchServe inference key; unset reads it from `torchserve_key_file`."""
    torchserve_key_file: Path = Field(default_factory=_torchserve_key_file)
    """TorchServe's key_file.json (written into its run folder when it starts)."""
    triton_url: str = Field(default_factory=_triton_url)
    """Triton HTTP base URL for the direct-to-engine users."""
    model: str = "classifier"
    """Model name at the engines (TorchServe model, Triton `<model>_ensemble`)."""
    images: int = Field(default=64, ge=1, le=180)
    """Held-out digits sent as payloads (the test split has 180)."""
    top_k: int = Field(default=3, ge=2, le=10)
    """Classes asked for per image (two at least: the near-tie filter needs the runner-up)."""
    min_margin: float = Field(default=1e-3, ge=0.0)
    """Images whose best two classes are closer than this (in logits) are not sent."""
    reference_file: Path | None = None
    """JSON of precomputed reference answers (written by bench.py); unset: ask each target."""
    reference_timeout_s: float = Field(default=30.0, gt=0.0)
    """Timeout of each reference request."""
    shape: Literal["none", "stepped"] = "none"
    """`stepped` turns on the SteppedLoad shape (then -u/-r/-t are ignored)."""
    step_users: int = Field(default=2, ge=1)
    """Users added at each step of the stepped shape."""
    step_seconds: float = Field(default=20.0, gt=0.0)
    """Length of each step of the stepped shape."""
    steps: int = Field(default=5, ge=1)
    """Steps of the stepped shape; the test stops after the last one."""

    def engine_url(self, backend: str) -> str:
        urls = {
            "predictor": self.predictor_url,
            "torchserve": self.torchserve_url,
            "triton": self.triton_url,
        }
        return urls[backend].rstrip("/")

    def torchserve_inference_key(self) -> str:
        if self.torchserve_token:
            return self.torchserve_token
        try:
            return read_keys(self.torchserve_key_file).inference
        except FileNotFoundError:
            raise AnswerError(
                f"TorchServe key file {self.torchserve_key_file} does not exist: is TorchServe "
                "up? (set LOADTEST_TORCHSERVE_KEY_FILE or LOADTEST_TORCHSERVE_TOKEN)"
            ) from None
        except ValueError as exc:
            raise AnswerError(
                f"{self.torchserve_key_file} is not TorchServe's key file: {exc}"
            ) from None


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    """One payload: a held-out digit encoded as PNG, with its true label."""

    index: int
    """Position in scikit-learn's digits (stable across runs: the key of reference answers)."""
    label: int
    png: bytes
    b64: str = field(repr=False)


def load_payloads(count: int) -> list[Payload]:
    """The first ``count`` held-out digits as 8-bit grayscale PNGs (what users would upload)."""
    return [
        Payload(
            index=digit.index,
            label=digit.label,
            png=digit.png,
            b64=base64.b64encode(digit.png).decode("ascii"),
        )
        for digit in held_out_digits(count)
    ]


# --------------------------------------------------------------------------- answers


class AnswerError(Exception):
    """An answer that breaks the contract, or a wrong one; the message says which and why."""


@dataclass(frozen=True)
class Answer:
    backend: str
    version: str
    top1: int
    margin: float
    """Logit difference between the best and the second class (inf when only one came)."""


@dataclass(frozen=True)
class Call:
    """One precomputed request: path (relative to the target's base URL), body, headers."""

    path: str
    body: bytes
    headers: dict[str, str]


class Headers(Protocol):
    """Case-insensitive header lookup (geventhttpclient's and urllib's both are)."""

    def get(self, name: str, default: Any = None) -> Any: ...


def _error_text(status: int, body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status} with an empty body"


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise AnswerError(f"body is not JSON: {body[:100]!r}") from None
    if not isinstance(data, dict):
        raise AnswerError(f"body is not a JSON object: {body[:100]!r}")
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_predict_response(body: bytes, top_k: int) -> Answer:
    """The documented answer for one image (gateway, predictor, TorchServe handler)."""
    data = _json_object(body)
    for key in ("model", "backend"):
        if not isinstance(data.get(key), str):
            raise AnswerError(f"{key!r} is missing or not a string")
    version = data.get("version")
    if not isinstance(version, str) and not _is_int(version):
        raise AnswerError("'version' is missing or not a string")
    predictions = data.get("predictions")
    if not isinstance(predictions, list) or not 1 <= len(predictions) <= top_k:
        raise AnswerError(f"'predictions' is not a list of 1..{top_k} entries: {predictions!r}")
    scores = []
    for entry in predictions:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("label"), str)
            and _is_int(entry.get("class_id"))
            and _is_number(entry.get("score"))
            and 0.0 <= entry["score"] <= 1.0
        ):
            raise AnswerError(f"prediction is not {{label, class_id, score in [0, 1]}}: {entry!r}")
        scores.append(float(entry["score"]))
    if any(a < b for a, b in itertools.pairwise(scores)):
        raise AnswerError(f"predictions are not sorted best first: scores {scores}")
    return Answer(
        backend=data["backend"],
        version=str(version),
        top1=int(predictions[0]["class_id"]),
        margin=_probability_margin(scores),
    )


def _probability_margin(scores: list[float]) -> float:
    """log(p1/p2): the logit difference of the best two classes, from softmax scores."""
    if len(scores) < 2 or scores[1] <= 0.0:
        return math.inf
    if scores[0] <= 0.0:
        return 0.0
    return math.log(scores[0]) - math.log(scores[1])


def parse_triton_classification(body: bytes, model: str, top_k: int) -> Answer:
    """A KServe v2 answer whose LOGITS were asked for as Triton's ``score:index:label``."""
    data = _json_object(body)
    if data.get("model_name") != model:
        raise AnswerError(f"answered by model {data.get('model_name')!r}, not {model!r}")
    outputs = data.get("outputs")
    output = next(
        (o for o in outputs or [] if isinstance(o, dict) and o.get("name") == LOGITS_OUTPUT),
        None,
    )
    if output is None:
        raise AnswerError(f"no {LOGITS_OUTPUT!r} output in {str(outputs)[:200]}")
    entries = output.get("data")
    if output.get("datatype") != "BYTES" or not isinstance(entries, list):
        raise AnswerError(f"{LOGITS_OUTPUT} is not a BYTES classification: {str(output)[:200]}")
    if not 1 <= len(entries) <= top_k:
        raise AnswerError(f"{LOGITS_OUTPUT} has {len(entries)} classes, not 1..{top_k}")
    scores: list[float] = []
    classes: list[int] = []
    for entry in entries:
        parts = entry.split(":", 2) if isinstance(entry, str) else []
        try:
            scores.append(float(parts[0]))
            classes.append(int(parts[1]))
        except (IndexError, ValueError):
            raise AnswerError(
                f"classification entry is not 'score:index[:label]': {entry!r}"
            ) from None
    if any(a < b for a, b in itertools.pairwise(scores)):
        raise AnswerError(f"classes are not sorted best first: scores {scores}")
    return Answer(
        backend="triton",
        version=str(data.get("model_version", "")),
        top1=classes[0],
        margin=scores[0] - scores[1] if len(scores) > 1 else math.inf,
    )


# --------------------------------------------------------------------------- targets


class Target:
    """One way of asking a backend for a prediction; subclasses build requests and parse."""

    name: str
    backend: str

    def __init__(self, settings: LoadTestSettings, backend: str) -> None:
        self.settings = settings
        self.backend = backend

    def call(self, image: Payload) -> Call:
        raise NotImplementedError

    def parse(self, status: int, headers: Headers, body: bytes) -> Answer:
        """Answer of a 200 response; AnswerError for anything else or a broken body."""
        if status != 200:
            raise AnswerError(_error_text(status, body))
        answer = self._parse_body(headers, body)
        if answer.backend != self.backend:
            raise AnswerError(f"answered by {answer.backend!r}, not {self.backend!r}")
        return answer

    def _parse_body(self, headers: Headers, body: bytes) -> Answer:
        raise NotImplementedError

    def _json_call(self, path: str, image: Payload) -> Call:
        body = json.dumps({"image": image.b64, "top_k": self.settings.top_k}).encode()
        return Call(path, body, {"Content-Type": "application/json"})


class GatewayTarget(Target):
    """``POST /predict?backend=<engine>`` with ``{"image": base64}`` (the gateway's contract)."""

    def __init__(self, settings: LoadTestSettings, backend: str) -> None:
        super().__init__(settings, backend)
        self.name = f"gateway:{backend}"

    def call(self, image: Payload) -> Call:
        call = self._json_call(f"/predict?backend={self.backend}", image)
        if self.settings.gateway_api_key:
            call.headers[self.settings.gateway_api_key_header] = self.settings.gateway_api_key
        return call

    def _parse_body(self, headers: Headers, body: bytes) -> Answer:
        answer = parse_predict_response(body, self.settings.top_k)
        header = headers.get("X-Backend")
        if header != answer.backend:
            raise AnswerError(f"X-Backend header {header!r} differs from body {answer.backend!r}")
        return answer


class PredictorTarget(Target):
    """The predictor's own ``POST /predict`` (the same JSON contract as the gateway)."""

    def __init__(self, settings: LoadTestSettings) -> None:
        super().__init__(settings, "predictor")
        self.name = "direct:predictor"

    def call(self, image: Payload) -> Call:
        return self._json_call("/predict", image)

    def _parse_body(self, headers: Headers, body: bytes) -> Answer:
        return parse_predict_response(body, self.settings.top_k)


class TorchServeTarget(Target):
    """``POST /predictions/<model>``: raw image bytes, ``X-Top-K``, the inference key."""

    def __init__(self, settings: LoadTestSettings) -> None:
        super().__init__(settings, "torchserve")
        self.name = "direct:torchserve"
        self._auth = f"Bearer {settings.torchserve_inference_key()}"

    def call(self, image: Payload) -> Call:
        headers = {
            "Content-Type": "image/png",
            "X-Top-K": str(self.settings.top_k),
            "Authorization": self._auth,
        }
        return Call(f"/predictions/{self.settings.model}", image.png, headers)

    def _parse_body(self, headers: Headers, body: bytes) -> Answer:
        return parse_predict_response(body, self.settings.top_k)


class TritonTarget(Target):
    """``POST /v2/models/<model>_ensemble/infer`` in the binary tensor extension.

    The one BYTES element of ``IMAGE`` [1, 1] follows the JSON header as a 4-byte
    little-endian length and the PNG bytes; ``LOGITS`` comes back as JSON with Triton's
    classification extension (``"score:index:label"``, best first), so no tensor decoding.
    """

    def __init__(self, settings: LoadTestSettings) -> None:
        super().__init__(settings, "triton")
        self.name = "direct:triton"
        self.model = ensemble_name(settings.model)

    def call(self, image: Payload) -> Call:
        body, headers = binary_infer_request([image.png], self.settings.top_k)
        return Call(f"/v2/models/{self.model}/infer", body, headers)

    def _parse_body(self, headers: Headers, body: bytes) -> Answer:
        return parse_triton_classification(body, self.model, self.settings.top_k)


def make_target(name: str, settings: LoadTestSettings) -> Target:
    """``gateway:<engine>`` or ``direct:<engine>`` (raises AnswerError for a bad name)."""
    route, _, backend = name.partition(":")
    if name not in TARGETS:
        raise AnswerError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    if route == "gateway":
        return GatewayTarget(settings, backend)
    direct: dict[str, type[PredictorTarget | TorchServeTarget | TritonTarget]] = {
        "predictor": PredictorTarget,
        "torchserve": TorchServeTarget,
        "triton": TritonTarget,
    }
    return direct[backend](settings)


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """A target's answers when idle: what every answer under load must repeat."""

    target: str
    version: str
    expected: dict[int, int]
    """Dataset index -> class the target answered (near ties left out)."""
    near_ties: int
    """Images left out because their best two classes were closer than ``min_margin``."""
    true_label_agreement: float
    """Fraction of the images whose answer is the true digit (the model's accuracy here)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "version": self.version,
            "expected": {str(k): v for k, v in self.expected.items()},
            "near_ties": self.near_ties,
            "true_label_agreement": self.true_label_agreement,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        return cls(
            target=str(data["target"]),
            version=str(data["version"]),
            expected={int(k): int(v) for k, v in data["expected"].items()},
            near_ties=int(data["near_ties"]),
            true_label_agreement=float(data["true_label_agreement"]),
        )


def send_once(base_url: str, call: Call, timeout_s: float) -> tuple[int, Headers, bytes]:
    """One blocking request with the standard library (no Locust statistics are touched)."""
    request = urllib.request.Request(
        base_url + call.path, data=call.body, headers=call.headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.headers, response.read()
    except urllib.error.HTTPError as exc:  # a 4xx/5xx: its body is the answer to check
        return int(exc.code), exc.headers, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise AnswerError(f"{base_url} cannot be reached: {exc}") from None


def compute_reference(
    target: Target, base_url: str, images: list[Payload], timeout_s: float
) -> Reference:
    """Ask ``target`` about every image, one at a time (nothing to batch or mix up)."""
    expected: dict[int, int] = {}
    versions: set[str] = set()
    near_ties = 0
    correct = 0
    for image in images:
        status, headers, body = send_once(base_url, target.call(image), timeout_s)
        try:
            answer = target.parse(status, headers, body)
        except AnswerError as exc:
            raise AnswerError(f"{target.name} reference for digit #{image.index}: {exc}") from None
        versions.add(answer.version)
        correct += answer.top1 == image.label
        if answer.margin < target.settings.min_margin:
            near_ties += 1
            continue
        expected[image.index] = answer.top1
    if len(versions) != 1:
        raise AnswerError(f"{target.name} changed model version while warming up: {versions}")
    if not expected:
        raise AnswerError(f"{target.name}: every image was a near tie; lower min_margin")
    reference = Reference(
        target=target.name,
        version=versions.pop(),
        expected=expected,
        near_ties=near_ties,
        true_label_agreement=correct / len(images),
    )
    logger.info(
        "%s: reference answers for %d images from version %s (%d near ties left out); "
        "%.1f%% are the true digit",
        target.name,
        len(expected),
        reference.version,
        near_ties,
        100 * reference.true_label_agreement,
    )
    return reference


def check_answer(answer: Answer, image: Payload, reference: Reference) -> None:
    """AnswerError unless ``answer`` repeats the reference answer for ``image``."""
    if answer.version != reference.version:
        raise AnswerError(
            f"model version {answer.version} answered, the run started on {reference.version}: "
            "a new version was published during the load test"
        )
    expected = reference.expected[image.index]
    if answer.top1 != expected:
        raise AnswerError(
            f"digit #{image.index} (a {image.label}): top-1 class {answer.top1}, "
            f"but {reference.target} answered {expected} when idle"
        )


def load_references(path: Path) -> dict[str, Reference]:
    data = json.loads(path.read_text())
    return {name: Reference.from_json(entry) for name, entry in data.items()}


def save_references(path: Path, references: dict[str, Reference]) -> None:
    path.write_text(json.dumps({k: r.to_json() for k, r in references.items()}, indent=2))
