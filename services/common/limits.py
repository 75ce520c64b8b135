"""The bounded HTTP/1.1 front end both services run under uvicorn (nginx's limits, in uvicorn).

uvicorn's httptools protocol reads whatever a client sends: a header of any size (httptools
joins its pieces in memory, copying it again for every read), any number of headers, a head or
a body that never ends, and, after an early answer such as a 413, the rest of the upload however
large. :class:`BoundedHttpToolsProtocol` is that protocol with limits, each an
:class:`HttpLimits` field and each answered with ``{"error", "code"}`` JSON:

* **Head size** (request line and headers): a URL longer than ``max_header_line_bytes`` gets
  414, a header line longer than that, more than ``max_headers`` headers or a head larger than
  ``max_header_bytes`` get 431. The head's bytes are counted as they arrive, so a header that is
  still growing is refused once the head passes the limit, after at most one more read.
* **Read timeouts**: a head not complete ``header_timeout_s`` after its first byte, or a body
  that sends nothing for ``body_timeout_s`` while the server waits for it, gets 408. A fresh
  connection that sends nothing at all is closed silently after ``header_timeout_s``.
* **Lingering close**: an answer given before the request body is complete (413, 401, 503,
  431, ...) closes the connection (``Connection: close``), but not at once: closing a socket
  with unread data makes the kernel reset the connection, and a client that sends its whole
  body before reading (Python's urllib, most scripts) would see ``Connection reset by peer``
  instead of the answer. So the server half-closes (its FIN follows the answer), then reads and
  drops what the client still sends, up to ``drain_max_bytes`` or ``drain_timeout_s``,
  whichever comes first, and closes. An endless upload costs that bound, never more.

It builds on the internals of uvicorn's ``HttpToolsProtocol`` (uvicorn's version is pinned;
``tests/common/test_http_limits.py`` runs every limit against real processes). A timer per
connection checks the deadlines lazily (it is re-armed only when it fires), so a
request costs a few attribute writes, not timer calls. The body memory the apps buffer is
bounded apart from this, by :class:`services.common.http.BodySizeLimit`'s shared budget.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)

Phase = Literal["head", "body", "idle", "linger"]


@dataclass(frozen=True)
class HttpLimits:
    """What one request may cost the server before the application sees it; see the module."""

    max_header_line_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    drain_max_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_header_line_bytes", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("header_timeout_s", "body_timeout_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.drain_max_bytes < 0:
            raise ValueError("drain_max_bytes must be >= 0")


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` / ``uvicorn.run(http=...)``."""
    configured = limits

    class ConfiguredProtocol(BoundedHttpToolsProtocol):
        limits = configured

    return ConfiguredProtocol


