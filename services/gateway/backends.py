"""One engine contract, two protocols, three engines.

Every engine is reached with one pooled keep-alive :class:`aiohttp.ClientSession` (created by
the app's lifespan, closed on shutdown):

* the predictor and Triton speak the same Open Inference Protocol with the same model names,
  so one client serves both (:class:`OpenInferenceBackend`): ``POST
  /v2/models/<model>_ensemble/infer`` with the binary tensor extension, the images validated at
  the edge sent as raw bytes in one BYTES tensor ``IMAGE`` ``[n, 1]`` (no base64, no JSON
  parse of the images on the engine), raw FP32 ``LOGITS`` ``[n, classes]`` read back, softmax
  and labels applied here (:func:`~services.common.runtime.top_k_predictions`). A call the
  gateway coalesced is an ordinary tensor batch. The labels of a model version are asked once,
  with one tiny image and the classification extension (the protocol's only way to tell them);
* TorchServe: ``POST /predictions/<model>`` with the raw image bytes, ``X-Top-K`` and the
  inference key from TorchServe's ``key_file.json``; one request per image (TorchServe batches
  concurrent requests itself).

aiohttp rather than httpx: httpx's pool re-scans every connection twice per request and retries
a failed ``import sniffio`` on every lock, which made its client cost about ten times aiohttp's
CPU per request under concurrency (the figures are in the README's "Architecture"), and the
gateway shares its CPUs with the engines.

Each implementation turns its engine's answers into an :class:`Answer` or one of the
:class:`BackendError` kinds, which decide what the gateway does next: a caller's mistake
(:class:`EngineRejected`) goes back to the caller as a 4xx, :class:`EngineUnavailable` fails over
to another engine, :class:`EngineTimeout` becomes a 504.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
from PIL import Image
from yarl import URL

from services.common.errors import image_error_status
from services.common.repository import INT8_SUFFIX
from services.common.runtime import Precision, top_k_predictions
from services.gateway.replicas import Replicas, Resolve, resolve_all, spreads
from services.gateway.settings import BackendName, GatewaySettings
from services.torchserve.config import REFUSED_FILE_NAME, Keys, read_keys, read_refused_versions
from services.torchserve.workers import ready_workers
from services.triton.protocol import (
    HEADER_LENGTH,
    REFUSED_VERSIONS_PARAMETER,
    binary_infer_request,
    ensemble_name,
    parse_error,
    read_labels,
    read_logits,
)

logger = logging.getLogger(__name__)

Predictions = list[list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image as validated at the edge."""

    data: bytes
    """The encoded image (PNG, JPEG, ...), base64-decoded once by the gateway: what every
    engine is sent."""


@dataclass(slots=True)
class Answer:
    """An engine's answer in the gateway's schema: one prediction list per image."""

    model: str
    version: str
    predictions: Predictions


#: What a readiness probe that got no answer within ``GATEWAY_HEALTH_TIMEOUT_S`` reports.
PROBE_TIMED_OUT = "readiness check timed out"


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: str
    #: The model version the engine serves now (None when it did not say).
    version: str | None = None
    #: The published versions the engine refused to serve, as it reports them:
    #: ``{"version": int, "reason": str}``, newest first.
    refused_versions: tuple[dict[str, Any], ...] = ()

    @property
    def timed_out(self) -> bool:
        """The check got no answer in time: the engine may be busy (Triton answers its probes
        late while it loads a model) rather than down."""
        return not self.ready and self.detail == PROBE_TIMED_OUT


def refused_entries(data: Any) -> tuple[dict[str, Any], ...]:
    """An engine's list of refused versions, kept only as far as it has the expected shape."""
    if not isinstance(data, list):
        return ()
    return tuple(
        {"version": entry["version"], "reason": str(entry["reason"])}
        for entry in data
        if isinstance(entry, dict) and isinstance(entry.get("version"), int) and "reason" in entry
    )


class BackendError(Exception):
    """An engine call that gave no answer. ``kind`` labels metrics; ``code`` is for clients."""

    kind = "error"
    code = "engine_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class EngineRejected(BackendError):
    """The engine refused the input as the caller's mistake (undecodable image, too large)."""

    kind = "rejected"

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message, code)
        self.status = status


#: The code of an engine that cannot serve the precision asked for (HTTP 409).
PRECISION_UNAVAILABLE = "precision_unavailable"


