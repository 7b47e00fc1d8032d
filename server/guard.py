"""Limits on what a client may hold before its request is known (docs/PROTOCOL.md §4):
the HTTP protocol the server runs, :class:`GuardedHttpTools`.

uvicorn's parser keeps every header line it is sent and waits forever for the end of the
headers, and authentication can only run after that. So, per connection, before a request's
headers are complete:

* at most :data:`MAX_HEADER_BYTES` of request line and headers: more is answered 431
  ``headers_too_large`` and the connection closed (128 MiB of headers once cost 2 GiB);
* at most :data:`HEADER_TIMEOUT` seconds: then the connection is closed (a connection that
  never finishes its headers would hold a file descriptor for ever);
* at most :data:`MAX_WAITING` such connections per process: the oldest is closed when one
  more arrives, so half-sent requests cannot take every descriptor from new clients.

Between requests, a kept-alive connection waits up to :data:`KEEP_ALIVE` seconds for the next
one (a trainer reads, trains a step, reads again: with uvicorn's 5 s, every step longer than
that found its connection closed and paid a retry), and at most :data:`MAX_IDLE` connections
per process wait so: the longest idle is closed when one more arrives.

And a request's body must be whole within :data:`BODY_TIMEOUT` seconds of its headers, or
the connection is closed: each byte received restarts uvicorn's keep-alive timer, so a body
sent a byte at a time would otherwise hold its connection for ever. A body of more than
:data:`MAX_BODY_BYTES` is answered 413 ``body_too_large`` and the connection closed: bodies
are read whole before they are parsed (1.5 GB once cost 1.6 GB).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .cycle import use_view_cycle

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "KEEP_ALIVE",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_IDLE",
    "MAX_WAITING",
    "PROTOCOL",
    "GuardedHttpTools",
    "raise_fd_limit",
]

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 10.0
#: seconds from a request's headers to the end of its body (the one body, TRL's, is small)
BODY_TIMEOUT = 60.0
#: the largest request body (TRL's requests of token ids: a few MiB)
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_WAITING = 256
#: seconds a kept-alive connection may wait for its next request (uvicorn's setting)
KEEP_ALIVE = 75.0
#: kept-alive connections per process waiting for their next request
MAX_IDLE = 1024
#: what uvicorn's ``http`` setting names (an import string reaches worker processes)
PROTOCOL = "logitstore_server.guard:GuardedHttpTools"

#: connections of this process still waiting for a request's headers, oldest first
_waiting: OrderedDict[GuardedHttpTools, float] = OrderedDict()
#: kept-alive connections of this process between requests, longest idle first
_idle: OrderedDict[GuardedHttpTools, float] = OrderedDict()


class _TooLarge(Exception):
    """Stops the parser inside a callback; the 431 has been sent."""


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._raw_bytes = 0
        self._header_timer: Any = None
        self._body_timer: Any = None
        self._body_bytes = 0
        self._refused = False

    # -- waiting for headers ----------------------------------------------------------------

    def _await_headers(self) -> None:
        self._header_bytes = 0
        self._raw_bytes = 0
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._header_timeout)
        _waiting[self] = time.monotonic()
        while len(_waiting) > MAX_WAITING:
            oldest = next(iter(_waiting))
            oldest._drop()

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        _waiting.pop(self, None)

    def _drop(self) -> None:
        self._headers_done()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        self._drop()

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse()
        if self._refused:
            raise _TooLarge

    def _refuse(
        self,
        status: bytes = b"431 Request Header Fields Too Large",
        code: str = "headers_too_large",
        message: str = f"request line and headers exceed {MAX_HEADER_BYTES} bytes",
    ) -> None:
        if not self._refused:
            self._refused = True
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            self.transport.write(
                b"HTTP/1.1 " + status + b"\r\n"
                b"content-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                b"" + body
            )
            self._drop()

    # -- uvicorn's hooks ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self._body_done()
        _idle.pop(self, None)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, no request pipelined
            _idle[self] = time.monotonic()
            while len(_idle) > MAX_IDLE:
                oldest, _ = _idle.popitem(last=False)
                oldest._drop()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # httptools reports a header only once its line ends, keeping the unfinished line
        # meanwhile: bytes received while the headers are awaited count too, so one endless
        # line cannot grow past the limit (a read is at most 256 KiB beyond it)
        if self in _waiting:
            self._raw_bytes += len(data)
        super().data_received(data)
        if self in _waiting and self._raw_bytes > MAX_HEADER_BYTES:
            self._refuse()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refused request's parser error is ours: 431 went out
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        _idle.pop(self, None)
        super().on_message_begin()
        self._await_headers()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._headers_done()
        self._body_done()
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(BODY_TIMEOUT, self._drop)
        super().on_headers_complete()
        use_view_cycle(self.cycle, self.loop)  # body pieces written uncopied (cycle.py)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            if self.cycle is not None and self.cycle.response_started:
                self._refused = True  # an answer is under way: no second status line on it
                self._drop()
            else:
                self._refuse(
                    b"413 Content Too Large",
                    "body_too_large",
                    f"the request body exceeds {MAX_BODY_BYTES} bytes",
                )
            raise _TooLarge
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_done()
        super().on_message_complete()

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (connections are
    files); returns the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft
