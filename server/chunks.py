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
import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import crc32c
from fastapi.responses import StreamingResponse

import logitstore
from logitstore.format.chunks import (
    CHUNK_HEAD_BYTES,
    CHUNKS_MEDIA_TYPE,
    ChunkColumn,
    ShardFiles,
    chunk_layout,
    chunk_plan,
    encode_chunks_header,
    pack_chunk_head,
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


#: Linux's flag for a read that fails rather than wait for the disk (None elsewhere)
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
#: at most this many step buffers kept per stream (a buffer the transport still holds a view
#: of is not refilled; with flow control that is at most one besides the one being sent)
_KEPT_BUFFERS = 3


def _read(
    root: Path,
    layout: list[ChunkColumn],
    items: list[tuple[int, int, int]],
    buf: bytearray,
    cached_only: bool = False,
) -> tuple[bytearray, int] | None:
    """The records of ``items`` written into ``buf`` (a larger one if it is short): each
    record's head, then its chunk read from the shard straight behind it, one copy from the
    page cache. Returns the buffer and how many of its bytes the records fill; with
    ``cached_only``, ``None`` as soon as a chunk is not wholly in the page cache (a read that
    would wait for the disk, which the event loop must not), and the caller reads the step in
    a thread instead."""
    global _NOWAIT
    with ShardFiles() as files:
        where = [files.locate(root, layout[i], chunk) for _, i, chunk in items]
        total = sum(CHUNK_HEAD_BYTES + w[2] for w in where)
        if len(buf) < total:
            buf = bytearray(total + total // 8)  # a little slack: steps differ in size
        view = memoryview(buf)
        at = 0
        for (first, i, chunk), (fd, offset, nbytes, path) in zip(items, where, strict=True):
            c = layout[i]
            pack_chunk_head(buf, at, i, first, c.rows, nbytes)
            at += CHUNK_HEAD_BYTES
            data = view[at : at + nbytes]
            if cached_only:
                try:
                    got = os.preadv(fd, [data], offset, _NOWAIT or 0)
                except BlockingIOError:
                    return None
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    _NOWAIT = None  # this system cannot: every step goes to a thread
                    return None
                if got != nbytes:  # partly cached, or cut short: the blocking read tells
                    return None
            elif os.preadv(fd, [data], offset) != nbytes:
                raise logitstore.CorruptStoreError(
                    f"shard {path} is cut short; run `logitstore verify`"
                )
            # Checked here too: a chunk damaged on this disk is a store_error the client does
            # not retry, not a CRC mismatch it would take for damage in transit.
            if nbytes < 4 or crc32c.crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
                raise logitstore.CorruptStoreError(
                    f"array {c.name!r}, chunk {chunk} (in shard {path}) fails its CRC-32C on "
                    "the server's disk; run `logitstore verify`"
                )
            at += nbytes
    return buf, total


def _read_from_disk(
    root: Path,
    layout: list[ChunkColumn],
    items: list[tuple[int, int, int]],
    buf: bytearray,
    ahead: list[tuple[int, int, int]] | None,
) -> tuple[bytearray, int]:
    """:func:`_read` of a step not in the page cache (in a thread), then the kernel asked to
    read the chunks of the next step, ``ahead``, in the background while this one is sent."""
    got = _read(root, layout, items, buf)
    assert got is not None
    if ahead and hasattr(os, "posix_fadvise"):
        with ShardFiles() as files:
            for _, i, chunk in ahead:
                fd, offset, nbytes, _ = files.locate(root, layout[i], chunk)
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    return got


class _Buffers:
    """The step buffers of one stream. The transport keeps views of what the socket has not
    taken yet (cycle.py), so a buffer is refilled only when no view of it lives: a
    ``bytearray`` with live views refuses to change size, which is the test."""

    def __init__(self) -> None:
        self._kept: list[bytearray] = []

    def take(self) -> tuple[int, bytearray]:
        """A buffer free to refill and its place (-1: a new one, not kept)."""
        for i, buf in enumerate(self._kept):
            try:
                buf.append(0)
            except BufferError:
                continue  # still viewed
            del buf[-1]
            return i, buf
        if len(self._kept) < _KEPT_BUFFERS:
            self._kept.append(bytearray())
            return len(self._kept) - 1, self._kept[-1]
        return -1, bytearray()

    def keep(self, i: int, buf: bytearray) -> None:
        """``buf`` (grown by the read, perhaps) back in place ``i``."""
        if i >= 0:
            self._kept[i] = buf


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
    # Each step is read when its turn comes: on the event loop while its chunks are in the
    # page cache (a copy costs less than handing the read to a thread and back: one stream
    # went from 1.3 to 2.0 GB/s), in a thread when they are not, and then the kernel reads
    # the next step ahead. A shard is first opened (its index read) in a thread too. Pieces
    # are views of the buffer (cycle.py): _Buffers refills only a buffer nothing views.
    buffers = _Buffers()
    opened: set[tuple[int, int]] = set()  # (column, shard) whose index a thread has read
    try:
        for k, items in enumerate(steps):
            place, buf = buffers.take()
            shards = {(i, chunk * layout[i].rows // layout[i].shard_rows) for _, i, chunk in items}
            got = None
            if _NOWAIT and shards <= opened:
                got = _read(root, layout, items, buf, cached_only=True)
            if got is None:
                ahead = steps[k + 1] if k + 1 < len(steps) else None
                got = await asyncio.to_thread(_read_from_disk, root, layout, items, buf, ahead)
                opened |= shards
            buf, n = got
            buffers.keep(place, buf)
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