def precision_unavailable(message: str) -> EngineRejected:
    """An engine that does not serve the precision asked for: the caller's request cannot be
    served there as it stands (409, not failed over and not a breaker failure), though
    publishing or serving another way can change that."""
    return EngineRejected(message, PRECISION_UNAVAILABLE, 409)


class EngineUnavailable(BackendError):
    """The engine cannot answer now: another engine may (failover)."""

    kind = "unavailable"
    code = "engine_unavailable"


class ConnectFailed(EngineUnavailable):
    """No connection, or it closed or reset before an answer: classification has no side
    effects, so the request can be sent again safely."""

    kind = "connect"
    code = "engine_unreachable"


class EngineFault(EngineUnavailable):
    """The engine failed on a valid input (5xx, malformed answer): a fault of the engine."""

    kind = "fault"
    code = "engine_fault"


class EngineTimeout(BackendError):
    """No answer within the engine's timeout."""

    kind = "timeout"
    code = "timeout"


class Backend(Protocol):
    """What the gateway needs from an engine."""

    name: BackendName
    #: The precisions the engine can serve at all (whether the served version has an int8
    #: model is the engine's to say, per request).
    precisions: frozenset[Precision]

    async def predict(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Answer: ...

    async def check_ready(self) -> Readiness: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """An engine's HTTP answer, read in full."""

    status: int
    body: bytes
    reason: str = ""
    header_length: str | None = None  # the binary tensor extension's Inference-Header-...

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.body)


def status_error(backend: str, reply: Reply) -> BackendError:
    """Map an engine's non-200 answer to what the gateway does with it."""
    status = reply.status
    message, code = _error_fields(reply)
    where = f"{backend} answered HTTP {status}: {message}"
    if status in (401, 403):
        return EngineUnavailable(where, "engine_auth")
    if status == 404:
        return EngineUnavailable(where, "engine_model_missing")
    if status in (408, 429, 503):
        return EngineUnavailable(where, code or "engine_unavailable")
    if status == 504:
        return EngineTimeout(where)
    if 400 <= status < 500:
        default = "payload_too_large" if status == 413 else "bad_request"
        return EngineRejected(message, code or default, status)
    return EngineFault(where, "engine_fault")


def _error_fields(reply: Reply) -> tuple[str, str | None]:
    """``(message, code)`` of an error body: ``{"error", "code"}`` (ours), TorchServe's
    ``{"code": 503, "message"}`` or Triton's ``{"error"}``; plain text otherwise."""
    try:
        body = reply.json()
    except orjson.JSONDecodeError:
        return reply.text().strip()[:300] or reply.reason, None
    if not isinstance(body, dict):
        return str(body)[:300], None
    message = body.get("error") or body.get("message") or reply.reason
    code = body.get("code")
    return str(message)[:1000], code if isinstance(code, str) else None


