"""Request deadlines at the HTTP layer: uvicorn's protocol with header and body timeouts.

uvicorn closes idle keep-alive connections, but a connection that sends its request headers a
byte at a time, or its body a byte at a time, stays open as long as it likes (slowloris), and
every such connection holds a slot of the concurrency limit. :class:`DeadlineHttpToolsProtocol`
gives every request

- ``header_timeout_s`` to send its request line and headers (from the connection's start, or from
  the previous response on a keep-alive connection), and at most :data:`MAX_HEADER_BYTES` of them;
- ``body_timeout_s`` plus one second per ``body_min_rate`` bytes received to send its body;

and answers 408 (431 for oversized headers) and closes the connection when one is missed. A
response sent before its request's body has arrived (an early 401) leaves the body deadline
running: uvicorn discards the rest of the body, and only then does the next request's header
deadline start. The
limits come from the server's settings (``DAFNE_SERVER_SETTINGS``, how every uvicorn worker
process gets them); uvicorn loads the class by name: ``http="dafne_server.deadlines:DeadlineHttpToolsProtocol"``.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import ServerSettings

MAX_HEADER_BYTES = 64 * 1024
PROTOCOL = "dafne_server.deadlines:DeadlineHttpToolsProtocol"


@functools.cache
def _limits() -> tuple[float, float, float]:
    settings = ServerSettings.from_env()
    return settings.header_timeout_s, settings.body_timeout_s, float(settings.body_min_rate)


def _reply(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with per-request header and body deadlines (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s, self.body_min_rate = _limits()
        self._deadline = 0.0  # loop time by which the current phase must end
        self._timer: asyncio.TimerHandle | None = None
        self._header_phase = True
        self._header_bytes = 0
        self._body_pending = False  # the current request's headers are in, its body not yet all

    # --- the deadline --------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.time() + seconds
        self._timer = self.loop.call_at(self._deadline, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.loop.time() < self._deadline:  # extended by body received meanwhile
            self._timer = self.loop.call_at(self._deadline, self._expire)
            return
        self.logger.warning("request %s not received in time: connection closed",
                            "headers" if self._header_phase else "body")
        self._refuse(b"408 Request Timeout")

    def _refuse(self, status: bytes) -> None:
        """Answer ``status`` unless the application already answers, and close the connection."""
        if self.transport.is_closing():
            return
        if self._header_phase or (self.cycle is not None and not self.cycle.response_started):
            self.transport.write(_reply(status))
        self.transport.close()

    def _waiting_for_headers(self) -> None:
        self._header_phase, self._header_bytes = True, 0
        self._arm(self.header_timeout_s)

    # --- uvicorn's protocol hooks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_for_headers()

    def data_received(self, data: bytes) -> None:
        in_headers = self._header_phase
        super().data_received(data)
        if in_headers and self._header_phase:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.logger.warning("request headers over %d bytes: connection closed", MAX_HEADER_BYTES)
                self._refuse(b"431 Request Header Fields Too Large")

    def on_headers_complete(self) -> None:
        self._header_phase, self._body_pending = False, True
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._deadline += len(body) / self.body_min_rate  # a slow but steady upload keeps its time
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_pending = False
        self._disarm()  # the application takes what time it needs
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:  # answered early; the body is now drained
            self._next_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._body_pending:  # else the rest of the body comes first, under its own deadline
            self._next_request()

    def _next_request(self) -> None:
        # A keep-alive connection's next request; unless a pipelined one, received already, now runs.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._waiting_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
