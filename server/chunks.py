"""The compressed stream (docs/PROTOCOL.md §2.1): stored inner chunks, copied from the shards.

A request whose ``Accept`` names ``application/x-logitstore-chunks`` gets, for every
per-position array, the inner chunks that cover its range, exactly as the shard files hold
them (compressed, checksum included); the client decodes. The server reads each shard's index
once (checked against its CRC-32C, then cached) and afterwards only copies bytes: no
decompression, no checksum, no per-position work. A store this cannot serve (object storage,
or codecs the protocol does not carry) answers with the row stream (stream.py) instead, which
every client reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import crc32c
from fastapi.responses import StreamingResponse

import logitstore
from logitstore.format.chunks import (
    CHUNKS_MEDIA_TYPE,
    ChunkColumn,
    ShardFiles,
    chunk_bytes,
    chunk_layout,
    chunk_plan,
    encode_chunk,
    encode_chunks_header,
)
from logitstore.format.protocol import encode_end, encode_error

from .deps import Span
from .metrics import Metrics, mark_failed
from .send import pieces

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


def _read(root: Path, layout: list[ChunkColumn], items: list[tuple[int, int, int]]) -> bytes:
    """The records of ``items``: shard bytes copied behind their record heads."""
    pieces: list[bytes] = []
    with ShardFiles() as files:
        for first, i, chunk in items:
            c = layout[i]
            data = chunk_bytes(root, c, chunk, files)
            # Checked here too: a chunk damaged on this disk is a store_error the client does
            # not retry, not a CRC mismatch it would take for damage in transit.
            if len(data) < 4 or crc32c.crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
                raise logitstore.CorruptStoreError(
                    f"array {c.name!r}, chunk {chunk} fails its CRC-32C on the server's disk; "
                    "run `logitstore verify`"
                )
            pieces += encode_chunk(i, first, c.rows, data)
    return b"".join(pieces)


def _steps(plan: list[tuple[int, int, int]], positions: int) -> list[list[tuple[int, int, int]]]:
    """The plan cut into steps by where chunks begin: one step per window of ``positions``
    positions (``--block-positions``, as the row stream's blocks) in which a chunk begins.
    A stream holds the step being sent and the one read ahead, whatever its range and however
    slowly its client reads. (A column whose chunks are longer than the window, such as a 1-D
    one with a chunk per shard, sends each in the window where it begins.)"""
    out: list[list[tuple[int, int, int]]] = []
    window = -1
    for item in plan:  # ordered by first position
        if item[0] // positions != window:
            window = item[0] // positions
            out.append([])
        out[-1].append(item)
    return out


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
    steps = _steps(chunk_plan(layout, start, stop), step_positions)

    def read_ahead(k: int) -> asyncio.Future[bytes] | None:
        if k >= len(steps):
            return None
        return asyncio.ensure_future(asyncio.to_thread(_read, root, layout, steps[k]))

    pending = read_ahead(0)
    k = 0
    try:
        while pending is not None:
            data = await pending
            k += 1
            pending = read_ahead(k)
            metrics.add_bytes(_BYTES_LABEL, len(data))
            for piece in pieces(data):
                yield piece
            del data
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
        if pending is not None:
            pending.cancel()