class HttpBackend:
    """The pooled session and transport-error mapping the three engines share."""

    name: BackendName

    def __init__(self, base_url: str, settings: GatewaySettings) -> None:
        self.base_url = URL(base_url)
        timeout = settings.timeout_for(self.name)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.max_connections, keepalive_timeout=30.0, ttl_dns_cache=300
            ),
            # The gateway's own deadline (asyncio.timeout around the whole call) is what the
            # client sees; these only keep a single socket operation from hanging past it.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=min(settings.connect_timeout_s, timeout), sock_read=timeout
            ),
            # Less for the engine to parse: it neither compresses nor cares who is calling.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
            # Engines live on known hosts: no proxy variables, no cookies.
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.health_timeout = aiohttp.ClientTimeout(total=settings.health_timeout_s)
        self.resolve_interval_s = settings.resolve_interval_s
        # A dead replica stays passed over until the name has been resolved again.
        self.down_s = max(settings.resolve_interval_s, 1.0)
        self._replica_sets: dict[tuple[str, int], Replicas] = {}
        #: How host names are resolved (the system resolver; tests name their own hosts).
        self.resolve: Resolve = resolve_all

    def url(self, path: str) -> URL:
        """An absolute URL under the engine's base URL (built once per path by callers)."""
        return self.base_url.with_path(self.base_url.path.rstrip("/") + path)

    async def aclose(self) -> None:
        await self.session.close()

    def _replicas(self, url: URL) -> Replicas | None:
        """The replica set of ``url``'s host, made on first use; None when requests go to the
        URL as it is (see :mod:`services.gateway.replicas`)."""
        if self.resolve_interval_s == 0 or url.host is None or url.port is None:
            return None
        if not spreads(url.scheme, url.host):
            return None
        key = (url.host, url.port)
        replicas = self._replica_sets.get(key)
        if replicas is None:
            replicas = Replicas(
                url.host,
                url.port,
                interval_s=self.resolve_interval_s,
                down_s=self.down_s,
                resolve=self.resolve,
            )
            self._replica_sets[key] = replicas
        return replicas

    async def _send(
        self,
        method: str,
        url: URL,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One request, to the next replica of the URL's host in turn; a replica that refuses
        or drops the connection is passed over and the next one tried at once."""
        replicas = self._replicas(url)
        addresses = await replicas.candidates() if replicas is not None else []
        if replicas is None or not addresses:
            return await self._send_to(method, url, data, headers)
        named = {**(headers or {}), "Host": url.raw_authority}
        for address in addresses[:-1]:
            try:
                return await self._send_to(method, url.with_host(address), data, named)
            except ConnectFailed:
                replicas.failed(address)
        try:
            return await self._send_to(method, url.with_host(addresses[-1]), data, named)
        except ConnectFailed:
            replicas.failed(addresses[-1])
            raise

    async def _send_to(
        self,
        method: str,
        url: URL,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        try:
            async with self.session.request(method, url, data=data, headers=headers) as response:
                body = await response.read()
                return Reply(
                    response.status,
                    body,
                    response.reason or "",
                    response.headers.get(HEADER_LENGTH),
                )
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(f"{self.name} at {self.base_url} refused: {exc}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Closed or reset without an answer: the engine died mid-request, or it dropped an
            # idle keep-alive connection just as we reused it. Inference has no side effects,
            # so sending again is safe.
            raise ConnectFailed(f"{self.name} dropped the connection: {exc}") from None
        except aiohttp.ConnectionTimeoutError:
            raise ConnectFailed(f"{self.name} at {self.base_url}: connect timed out") from None
        except TimeoutError:  # aiohttp's own read timeout (SocketTimeoutError)
            raise EngineTimeout(f"{self.name} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise EngineUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None

    async def _probe(self, url: URL, headers: dict[str, str] | None = None) -> Reply | str:
        """A readiness probe: the answer, or why there is none. With replicas, the engine is
        ready when the first one that accepts a connection says so (requests pass over the
        ones that do not)."""
        replicas = self._replicas(url)
        addresses = await replicas.candidates() if replicas is not None else []
        if replicas is None or not addresses:
            return (await self._probe_one(url, headers))[0]
        named = {**(headers or {}), "Host": url.raw_authority}
        answer: Reply | str = "no replica"
        for address in addresses:
            answer, unreachable = await self._probe_one(url.with_host(address), named)
            if not unreachable:
                return answer
            replicas.failed(address)
        return answer

    async def _probe_one(
        self, url: URL, headers: dict[str, str] | None
    ) -> tuple[Reply | str, bool]:
        """The probe's answer or why there is none, and whether no connection was made."""
        try:
            async with self.session.get(url, headers=headers, timeout=self.health_timeout) as r:
                return Reply(r.status, await r.read(), r.reason or ""), False
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}", True
        except TimeoutError:
            return PROBE_TIMED_OUT, False
        except aiohttp.ClientError as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), False


def _torchserve_exception(reply: Reply) -> str | None:
    """The ``type`` of a TorchServe frontend error body (``InvalidKeyException``, ...)."""
    try:
        body = reply.json()
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return str(body["type"])
    return None


def _key_refused(reply: Reply) -> bool:
    return reply.status in (401, 403) or (
        reply.status == 400 and _torchserve_exception(reply) == "InvalidKeyException"
    )


def _malformed(backend: str, exc: Exception) -> EngineFault:
    return EngineFault(f"{backend} sent a malformed answer ({type(exc).__name__}: {exc})")


