"""The body of a position stream (docs/PROTOCOL.md §2): header, blocks, end record.

Blocks are read in a worker thread, one block ahead of the socket: the disk and the network
work at once, and a stream holds about two blocks of memory whatever its range. When the
client goes away the read-ahead is dropped; a client that sees a stream without its end record
asks again from its last verified block. A store found damaged mid-stream ends the stream
with an error record (PROTOCOL.md §2), which the client does not retry, and is counted as a
500 in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

import logitstore
from logitstore.format.chunks import CHUNKS_MEDIA_TYPE
from logitstore.format.protocol import encode_block, encode_end, encode_error, encode_header

from .chunks import chunk_response, chunk_stream_layout
from .deps import Span
from .metrics import Metrics, mark_failed
from .send import COPIED_PIECE_BYTES, pieces

if TYPE_CHECKING:
    from logitstore.format.schema import StoredRows

__all__ = ["MEDIA_TYPE", "stream_response"]

MEDIA_TYPE = "application/x-logitstore-stream"
#: streamed bytes are counted under one route label, whichever route streams them
_BYTES_LABEL = "/v1/stores/{name}/positions"
log = logging.getLogger("logitstore.server")


def stream_response(
    span: Span, block_positions: int, metrics: Metrics, accept: str = ""
) -> StreamingResponse:
    """``span`` as a stream of blocks of at most ``block_positions`` rows; as the compressed
    stream (chunks.py, PROTOCOL.md §2.1) when ``accept`` asks for it and the store allows."""
    if CHUNKS_MEDIA_TYPE in accept:
        layout = chunk_stream_layout(span.store)
        if layout is not None:
            return chunk_response(span, layout, metrics, block_positions)
    return StreamingResponse(
        _body(span.store, span.start, span.stop, block_positions, metrics),
        media_type=MEDIA_TYPE,
        headers={"X-Logitstore-Positions": f"{span.start}-{span.stop}", "Vary": "Accept"},
    )


async def _body(
    store: logitstore.LogitStore, start: int, stop: int, step: int, metrics: Metrics
) -> AsyncIterator[bytes | memoryview]:
    def read_ahead(a: int) -> asyncio.Future[StoredRows] | None:
        """Start reading the block at ``a`` in a thread (``None`` at the end)."""
        if a >= stop:
            return None
        return asyncio.ensure_future(asyncio.to_thread(store.read_stored, a, min(a + step, stop)))

    yield encode_header(store.metadata, start, stop)
    pending = read_ahead(start)
    a = start
    try:
        while pending is not None:
            rows = await pending
            pending = read_ahead(a + step)  # read the next block while this one goes out
            block = encode_block(a, rows)
            del rows  # the block holds a copy: a slow client keeps one, not two
            metrics.add_bytes(_BYTES_LABEL, len(block))
            for piece in pieces(block, COPIED_PIECE_BYTES):
                # A copy: the transport keeps a view of what the socket has not taken
                # (cycle.py), and a view of the block would keep all of it while the next
                # is built and the one after read (three blocks per stalled client, not two).
                yield bytes(piece)
            del block
            a += step
        yield encode_end(stop, stop - start)
    except logitstore.LogitStoreError as e:  # damage found mid-stream: say so, then end
        log.warning("stream of positions [%d, %d) stopped: %s", start, stop, e)
        mark_failed()
        yield encode_error("store_error", str(e))
    finally:  # the client went away (or a read failed): drop the read-ahead
        if pending is not None:
            pending.cancel()