def error_answer(
    status: int, message: str, code: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A whole HTTP/1.1 answer with a ``{"error", "code"}`` body and ``Connection: close``."""
    body = orjson.dumps({"error": message, "code": code})
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing a head that broke a limit."""


class _GuardedTransport(asyncio.Transport):
    """The connection's transport as uvicorn's protocol and request cycles see it: a close they
    ask for goes through :meth:`BoundedHttpToolsProtocol.close_requested` (which may linger
    first), and nothing is written once the connection is closing."""

    def __init__(self, raw: asyncio.Transport, protocol: BoundedHttpToolsProtocol) -> None:
        super().__init__()
        self.raw = raw
        self._protocol = protocol
        self.lingering = False  # set by the protocol: nothing more is written or paused

    def close(self) -> None:
        self._protocol.close_requested()

    def is_closing(self) -> bool:
        return self.lingering or self.raw.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.lingering:
            self.raw.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self.lingering:
            self.raw.writelines(list_of_data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if not self.lingering:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits()

    def write_eof(self) -> None:
        self.raw.write_eof()

    def can_write_eof(self) -> bool:
        return self.raw.can_write_eof()

    def abort(self) -> None:
        self.raw.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.raw.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.raw.get_protocol()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HttpLimits` (see the module docstring)."""

    limits = HttpLimits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._max_line = self.limits.max_header_line_bytes
        self._max_headers = self.limits.max_headers
        self._max_head = self.limits.max_header_bytes
        self.raw: asyncio.Transport | None = None
        self.phase: Phase = "head"
        self._since = 0.0  # head: its first byte; body: the last body byte (or its head)
        self._head_bytes = 0  # bytes of the reads that ended inside the current head
        self._head_size = 0  # exact size of the head's parsed part (URL, then whole headers)
        self._header_count = 0
        self._keep_alive_wanted = False
        self._refusal: tuple[int, str, str] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._linger_left = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass
        self.raw = transport
        self.guarded = _GuardedTransport(transport, self)
        super().connection_made(self.guarded)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._watchdog, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == "linger":
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self._close_now()
            return
        if self.phase == "idle":
            self._start_head()  # the next request's first bytes (on_message_begin follows)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._refusal is None:
                raise
            self._refuse_head(*self._refusal)
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.phase == "head" and self.raw is not None and not self.raw.is_closing():
            # The whole read belonged to a head that is still incomplete (or, when a pipelined
            # request began inside it, partly to the previous body: counted anyway).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head(431, self._too_large_message(), "headers_too_large")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.phase != "head":
            self._start_head()
        self._head_bytes = self._head_size = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_size += len(url)
        if self._head_size > self._max_line:
            self._stop_head(
                414,
                f"the request line is over the limit of {self.limits.max_header_line_bytes} bytes",
                "uri_too_long",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        # Every header of every request passes here: the checks are one comparison each, and
        # uvicorn's own bookkeeping is done inline rather than through a second call.
        line = len(name) + len(value)
        self._header_count += 1
        self._head_size += line + 4  # "name: value\r\n", on top of the URL
        if (
            line > self._max_line
            or self._header_count > self._max_headers
            or self._head_size > self._max_head
        ):
            self._refuse_header(line)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _refuse_header(self, line: int) -> None:
        limits = self.limits
        if line > limits.max_header_line_bytes:
            self._stop_head(
                431,
                f"a header line is over the limit of {limits.max_header_line_bytes} bytes",
                "header_line_too_large",
            )
        if self._header_count > limits.max_headers:
            self._stop_head(
                431, f"more than {limits.max_headers} request headers", "too_many_headers"
            )
        self._stop_head(431, self._too_large_message(), "headers_too_large")

    def on_headers_complete(self) -> None:
        self.phase = "body"
        self._since = self.loop.time()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # Until its body is complete, an answer to this request closes the connection (and
            # lingers): the rest of that body is never parsed as a next request. The request's
            # own keep-alive is given back once the body is in (on_message_complete).
            self._keep_alive_wanted = cycle.keep_alive
            cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._since = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.phase = "idle"
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = self._keep_alive_wanted
        super().on_message_complete()

    def shutdown(self) -> None:
        self._keep_alive_wanted = False  # a request still arriving is the last one
        super().shutdown()

    # Closing

    def close_requested(self) -> None:
        """uvicorn asked to close: linger when the request is still arriving, else close."""
        if self.raw is None or self.raw.is_closing() or self.phase == "linger":
            return
        cycle = self.cycle
        if cycle is not None and cycle.more_body and cycle.response_complete:
            self._linger()
        else:
            self.raw.close()

    def _error(self, status: int, message: str, code: str) -> bytes:
        return error_answer(status, message, code, self.server_state.default_headers)

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(self._error(400, msg, "bad_request"))

    def _linger(self) -> None:
        assert self.raw is not None
        self.phase = "linger"
        self.guarded.lingering = True
        self._unset_keepalive_if_required()
        self._linger_left = self.limits.drain_max_bytes
        if self.raw.can_write_eof():
            self.raw.write_eof()  # the client sees the answer, then the end of it
        self.flow.read_paused = False
        self.raw.resume_reading()
        self._linger_timer = self.loop.call_later(self.limits.drain_timeout_s, self._close_now)

    def _close_now(self) -> None:
        if self.raw is not None and not self.raw.is_closing():
            self.raw.close()

    def _answer_and_close(self, answer: bytes) -> None:
        """Write an answer of our own (nothing of the app's started) and linger."""
        assert self.raw is not None
        if self.raw.is_closing() or self.phase == "linger":
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app (if one runs for this request) sees a disconnect and answers nothing.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:  # too late for an answer of ours
                self.raw.close()
                return
        self.raw.write(answer)
        self._linger()

    # Heads

    def _start_head(self) -> None:
        self.phase = "head"
        self._since = self.loop.time()
        self._head_bytes = 0
        self._arm(self.limits.header_timeout_s)

    def _too_large_message(self) -> str:
        return f"the request head is over the limit of {self.limits.max_header_bytes} bytes"

    def _stop_head(self, status: int, message: str, code: str) -> None:
        self._refusal = (status, message, code)
        raise _HeadRefused(message)

    def _refuse_head(self, status: int, message: str, code: str) -> None:
        logger.info("refused a request head: %s (%d %s)", message, status, code)
        self._refusal = None
        self._answer_and_close(self._error(status, message, code))

    # The read deadlines

    def _arm(self, delay: float) -> None:
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(delay, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self.raw is None or self.raw.is_closing():
            return
        now = self.loop.time()
        limits = self.limits
        if self.phase == "head":
            left = self._since + limits.header_timeout_s - now
            if left > 0:
                self._arm(left)
            elif self._head_bytes:
                self._answer_and_close(
                    self._error(
                        408,
                        f"the request head did not arrive within {limits.header_timeout_s:g} s",
                        "request_timeout",
                    )
                )
            else:
                self.raw.close()  # an idle connection that never sent a request
        elif self.phase == "body":
            if self.flow.read_paused:  # the app is not reading: the wait is ours, not theirs
                self._since = now
            left = self._since + limits.body_timeout_s - now
            if left > 0:
                self._arm(left)
                return
            self._answer_and_close(
                self._error(
                    408,
                    f"no request body bytes arrived for {limits.body_timeout_s:g} s",
                    "request_timeout",
                )
            )