@functools.cache
def _label_probe() -> bytes:
    """One black pixel as a PNG: the smallest valid image, to ask a version for its labels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


class OpenInferenceBackend(HttpBackend):
    """The one Open Inference Protocol client the predictor and Triton share (see the module
    docstring); each engine says only how it reports readiness."""

    precisions: frozenset[Precision] = frozenset(("fp32", "int8"))

    def __init__(self, base_url: str, settings: GatewaySettings) -> None:
        super().__init__(base_url, settings)
        self.model = settings.model
        self.ensemble = ensemble_name(settings.model)
        self.infer_url = self.url(f"/v2/models/{self.ensemble}/infer")
        # The int8 model has its own ensemble (Triton's generated one, the predictor's name
        # for its int8 model): selecting it by name is all a request at int8 costs.
        self.int8_ensemble = ensemble_name(settings.model + INT8_SUFFIX)
        self.int8_infer_url = self.url(f"/v2/models/{self.int8_ensemble}/infer")
        self.labels: dict[str, list[str]] = {}  # by model version
        self._asking_labels = asyncio.Lock()

    async def predict(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Answer:
        body, headers = binary_infer_request([image.data for image in images], 0, request_id)
        headers["x-request-id"] = request_id
        url = self.infer_url if precision == "fp32" else self.int8_infer_url
        reply = await self._send("POST", url, body, headers)
        if reply.status != 200:
            if reply.status == 404 and precision == "int8":
                message, _ = _error_fields(reply)
                raise precision_unavailable(
                    f"{self.name} does not serve int8 now ({self.int8_ensemble}: {message})"
                )
            raise self._error(reply)
        try:
            version, logits = read_logits(reply.body, reply.header_length, len(images))
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise _malformed(self.name, exc) from None
        labels = await self._labels(version, logits.shape[1])
        return Answer(self.model, version, top_k_predictions(logits, labels, top_k))

    async def _labels(self, version: str, classes: int) -> list[str]:
        """The labels of ``version``: asked once, with one tiny image and the classification
        extension for every class, at that version exactly."""
        labels = self.labels.get(version)
        if labels is not None and len(labels) == classes:
            return labels
        async with self._asking_labels:
            labels = self.labels.get(version)
            if labels is None or len(labels) != classes:
                path = f"/v2/models/{self.ensemble}/versions/{version}/infer"
                body, headers = binary_infer_request([_label_probe()], classes)
                reply = await self._send("POST", self.url(path), body, headers)
                if reply.status != 200:
                    raise status_error(self.name, reply)
                try:
                    labels = read_labels(reply.body, classes)
                except (ValueError, KeyError, TypeError, StopIteration) as exc:
                    raise _malformed(self.name, exc) from None
                self.labels[version] = labels
        return labels

    def _error(self, reply: Reply) -> BackendError:
        """An engine's refusal. Both tag a verdict on an image with its decoder's code
        (``[not_an_image] ...``: our preprocess model in Triton, the predictor's v2 API); the
        predictor's other 4xx carry ``{"error", "code"}`` (about the images: the rest was
        checked at the edge); Triton's own 400s (shape, datatype) mean the gateway and the
        model disagree about the protocol: not the caller's fault."""
        message, code = _error_fields(reply)
        tagged = parse_error(message) if 400 <= reply.status < 500 else None
        if tagged is not None:
            code, text = tagged
            return EngineRejected(text, code, image_error_status(code))
        if reply.status == 400:
            if code is not None:
                return EngineRejected(message, code, 400)
            return EngineFault(f"{self.name} refused the request: {message}", "engine_fault")
        return status_error(self.name, reply)


