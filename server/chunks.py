"""The compressed stream (docs/PROTOCOL.md §2.1): stored inner chunks, copied from the shards.

A request whose ``Accept`` names ``application/x-logitstore-chunks`` gets, for every
per-position array, the inner chunks that cover its range, exactly as the shard files hold
them (compressed, checksum included); the client decodes. The server reads each shard's index
once (checked against its CRC-32C, then cached); afterwards each chunk is one copy from the
page cache into a buffer the stream reuses, and its CRC-32C is checked (damage on the
server's disk is a store error, not something the client should retry): no decompression,
no per-position work. A store this cannot serve (object storage,
or codecs the protocol does not carry) answers with the row stream (stream.py) instead, which
every client reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import StreamingResponse

import logitstore
from logitstore.format.chunks import (
    CHUNKS_MEDIA_TYPE,
    ChunkColumn,
    chunk_layout,
    chunk_plan,
    encode_chunks_header,
)
from logitstore.format.protocol import encode_end, encode_error

from .deps import Span
from .metrics import Metrics, mark_failed
from .send import pieces
from .steps import (
    StepBuffers,
    can_read_cached,
    fits_loop,
    read_from_disk,
    read_step,
    shards,
    steps,
)

__all__ = ["chunk_response", "chunk_stream_layout"]

log = logging.getLogger("logitstore.server")
_BYTES_LABEL = "/v1/stores/{name}/positions"


_layouts: dict[tuple[str, int], list[ChunkColumn] | None] = {}


def chunk_stream_layout(store: logitstore.LogitStore) -> list[ChunkColumn] | None:
    """The store's per-position arrays as the compressed stream carries them, or ``None``
    when it cannot (a store in object storage, or codecs the stream does not carry)."""
    if isinstance(store.path, str):
        return None
    key = (str(store.path), id(store))
    if key not in _layouts:
        # Checked once per store: a commit record of 0 inside a complete store is damage
        # (FORMAT.md §6); such a store goes through the row stream, which names it.
        damaged = not bool(store.commit_records().all())
        _layouts[key] = None if damaged else chunk_layout(Path(store.path), store.metadata)
    return _layouts[key]


def chunk_response(
    span: Span, layout: list[ChunkColumn], metrics: Metrics, step_positions: int
) -> StreamingResponse:
    """``span`` as the compressed stream, read ``step_positions`` positions at a time."""
    return StreamingResponse(
        _body(span, layout, metrics, step_positions),
        media_type=CHUNKS_MEDIA_TYPE,
        headers={"X-Logitstore-Positions": f"{span.start}-{span.stop}", "Vary": "Accept"},
    )


async def _body(
    span: Span, layout: list[ChunkColumn], metrics: Metrics, step_positions: int
) -> AsyncIterator[bytes | memoryview]:
    store, start, stop = span.store, span.start, span.stop
    root = Path(store.path)
    wire = [{"name": c.name, "rows": c.rows, "codec": c.codec} for c in layout]
    yield encode_chunks_header(store.metadata, start, stop, wire)
    todo = steps(chunk_plan(layout, start, stop), step_positions)
    buffers = StepBuffers()
    opened: set[tuple[int, int]] = set()  # (column, shard) a thread has opened for this stream
    ahead: tuple[int, asyncio.Future[tuple[bytearray, int]]] | None = None
    threaded = False  # steps too large for the loop: read in a thread, one ahead
    try:
        device = os.stat(root).st_dev
        for k, items in enumerate(todo):
            nxt = todo[k + 1] if k + 1 < len(todo) else None
            got: tuple[bytearray, int] | None = None
            if ahead is not None:  # read in a thread while the step before was sent
                place, reading = ahead
                ahead = None
                got = await reading
            else:
                place, buf = buffers.take()
                touched = shards(layout, items)
                if not threaded and can_read_cached(device) and touched <= opened:
                    got = read_step(root, layout, items, buf, cached_on=device)
                if got is None:  # a shard first opened, chunks on disk alone, a large step
                    hint = nxt if can_read_cached(device) else None
                    got = await asyncio.to_thread(read_from_disk, root, layout, items, buf, hint)
                    opened |= touched
            buf, n = got
            buffers.keep(place, buf)
            threaded = threaded or not fits_loop(n)
            if nxt is not None and (threaded or not can_read_cached(device)):
                # steps too large for the loop, or a filesystem that cannot read without
                # waiting: the next step is read in a thread while this one is sent, into a
                # buffer other than this one
                p2, b2 = buffers.take(busy=place)
                ahead = (
                    p2,
                    asyncio.ensure_future(
                        asyncio.to_thread(read_from_disk, root, layout, nxt, b2, None)
                    ),
                )
            metrics.add_bytes(_BYTES_LABEL, n)
            for piece in pieces(memoryview(buf)[:n]):
                yield piece
        yield encode_end(stop, stop - start)
    except logitstore.LogitStoreError as e:
        log.warning("compressed stream of positions [%d, %d) stopped: %s", start, stop, e)
        mark_failed()
        yield encode_error("store_error", str(e))
    except OSError as e:  # a shard vanished or could not be read
        log.warning("compressed stream of positions [%d, %d) stopped: %s", start, stop, e)
        mark_failed()
        yield encode_error("store_error", f"cannot read the store: {e}")
    finally:
        if ahead is not None:
            if ahead[1].done() and not ahead[1].cancelled():
                ahead[1].exception()  # a read-ahead that failed after the client left: seen
            else:
                ahead[1].cancel()
