"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``) but
waits for ever for the headers of a request: on a fresh connection that sends nothing, or sends part of
its headers and stalls. Here the clock starts when the connection opens (or the next request's first
byte arrives) and the connection is closed if the headers are not complete ``header_timeout`` seconds
later. The body's own deadline is the body-limit middleware's (errors.BodyLimitMiddleware).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol closing connections whose request headers do not arrive in time."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm_header_deadline()  # a no-op when the clock already runs for these headers
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        """No request in progress: the next bytes are (part of) a request's headers."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers() or self.transport.is_closing():
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def protocol_class(header_timeout: float) -> type[Any]:
    """A HeaderDeadlineProtocol with this deadline (uvicorn's Config takes a class, not options)."""
    return type("QwenVLHTTPProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
