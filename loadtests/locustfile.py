"""Locust users for the serving stack. From the repository root, with the stack up (`make up`):

    locust -f loadtests                                 # web UI on :8089, every user class
    locust -f loadtests GatewayTritonUser               # one class by name
    locust -f loadtests -T gateway                      # by tag: gateway | direct | <engine>
    LOADTEST_SHAPE=stepped locust -f loadtests ...      # stepped load (LoadTestShape)

| class | tags | sends |
| --- | --- | --- |
| GatewayPredictorUser | gateway, predictor | `POST /predict?backend=predictor` to the gateway |
| GatewayTorchServeUser | gateway, torchserve | `POST /predict?backend=torchserve` |
| GatewayTritonUser | gateway, triton | `POST /predict?backend=triton` |
| PredictorDirectUser | direct, predictor | `POST /predict` to the predictor |
| TorchServeDirectUser | direct, torchserve | PNG bytes to `/predictions/<model>`, inference key |
| TritonDirectUser | direct, triton | KServe v2 binary request to `<model>_ensemble` |

Gateway users go to ``--host`` (default LOADTEST_GATEWAY_URL, else GATEWAY_PORT on 127.0.0.1).
Direct users always go to their engine's address (LOADTEST_<ENGINE>_URL, defaulting to the
engine's own port setting), also when ``--host`` moves the gateway users elsewhere.

Every user sends held-out digits (PNG, encoded once) back to back, with no think time: each
user is one closed-loop client. Every answer is checked: status 200, the contract's schema,
the engine that answered (a failover shows up as a failure, not as a faster engine), and the
top-1 class, which must equal what the same target answered for that image when idle (see
``targets.py``). A wrong answer is ``resp.failure(...)`` with the reason.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from locust import FastHttpUser, LoadTestShape, constant, events, tag, task
from locust.env import Environment

# Locust imports this file by path, with only the current directory on sys.path: make the
# `loadtests` package importable when Locust is started from elsewhere than the repository root.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from loadtests.targets import (  # noqa: E402
    AnswerError,
    Call,
    LoadTestSettings,
    Payload,
    Reference,
    Target,
    check_answer,
    compute_reference,
    load_payloads,
    load_references,
    make_target,
)

logger = logging.getLogger("loadtests")

SETTINGS = LoadTestSettings()


@dataclass(frozen=True)
class Plan:
    """Everything one target's users need: precomputed requests and the answers to expect."""

    target: Target
    base_url: str
    payloads: list[Payload]
    calls: list[Call]
    reference: Reference


_plans: dict[tuple[str, str], Plan] = {}
_payloads: list[Payload] = []
# The first user of a target computes its plan; the others wait for it instead of repeating.
# Locust has monkey-patched threading and time with gevent before this file is imported, so
# this lock and time.sleep below block only the calling user's greenlet.
_plan_lock = threading.Lock()


@events.init.add_listener  # type: ignore[untyped-decorator]
def _load_payloads(environment: Environment, **_kwargs: object) -> None:
    """Encode the images before the run starts (not on a user's first request: it would count
    against the run time and the first requests' latency)."""
    if not _payloads:
        _payloads.extend(load_payloads(SETTINGS.images))


@events.init.add_listener  # type: ignore[untyped-decorator]
def _select_by_tags(environment: Environment, **_kwargs: object) -> None:
    """Make -T/-E select user classes, not only tasks.

    Locust filters the tasks of every class by tag but keeps the classes: one left without
    tasks crashes when spawned ("No tasks defined"). Every class here has exactly one tagged
    task, so a class is dropped when that task's tags miss -T or hit -E.
    """
    options = environment.parsed_options
    include = set(getattr(options, "tags", None) or [])
    exclude = set(getattr(options, "exclude_tags", None) or [])
    if not include and not exclude:
        return

    def wanted(user_class: type) -> bool:
        if not issubclass(user_class, CheckedUser):
            return True
        tags: set[str] = set()
        for user_task in user_class.tasks:
            tags |= getattr(user_task, "locust_tag_set", set())
        return (not include or bool(tags & include)) and not tags & exclude

    kept = [user_class for user_class in environment.user_classes if wanted(user_class)]
    if not kept:
        logger.error("no user class has the tags -T %s / -E %s", include, exclude)
    environment.user_classes = kept


