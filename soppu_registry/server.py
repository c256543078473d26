"""Run the registry app under uvicorn with connection and time limits (`soppu-registry serve`).

uvicorn's HTTP/1.1 protocol (h11) has no header timeout and no cap on open connections: a client
that connects and never finishes its headers holds a file descriptor forever, and enough of them
starve every other client. :func:`limited_protocol` adds, per connection:

* a header timeout: a request's headers must arrive within ``header_timeout`` seconds of the
  connection opening (on a kept-alive connection: of the next request's first byte; an idle one is
  closed by uvicorn's keep-alive timeout, 5 s), else the connection is closed;
* a connection cap: at ``max_connections`` open connections, a new one displaces the connection
  that has waited longest between requests (still sending its headers, or idle), so slow-header
  clients cannot starve prompt ones; when every connection is busy with a request the new one is
  answered 503 ``too_many_connections``;
* no draining of unread bodies: a connection whose response went out before its request body was
  read (401, 413, 408 ...) sends FIN, discards input for LINGER_SECONDS (so the client reads the
  answer instead of a reset), then closes; it counts as waiting for the cap.

The per-chunk body idle timeout is the routes' (``soppu_registry.bodies``): they know when a body
is being read.
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from soppu_client.format.errors import InputError
from soppu_registry.config import RegistryConfig

FD_RESERVE = 64
"""File descriptors kept free beside the connections (SQLite, blob files, the listening socket)."""
LINGER_SECONDS = 2.0
"""How long a connection answered before its body was read keeps discarding that body."""
MAX_BACKLOG = 128
"""Largest listen backlog. asyncio accepts up to a backlog of connections in one go before any of
them reaches the cap, and frees refused ones a loop turn later: up to 2 x backlog descriptors beyond
the cap are in flight, so the backlog is kept small."""


def backlog(max_connections: int) -> int:
    """The listen backlog for a connection cap: min(max_connections, MAX_BACKLOG)."""
    return min(max_connections, MAX_BACKLOG)


def open_files_needed(max_connections: int) -> int:
    """Descriptors the server may hold at once: the cap, accepts in flight, FD_RESERVE."""
    return max_connections + 2 * backlog(max_connections) + FD_RESERVE


def _busy_503() -> bytes:
    body = json.dumps({"error": {"code": "too_many_connections",
                                 "message": "the registry has too many open connections; retry later"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"x-soppu-error-code: too_many_connections\r\nretry-after: 1\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def limited_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol subclass enforcing the header timeout and the connection cap (module doc)."""

    class LimitedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_since: float = 0.0
        _lingering: bool = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections and not self._displace_oldest_waiting():
                transport.write(_busy_503())
                transport.close()
                self.transport = transport
                return
            super().connection_made(transport)
            self._waiting_since = self.loop.time()
            self._arm_header_timer()

        @property
        def _waiting(self) -> bool:
            """Between requests (no request in progress, none of the next one's headers parsed), or
            lingering after an answer given before the body was read."""
            return self._lingering or (self.conn.their_state is h11.IDLE
                                       and (self.cycle is None or self.cycle.response_complete))

        def _displace_oldest_waiting(self) -> bool:
            waiting = [c for c in self.connections if isinstance(c, LimitedH11Protocol) and c._waiting]
            if not waiting:
                return False
            min(waiting, key=lambda c: c._waiting_since)._close()
            return True

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._close)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _close(self) -> None:
            self._disarm_header_timer()
            self.connections.discard(self)  # frees the slot now; connection_lost follows
            if not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A malformed request (h11 refused it: bad header, bad Content-Length ...) gets the
            API's JSON error shape, not uvicorn's text/plain, then the connection closes."""
            body = json.dumps({"error": {"code": "bad_request", "message": f"malformed HTTP request: {msg}"}}).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"x-soppu-error-code: bad_request\r\nconnection: close\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self._close()

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # the rest of a body nobody reads
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_timer()  # the headers are in
            elif self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()  # a kept-alive connection started its next request

        def on_response_complete(self) -> None:
            unread_body = self.conn.their_state is h11.SEND_BODY  # of the request just answered
            super().on_response_complete()  # arms uvicorn's keep-alive timeout
            self._waiting_since = self.loop.time()
            if unread_body and not self.transport.is_closing():
                self._linger()

        def _linger(self) -> None:
            """Answered (401, 413, 408 ...) before reading the body: end our side (FIN), discard what
            the client still sends for LINGER_SECONDS so it can read the answer (closing at once
            would reset the connection under its unread data), then close."""
            self._lingering = True
            self._disarm_header_timer()
            # FIN only once the answer is out of our buffer: with data still buffered, asyncio would
            # shut down later inside its own write callback, where an error is logged, not raised.
            if self.transport.can_write_eof() and not self.transport.get_write_buffer_size():
                try:
                    self.transport.write_eof()
                except OSError:  # the client already went away (reset: ENOTCONN): nothing to linger for
                    self._close()
                    return
            self._header_timer = self.loop.call_later(LINGER_SECONDS, self._close)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            if self.flow is None:  # refused in connection_made: uvicorn never saw it
                return
            super().connection_lost(exc)

    return LimitedH11Protocol


def check_open_files(max_connections: int) -> None:
    """Raise the soft open-file limit to :func:`open_files_needed`; InputError naming the fix if the
    hard limit is lower."""
    need = open_files_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise InputError(f"--max-connections {max_connections} needs {need} open files but the limit is {hard}; "
                             "lower --max-connections or raise `ulimit -n`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def run(app: Any, config: RegistryConfig, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` with ``config``'s connection and time limits (blocks until stopped); call
    :func:`check_open_files` first."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info"),
                http=limited_protocol(config.header_timeout, config.max_connections),
                backlog=backlog(config.max_connections))
