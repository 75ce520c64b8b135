"""The base of every service's one settings class.

A service subclasses :class:`ServiceSettings`, sets its own ``env_prefix`` and documents each
field with a docstring right under it (pydantic turns those into field descriptions, so
:func:`settings_table` can print the README's table from the code). Values are validated when
the service starts: a bad one stops it with pydantic's message naming the variable.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.http import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_BUFFERED_BYTES
from services.common.limits import HttpLimits

_LIMITS = HttpLimits()

LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    """Fields every HTTP service has. Subclasses set ``env_prefix`` and a default ``port``."""

    model_config = SettingsConfigDict(
        extra="forbid", validate_default=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 to accept connections from other hosts or containers."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    log_level: LogLevel = "info"
    """Log level of the service and of uvicorn."""
    access_log: bool = False
    """Log one line per request (off by default: it costs throughput and Prometheus counts them)."""
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    """Largest request body in bytes; larger ones get 413 before they are parsed."""
    max_buffered_bytes: int = Field(default=DEFAULT_MAX_BUFFERED_BYTES, ge=1)
    """Most request-body bytes held at once across all connections; a request that would pass
    it gets 503 with Retry-After before its body is read."""
    max_header_bytes: int = Field(default=_LIMITS.max_header_bytes, ge=1024)
    """Largest request head (request line and headers) in bytes; a larger one gets 431 and the
    connection is closed."""
    max_header_line_bytes: int = Field(default=_LIMITS.max_header_line_bytes, ge=256)
    """Longest request line (414 beyond) or header line (431 beyond) in bytes."""
    max_headers: int = Field(default=_LIMITS.max_headers, ge=1)
    """Most headers in one request; more get 431."""
    header_timeout_s: float = Field(default=_LIMITS.header_timeout_s, gt=0.0)
    """Time a request head may take from its first byte (408 after it); a connection that sends
    nothing is closed after it too."""
    body_timeout_s: float = Field(default=_LIMITS.body_timeout_s, gt=0.0)
    """Longest silence while a request body is being read (408 after it)."""
    drain_max_bytes: int = Field(default=_LIMITS.drain_max_bytes, ge=0)
    """After an answer given before the body was complete (413, 401, ...), bytes of the rest
    that are read and dropped, so that a client still uploading reads the answer, before the
    connection is closed."""
    drain_timeout_s: float = Field(default=_LIMITS.drain_timeout_s, gt=0.0)
    """Longest time that draining may take."""

    def http_limits(self) -> HttpLimits:
        """The limits of :mod:`services.common.limits` these settings ask for."""
        return HttpLimits(
            max_header_line_bytes=self.max_header_line_bytes,
            max_header_bytes=self.max_header_bytes,
            max_headers=self.max_headers,
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            drain_max_bytes=self.drain_max_bytes,
            drain_timeout_s=self.drain_timeout_s,
        )


def configure_logging(level: LogLevel) -> None:
    """One format for the service's own loggers; uvicorn keeps its own handlers."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def settings_table(settings_cls: type[BaseSettings]) -> str:
    """Markdown table of a settings class: environment variable, default, description."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in settings_cls.model_fields.items():
        default: Any = field.get_default(call_default_factory=True)
        shown = "(none)" if default is None else f"`{default}`"
        meaning = " ".join((field.description or "").split())
        rows.append(f"| `{prefix}{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)
