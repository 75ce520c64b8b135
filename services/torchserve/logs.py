"""TorchServe's log4j2 configuration: every line written once, every file capped in size.

TorchServe 0.12's built-in ``log4j2.xml`` sends ``org.pytorch.serve`` to ``ts_log.log`` through
its own appender *and* through the root logger's (log4j loggers are additive), at DEBUG, and
every other logger (the access log, the workers' output, the metrics) to the console and
``ts_log.log`` as well as to its own file, each file rolling only at 100 MB: every line appears
two or three times and a short session wrote about 18 MB. The launcher passes this
configuration instead (``--log-config``):

* the frontend's and the workers' lines (``org.pytorch.serve``, ``MODEL_LOG``) go once, at
  INFO, to one place: the console when TorchServe runs in the foreground under a supervisor
  (supervisord captures and rotates it: ``runs/stack/logs/torchserve.log``), else
  ``logs/ts_log.log``;
* the access log (one line per request) and the metrics loggers go only to their own files;
* every file rolls over at ``max_bytes`` and keeps ``backups`` old files (a size cap, no daily
  files).
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

LOG_CONFIG_NAME = "log4j2.xml"
MAIN_LOG = "ts_log.log"
ACCESS_LOG = "access_log.log"
METRICS_LOG = "metrics_log.log"
_PATTERN = "%d{ISO8601} [%-5p] %t %c - %m%n"


def _rolling(name: str, path: Path, max_bytes: int, backups: int, pattern: str) -> str:
    rolled = path.with_name(f"{path.stem}.%i{path.suffix}")
    return (
        f"    <RollingFile name={quoteattr(name)} fileName={quoteattr(str(path))}"
        f" filePattern={quoteattr(str(rolled))}>\n"
        f"      <PatternLayout pattern={quoteattr(pattern)}/>\n"
        f'      <Policies><SizeBasedTriggeringPolicy size="{max_bytes}"/></Policies>\n'
        f'      <DefaultRolloverStrategy max="{backups}"/>\n'
        "    </RollingFile>\n"
    )


def render_log_config(log_dir: Path, *, console: bool, max_bytes: int, backups: int) -> str:
    """The ``log4j2.xml`` text for an instance logging into ``log_dir`` (see the module
    docstring); ``console``: the main log goes to standard output instead of ``ts_log.log``."""
    if max_bytes < 1 or backups < 1:
        raise ValueError("max_bytes and backups must be at least 1")
    main = "console" if console else "ts_log"
    appenders = (
        '    <Console name="console" target="SYSTEM_OUT">\n'
        f"      <PatternLayout pattern={quoteattr(_PATTERN)}/>\n"
        "    </Console>\n"
        + _rolling("ts_log", log_dir / MAIN_LOG, max_bytes, backups, _PATTERN)
        + _rolling("access_log", log_dir / ACCESS_LOG, max_bytes, backups, "%d{ISO8601} - %m%n")
        + _rolling("metrics_log", log_dir / METRICS_LOG, max_bytes, backups, "%d{ISO8601} - %m%n")
    )
    own_file = "".join(
        f'    <Logger name="{name}" level="info" additivity="false">'
        f'<AppenderRef ref="{appender}"/></Logger>\n'
        for name, appender in (
            ("ACCESS_LOG", "access_log"),
            ("MODEL_METRICS", "metrics_log"),
            ("TS_METRICS", "metrics_log"),
        )
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!-- Rendered by services/torchserve/logs.py: each line once, every file capped. -->\n"
        "<Configuration>\n  <Appenders>\n"
        + appenders
        + "  </Appenders>\n  <Loggers>\n"
        + own_file
        + '    <Logger name="io.netty" level="error"/>\n'
        + '    <Logger name="org.apache" level="off"/>\n'
        + f'    <Root level="info"><AppenderRef ref="{main}"/></Root>\n'
        + "  </Loggers>\n</Configuration>\n"
    )
