"""What a streamed body hands the socket at a time: :func:`pieces`.

uvicorn writes each piece of a chunked body as one new ``bytes`` (size line, data, CRLF
joined), and asyncio keeps whatever the socket did not take at once in the transport's
buffer; the body waits for that buffer to drain before its next piece. A block handed over
whole is therefore copied whole into that buffer when the client reads slowly. Handed over in
pieces of :data:`PIECE_BYTES`, the copy is one piece: a stalled stream holds the block being
sent, one piece, and the block read ahead (docs/PROTOCOL.md §2, §2.1).
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["PIECE_BYTES", "pieces"]

#: bytes per write to the socket; a loopback socket takes more than this per call anyway
PIECE_BYTES = 256 << 10


def pieces(data: bytes | memoryview) -> Iterator[memoryview]:
    """``data`` as consecutive views of at most :data:`PIECE_BYTES` (no copies)."""
    view = memoryview(data)
    for i in range(0, len(view), PIECE_BYTES):
        yield view[i : i + PIECE_BYTES]
