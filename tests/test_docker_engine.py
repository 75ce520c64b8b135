"""tests/docker_engine.py's translation of pip settings for a build, and its wheel mirror, with
real files over real HTTP (the compose test relies on both for a cold build)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.docker_engine import WheelMirror, pip_plan
from tests.processes import free_port


def test_local_indexes_come_first_over_loopback_and_remote_ones_stay(tmp_path: Path) -> None:
    index, more, links = tmp_path / "pypi" / "simple", tmp_path / "more" / "simple", tmp_path / "w"
    plan = pip_plan(
        {
            "extra-index-url": f"file://{index} file://{more}",
            "find-links": str(links),
            "cert": str(tmp_path / "ca.crt"),
            "default-timeout": "180",
        },
        port=4321,
    )
    conf = dict(line.split(" = ", 1) for line in plan.conf.splitlines()[1:])
    assert plan.conf.startswith("[global]\n")
    assert conf["index-url"] == f"http://127.0.0.1:4321{index}/"
    # PyPI (no index-url set: pip's default) after the local ones, so local wheels win ties.
    assert conf["extra-index-url"].split() == [
        f"http://127.0.0.1:4321{more}/",
        "https://pypi.org/simple",
    ]
    assert conf["find-links"] == f"http://127.0.0.1:4321{links}/"
    assert conf["cert"] == "/etc/pip/host-ca-bundle.crt" and conf["timeout"] == "180"
    # An index's pages link to ../../files: its parent is served.
    assert plan.roots == (index.parent, more.parent, links)
    assert plan.cert == tmp_path / "ca.crt"


def test_remote_only_settings_need_no_mirror() -> None:
    plan = pip_plan({"index-url": "https://mirror.example/simple"}, port=1)
    assert plan.conf == "[global]\nindex-url = https://mirror.example/simple\n"
    assert plan.roots == () and plan.cert is None


def test_mirror_serves_the_roots_and_nothing_else(tmp_path: Path) -> None:
    files = tmp_path / "pypi" / "files"
    files.mkdir(parents=True)
    (files / "demo-1.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    secret = tmp_path / "secret.txt"
    secret.write_text("not served")
    port = free_port()
    with WheelMirror([tmp_path / "pypi"], port):
        base = f"http://127.0.0.1:{port}"
        wheel = httpx.get(f"{base}{files}/demo-1.0-py3-none-any.whl", timeout=5)
        assert wheel.status_code == 200 and wheel.content == b"wheel bytes"
        listing = httpx.get(f"{base}{files}/", timeout=5)
        assert "demo-1.0-py3-none-any.whl" in listing.text  # what find-links parses
        assert httpx.get(f"{base}{secret}", timeout=5).status_code == 404
        escape = httpx.get(f"{base}{files}/../../secret.txt", timeout=5)
        assert escape.status_code == 404
