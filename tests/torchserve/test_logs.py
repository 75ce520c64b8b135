"""TorchServe's logs as the launcher configures them: every line once, every file size-capped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import httpx
import pytest

from services.torchserve.launcher import LOG_BACKUPS, LOG_MAX_BYTES, Instance
from services.torchserve.logs import (
    ACCESS_LOG,
    LOG_CONFIG_NAME,
    MAIN_LOG,
    render_log_config,
)
from tests.conftest import PublishedModel
from tests.processes import wait_for

pytestmark = pytest.mark.slow


def test_every_line_is_written_once_and_requests_stay_out_of_the_main_log(
    torchserve: Instance, published_model: PublishedModel
) -> None:
    for image in published_model.images[:5]:
        response = httpx.post(
            torchserve.predictions_url(),
            content=image,
            headers=torchserve.inference_headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
    logs = torchserve.settings.log_dir
    wait_for(lambda: (logs / ACCESS_LOG).is_file(), 30, "the access log")
    wait_for(lambda: "/predictions/" in (logs / ACCESS_LOG).read_text(), 30, "access lines")
    main = (logs / MAIN_LOG).read_text().splitlines()
    # The frontend's lines and the worker's output (MODEL_LOG), each once, with its time to
    # the millisecond (lines without one continue a message, like the start-up banner's).
    assert any("Torchserve version" in line for line in main), main[:20]
    assert any("MODEL_LOG - Torch worker started" in line for line in main), main[:40]
    stamped = [line for line in main if re.match(r"\d{4}-\d\d-\d\dT", line)]
    repeated = {line: n for line, n in Counter(stamped).items() if n > 1}
    assert not repeated, f"lines written more than once: {list(repeated)[:5]}"
    assert not any("/predictions/" in line for line in main)  # the access log has them
    assert not any("[DEBUG]" in line for line in main)
    # TorchServe 0.12's own configuration would have written these files as well.
    assert not (logs / "model_log.log").exists() and not (logs / "ts_metrics.log").exists()
    config = ET.parse(torchserve.settings.run_path / LOG_CONFIG_NAME).getroot()
    for appender in config.iter("RollingFile"):
        policy = appender.find("Policies/SizeBasedTriggeringPolicy")
        assert policy is not None and int(policy.get("size", "0")) == LOG_MAX_BYTES
        strategy = appender.find("DefaultRolloverStrategy")
        assert strategy is not None and strategy.get("max") == str(LOG_BACKUPS)


def test_in_the_foreground_the_main_log_is_the_console(tmp_path: Path) -> None:
    text = render_log_config(tmp_path, console=True, max_bytes=1000, backups=2)
    root = ET.fromstring(text).find("Loggers/Root")
    assert root is not None
    assert [ref.get("ref") for ref in root.iter("AppenderRef")] == ["console"]
    loggers = ET.fromstring(text).findall("Loggers/Logger")
    # A logger with its own appender does not also pass its lines to the root's.
    for logger in loggers:
        if logger.find("AppenderRef") is not None:
            assert logger.get("additivity") == "false", logger.get("name")
    with pytest.raises(ValueError):
        render_log_config(tmp_path, console=True, max_bytes=0, backups=2)