def plan_for(target_name: str, base_url: str) -> Plan:
    """The (cached) plan of a target at ``base_url``; AnswerError when it cannot be made."""
    key = (target_name, base_url)
    with _plan_lock:
        if key in _plans:
            return _plans[key]
        if not _payloads:
            _payloads.extend(load_payloads(SETTINGS.images))
        target = make_target(target_name, SETTINGS)
        preloaded = load_references(SETTINGS.reference_file) if SETTINGS.reference_file else {}
        reference = preloaded.get(target_name) or compute_reference(
            target, base_url, _payloads, SETTINGS.reference_timeout_s
        )
        payloads = [p for p in _payloads if p.index in reference.expected]
        plan = Plan(target, base_url, payloads, [target.call(p) for p in payloads], reference)
        _plans[key] = plan
        return plan


class CheckedUser(FastHttpUser):
    """One closed-loop client of one target; every answer is checked."""

    abstract = True
    target_name: ClassVar[str]
    #: True: the address is Locust's --host (the gateway); False: the engine's own address.
    via_gateway: ClassVar[bool]
    wait_time = constant(0)

    def base_url(self) -> str:
        if self.via_gateway:
            return (self.host or SETTINGS.gateway_url).rstrip("/")
        return SETTINGS.engine_url(self.target_name.partition(":")[2])

    def predict(self) -> None:
        try:
            plan = plan_for(self.target_name, self.base_url())
        except AnswerError as exc:
            # No reference answers (engine down, wrong key...): show why in the failures tab,
            # and do not spin: try again in a second, the engine may be starting.
            self.environment.events.request.fire(
                request_type="POST",
                name=self.target_name,
                response_time=0,
                response_length=0,
                exception=exc,
                context={},
            )
            time.sleep(1.0)
            return
        i = random.randrange(len(plan.calls))
        call = plan.calls[i]
        with self.client.post(
            plan.base_url + call.path,
            data=call.body,  # type: ignore[arg-type]  # bytes are sent as they are (docstring)
            headers=call.headers,
            name=self.target_name,
            catch_response=True,
        ) as resp:
            if resp.content is None:  # connection refused or reset: Locust has the error
                resp.failure(f"no answer: {resp.error}")
                return
            try:
                answer = plan.target.parse(resp.status_code, resp.headers, resp.content)
                check_answer(answer, plan.payloads[i], plan.reference)
            except AnswerError as exc:
                resp.failure(str(exc))
            else:
                resp.success()


class GatewayPredictorUser(CheckedUser):
    target_name = "gateway:predictor"
    via_gateway = True
    host = SETTINGS.gateway_url

    @tag("gateway", "predictor")
    @task
    def gateway_predictor(self) -> None:
        self.predict()


class GatewayTorchServeUser(CheckedUser):
    target_name = "gateway:torchserve"
    via_gateway = True
    host = SETTINGS.gateway_url

    @tag("gateway", "torchserve")
    @task
    def gateway_torchserve(self) -> None:
        self.predict()


class GatewayTritonUser(CheckedUser):
    target_name = "gateway:triton"
    via_gateway = True
    host = SETTINGS.gateway_url

    @tag("gateway", "triton")
    @task
    def gateway_triton(self) -> None:
        self.predict()


class PredictorDirectUser(CheckedUser):
    target_name = "direct:predictor"
    via_gateway = False
    host = SETTINGS.engine_url("predictor")

    @tag("direct", "predictor")
    @task
    def direct_predictor(self) -> None:
        self.predict()


class TorchServeDirectUser(CheckedUser):
    target_name = "direct:torchserve"
    via_gateway = False
    host = SETTINGS.engine_url("torchserve")

    @tag("direct", "torchserve")
    @task
    def direct_torchserve(self) -> None:
        self.predict()


class TritonDirectUser(CheckedUser):
    target_name = "direct:triton"
    via_gateway = False
    host = SETTINGS.engine_url("triton")

    @tag("direct", "triton")
    @task
    def direct_triton(self) -> None:
        self.predict()


class SteppedLoad(LoadTestShape):
    """Stepped load: LOADTEST_STEP_USERS more users every LOADTEST_STEP_SECONDS, for
    LOADTEST_STEPS steps, then stop. Only with LOADTEST_SHAPE=stepped: Locust uses any shape
    class it finds, and plain `-u/-r/-t` runs must not be forced into this one."""

    abstract = SETTINGS.shape != "stepped"

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // SETTINGS.step_seconds)  # type: ignore[no-untyped-call]
        if step >= SETTINGS.steps:
            return None
        # Spawn each step's users within a second so each step measures a steady load.
        return (step + 1) * SETTINGS.step_users, float(SETTINGS.step_users)
