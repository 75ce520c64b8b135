"""How Locust sees the loadtests folder: `locust -f loadtests` must find the six users (the
helper modules beside them define none), no load shape unless asked for, and tags that select
whole user classes.

Each check runs in a subprocess: importing Locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
USERS = [
    "GatewayPredictorUser",
    "GatewayTorchServeUser",
    "GatewayTritonUser",
    "PredictorDirectUser",
    "TorchServeDirectUser",
    "TritonDirectUser",
]

# Loads the folder exactly as `locust -f loadtests` does, then reports what it found.
LOAD = """
import argparse, json, sys
from locust.argument_parser import parse_locustfile_paths
from locust.env import Environment
from locust.main import merge_locustfiles_content

users, shapes, _, shape = merge_locustfiles_content(parse_locustfile_paths(["loadtests"]))
ticks = []
if shape is not None:
    for t in (0.0, 9.9, 10.0, 25.0, 30.0):
        shape.get_run_time = lambda t=t: t
        ticks.append(shape.tick())
selected = {}
for tags, exclude in ((["triton"], ["direct"]), (["direct"], None), (None, ["gateway"])):
    options = argparse.Namespace(tags=tags, exclude_tags=exclude)
    env = Environment(user_classes=list(users.values()), parsed_options=options)
    sys.modules["locustfile"]._select_by_tags(env)  # loadtests/locustfile.py, as Locust named it
    selected[f"{tags}/{exclude}"] = sorted(u.__name__ for u in env.user_classes)
print(json.dumps({"users": sorted(users), "shapes": sorted(shapes), "ticks": ticks,
                  "selected": selected}))
"""


def _load(**env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", LOAD],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_locust_finds_the_users_and_no_shape_by_default() -> None:
    found = _load(LOADTEST_SHAPE="none")
    assert found["users"] == USERS
    assert found["shapes"] == []  # plain -u/-r/-t runs are not forced into the stepped shape
    assert found["selected"] == {
        "['triton']/['direct']": ["GatewayTritonUser"],
        "['direct']/None": ["PredictorDirectUser", "TorchServeDirectUser", "TritonDirectUser"],
        "None/['gateway']": ["PredictorDirectUser", "TorchServeDirectUser", "TritonDirectUser"],
    }


def test_stepped_shape_on_request() -> None:
    found = _load(
        LOADTEST_SHAPE="stepped",
        LOADTEST_STEP_USERS="2",
        LOADTEST_STEP_SECONDS="10",
        LOADTEST_STEPS="3",
    )
    assert found["users"] == USERS
    assert found["shapes"] == ["SteppedLoad"]
    # 2 users for [0, 10) s, 4 for [10, 20), 6 for [20, 30), then the test stops.
    assert found["ticks"] == [[2, 2.0], [2, 2.0], [4, 2.0], [6, 2.0], None]


def test_locust_list_from_the_repository_root() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    listed = [line.strip() for line in out.stdout.splitlines() if line.startswith("    ")]
    assert listed == USERS