class PredictorBackend(OpenInferenceBackend):
    """The predictor, through its Open Inference Protocol API.

    Under load the gateway merges concurrent requests into one call
    (:mod:`services.gateway.coalescing`): an ordinary tensor batch, which the predictor runs
    without waiting for its batching delay, as it does any request with a batch axis.
    """

    name: BackendName = "predictor"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings.predictor_url, settings)
        self.ready_url = self.url("/readyz")

    async def check_ready(self) -> Readiness:
        reply = await self._probe(self.ready_url)
        if isinstance(reply, str):
            return Readiness(False, reply)
        if reply.status != 200:
            return Readiness(False, f"/readyz answered {reply.status}")
        try:
            body = reply.json()
            return Readiness(
                True,
                f"{body['model']} v{body['version']} ({body['engine']})",
                str(body["version"]),
                refused_entries(body.get("refused_versions")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return Readiness(True, "ready")


class TorchServeKeys:
    """TorchServe's keys, re-read whenever key_file.json changes (a restart writes new ones)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: Keys | None = None
        self._reported: str | None = None  # the last reason logged

    def get(self) -> Keys | None:
        """The current keys; None when token authorization is off (no key file configured).

        The error says what is wrong with the key file but not where it is: its message
        reaches ``/readyz`` and callers' 503s. The path goes to the log, once per new reason.
        """
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise self._unusable(f"is unreadable: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp or self._keys is None:
            try:
                self._keys = read_keys(self.path)
            except OSError as exc:
                raise self._unusable(f"is unreadable: {exc.strerror}") from None
            except ValueError:
                raise self._unusable("holds no inference and management keys") from None
            self._stamp = stamp
            self._reported = None
        return self._keys

    def _unusable(self, reason: str) -> EngineUnavailable:
        if reason != self._reported:
            logger.warning("torchserve key file %s %s", self.path, reason)
            self._reported = reason
        return EngineUnavailable(f"torchserve key file {reason}", "engine_auth")

    def forget(self) -> None:
        self._stamp = None
        self._keys = None


class TorchServeBackend(HttpBackend):
    name: BackendName = "torchserve"
    #: No int8 here: TorchServe's handler runs the TorchScript model, and no quantized
    #: TorchScript model is published (README "int8").
    precisions: frozenset[Precision] = frozenset(("fp32",))

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings.torchserve_url, settings)
        self.model = settings.model
        self.predict_url = self.url(f"/predictions/{self.model}")
        self.describe_url: URL | None = None
        if settings.torchserve_management_url is not None:
            management = URL(settings.torchserve_management_url)
            self.describe_url = management.with_path(
                management.path.rstrip("/") + f"/models/{self.model}"
            )
        self.ping_url = self.url("/ping")
        self.keys = TorchServeKeys(settings.torchserve_key_file)

    def _auth(self, management: bool = False) -> dict[str, str]:
        keys = self.keys.get()
        if keys is None:
            return {}
        return {"authorization": f"Bearer {keys.management if management else keys.inference}"}

    async def _one(self, image: bytes, top_k: int, request_id: str) -> dict[str, Any]:
        for attempt in range(2):
            headers = {
                "content-type": "application/octet-stream",
                "x-top-k": str(top_k),
                "x-request-id": request_id,
                **self._auth(),
            }
            reply = await self._send("POST", self.predict_url, image, headers)
            if reply.status == 200:
                break
            if _key_refused(reply) and attempt == 0:
                self.keys.forget()  # TorchServe restarted with new keys: read them again
                continue
            raise self._error(reply)
        try:
            answer = reply.json()
            if not isinstance(answer, dict) or not isinstance(answer["predictions"], list):
                raise TypeError("no predictions list")
            return answer
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise _malformed(self.name, exc) from None

    def _error(self, reply: Reply) -> BackendError:
        """The handler refuses a bad image with ``{"error", "code": "<str>"}`` and its own
        4xx; TorchServe's frontend answers ``{"code": <int>, "type", "message"}``, and its 4xx
        are about the request the gateway built (a refused key is a 400 there), not the
        caller's image."""
        status = reply.status
        frontend = _torchserve_exception(reply)
        if frontend is None or status >= 500:
            return status_error(self.name, reply)
        message = f"torchserve answered HTTP {status} {frontend}"
        if frontend == "InvalidKeyException" or status in (401, 403):
            return EngineUnavailable(message, "engine_auth")
        if status == 413:
            return EngineRejected("the image is too large for TorchServe", "payload_too_large", 413)
        if status == 404:
            return EngineUnavailable(message, "engine_model_missing")
        return EngineFault(message, "engine_fault")

    async def predict(
        self,
        images: Sequence[EncodedImage],
        top_k: int,
        request_id: str,
        precision: Precision = "fp32",
    ) -> Answer:
        if precision not in self.precisions:
            raise precision_unavailable(
                f"torchserve does not serve {precision}: it runs the TorchScript model and no "
                "quantized TorchScript model is published"
            )
        if len(images) == 1:
            answers = [await self._one(images[0].data, top_k, request_id)]
        else:
            results = await asyncio.gather(
                *(self._one(image.data, top_k, request_id) for image in images),
                return_exceptions=True,
            )
            answers = []
            for index, result in enumerate(results):
                if isinstance(result, EngineRejected):
                    result.message = f"images[{index}]: {result.message}"
                    raise result
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                answers.append(result)
        first = answers[0]
        return Answer(
            model=str(first.get("model", self.model)),
            version=str(first.get("version", "")),
            predictions=[answer["predictions"] for answer in answers],
        )

    async def check_ready(self) -> Readiness:
        if self.describe_url is None:
            return await self._check_ping()
        try:
            headers = self._auth(management=True)
        except EngineUnavailable as exc:
            return Readiness(False, exc.message)
        reply = await self._probe(self.describe_url, headers)
        if isinstance(reply, str):
            return Readiness(False, reply)
        if _key_refused(reply):
            self.keys.forget()
        if reply.status != 200:
            return Readiness(False, f"management API answered {reply.status}")
        try:
            ready = [version for version, count in ready_workers(reply.json()).items() if count]
        except ValueError:  # not JSON (orjson.JSONDecodeError is one), or not a description
            return Readiness(False, "management API sent a malformed description")
        if not ready:
            return Readiness(False, f"{self.model} has no READY worker")
        return Readiness(True, f"{self.model} v{ready[0]}", ready[0], self._refused_versions())

    def _refused_versions(self) -> tuple[dict[str, Any], ...]:
        """What the launcher refused, from ``refused_versions.json`` beside the key file."""
        if self.keys.path is None:
            return ()
        try:
            return refused_entries(read_refused_versions(self.keys.path.parent / REFUSED_FILE_NAME))
        except (OSError, ValueError):
            return ()

    async def _check_ping(self) -> Readiness:
        """Without the management API: TorchServe's ``/ping`` (200 once its frontend is up
        and every registered model has its minimum of workers). Said "Healthy" before the
        model is registered, it is enough only where something else waits for a READY
        worker: in Kubernetes, the pods' readiness probe, without which the Service sends
        nothing to a pod."""
        try:
            headers = self._auth()
        except EngineUnavailable as exc:
            return Readiness(False, exc.message)
        reply = await self._probe(self.ping_url, headers)
        if isinstance(reply, str):
            return Readiness(False, reply)
        if reply.status != 200:
            return Readiness(False, f"ping answered {reply.status}")
        return Readiness(True, "ping: healthy")


class TritonBackend(OpenInferenceBackend):
    name: BackendName = "triton"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings.triton_url, settings)
        self.metadata_url = self.url(f"/v2/models/{self.ensemble}")
        self.ready_url = self.url(f"/v2/models/{self.ensemble}/ready")
        self.config_url = self.url(f"/v2/models/{self.model}/config")

    async def check_ready(self) -> Readiness:
        reply = await self._probe(self.ready_url)
        if isinstance(reply, str):
            return Readiness(False, reply)
        if reply.status != 200:
            return Readiness(False, f"{self.ensemble} ready endpoint answered {reply.status}")
        refused = await self._refused_versions()
        # The served version, as the other engines report theirs: the newest version the
        # ensemble's metadata lists (during a reload the old one may still be listed).
        metadata = await self._probe(self.metadata_url)
        try:
            if isinstance(metadata, str) or metadata.status != 200:
                raise ValueError("no metadata")
            version = max(int(v) for v in metadata.json()["versions"])
        except (ValueError, KeyError, TypeError):  # orjson.JSONDecodeError is a ValueError
            return Readiness(True, self.ensemble, refused_versions=refused)
        return Readiness(True, f"{self.model} v{version} ({self.ensemble})", str(version), refused)

    async def _refused_versions(self) -> tuple[dict[str, Any], ...]:
        """The local launcher's ``refused_versions`` parameter of the classifier's config (a
        Triton whose configs were written by publish has none: nothing refused to report)."""
        reply = await self._probe(self.config_url)
        if isinstance(reply, str) or reply.status != 200:
            return ()
        try:
            parameter = reply.json().get("parameters", {}).get(REFUSED_VERSIONS_PARAMETER, {})
            return refused_entries(orjson.loads(parameter.get("string_value", "[]")))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return ()


def create_backends(settings: GatewaySettings) -> dict[BackendName, Backend]:
    """The enabled engines, in failover order."""
    factories: dict[BackendName, type[PredictorBackend | TorchServeBackend | TritonBackend]] = {
        "predictor": PredictorBackend,
        "torchserve": TorchServeBackend,
        "triton": TritonBackend,
    }
    return {name: factories[name](settings) for name in settings.backends}
