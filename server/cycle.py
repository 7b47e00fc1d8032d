"""How a streamed body reaches the socket: :class:`ViewCycle`, uvicorn's request/response
cycle with the pieces of a chunked body written as they are, not copied.

uvicorn frames each piece of a chunked body by joining its size line, the piece and CRLF
into one new ``bytes``: a copy of every byte the server streams, and for pieces of 1 MiB a
fresh allocation each (its pages faulted in, then given back). :class:`ViewCycle` hands the
transport the three parts instead (``writelines``: one vectored write, no copy). The
transport then may keep a view of a piece the socket has not taken yet, so whoever yields a
view of a buffer must not refill that buffer while such a view lives: the compressed stream's
``StepBuffers`` (server/steps.py) tests that before each refill (a ``bytearray`` with live
views cannot change size), and every other streamed body yields fresh ``bytes``.

Everything but a body piece of a chunked response (the status line and headers, the last
piece, a HEAD answer, a body with Content-Length) goes through uvicorn's own ``send``.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

__all__ = ["ViewCycle", "use_view_cycle"]


class ViewCycle(RequestResponseCycle):
    """:class:`RequestResponseCycle` whose chunked body pieces go to the transport uncopied."""

    async def send(self, message: Any) -> None:
        if not (
            self.response_started
            and not self.response_complete
            and self.chunked_encoding
            and message["type"] == "http.response.body"
            and message.get("more_body", False)
            and message.get("body")
            and self.scope["method"] != "HEAD"
        ):
            await super().send(message)
            return
        # as uvicorn's send: wait while the transport holds more than its high-water mark
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        body = message["body"]
        self.transport.writelines([b"%x\r\n" % len(body), body, b"\r\n"])


def use_view_cycle(cycle: object, loop: object) -> None:
    """Make ``cycle`` (the protocol's newest, its task not yet run) a :class:`ViewCycle`.

    Only an exact uvicorn cycle is changed (another's layout is not known here), and only on
    uvloop, the server's loop (uvicorn[standard]): asyncio's own ``writelines`` joins the
    parts before Python 3.12, and in 3.12.0-3.12.7 and 3.13.0 never pauses the protocol, so a
    slow client's whole answer would pile up in memory (CPython gh-127655)."""
    if type(cycle) is RequestResponseCycle and type(loop).__module__.startswith("uvloop"):
        cycle.__class__ = ViewCycle
