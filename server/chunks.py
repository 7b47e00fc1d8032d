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
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
from fastapi.responses import StreamingResponse

import logitstore
from logitstore.format.chunks import (
    CHUNK_CODECS,
    CHUNKS_MEDIA_TYPE,
    encode_chunk,
    encode_chunks_header,
)
from logitstore.format.protocol import encode_end, encode_error
from logitstore.format.schema import columns
from logitstore.format.storage import shard_file

from .deps import Span
from .metrics import Metrics, mark_failed

__all__ = ["chunk_response", "chunk_stream_layout"]

log = logging.getLogger("logitstore.server")
_BYTES_LABEL = "/v1/stores/{name}/positions"
_ABSENT = (1 << 64) - 1  # a shard index entry for a chunk that was never written
_BATCH_BYTES = 4 << 20  # stored bytes read per step (one step read ahead of the socket)


@dataclass(frozen=True)
class _Column:
    name: str
    ndim: int
    rows: int  # positions per inner chunk
    shard_rows: int  # positions per shard
    codec: str


_layouts: dict[tuple[str, int], list[_Column] | None] = {}
_indexes: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_lock = threading.Lock()


def chunk_stream_layout(store: logitstore.LogitStore) -> list[_Column] | None:
    """The store's per-position arrays as the compressed stream carries them, or ``None``
    when it cannot (a store in object storage, or an array whose codecs are not
    ``sharding_indexed`` over ``bytes`` → zstd or blosc → ``crc32c``, index at the end)."""
    if isinstance(store.path, str):
        return None
    key = (str(store.path), id(store))
    if key not in _layouts:
        _layouts[key] = _layout(Path(store.path), store)
    return _layouts[key]


def _layout(root: Path, store: logitstore.LogitStore) -> list[_Column] | None:
    out = []
    for col in columns(store.metadata):
        try:
            meta = json.loads((root / col.name / "zarr.json").read_text())
            (shard,) = meta["codecs"]
            cfg = shard["configuration"]
            names = [c["name"] for c in cfg["codecs"]]
            index = [c["name"] for c in cfg["index_codecs"]]
            inner, shape = cfg["chunk_shape"], meta["shape"]
            shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (
            shard["name"] != "sharding_indexed"
            or len(names) != 3
            or names[0] != "bytes"
            or names[1] not in CHUNK_CODECS
            or names[2] != "crc32c"
            or index != ["bytes", "crc32c"]
            or cfg.get("index_location", "end") != "end"
            or list(inner[1:]) != list(shape[1:])  # whole rows per chunk
            or shard_rows % inner[0]
            or meta.get("data_type") != col.dtype
        ):
            return None
        out.append(_Column(col.name, len(shape), inner[0], shard_rows, names[1]))
    return out


def _shard_index(path: Path, chunks: int) -> np.ndarray:
    """``(chunks, 2)`` offsets and sizes of a shard's inner chunks, from its checked index.

    Raises:
        CorruptStoreError: the shard is missing, too short, or its index fails its CRC-32C.
    """
    try:
        st = path.stat()
    except OSError:
        raise logitstore.CorruptStoreError(f"shard {path} is missing") from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _indexes.get(key)
    if hit is not None:
        return hit
    size = chunks * 16 + 4
    with path.open("rb") as f:
        if st.st_size < size:
            raise logitstore.CorruptStoreError(f"shard {path} is shorter than its index")
        f.seek(st.st_size - size)
        raw = f.read(size)
    (crc,) = struct.unpack("<I", raw[-4:])
    if crc32c.crc32c(raw[:-4]) != crc:
        raise logitstore.CorruptStoreError(f"shard {path}: index CRC-32C mismatch")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(chunks, 2)
    with _lock:
        _indexes[key] = index
        if len(_indexes) > 4096:
            _indexes.popitem(last=False)
    return index


def _plan(
    layout: list[_Column], start: int, stop: int
) -> list[tuple[int, int, int]]:  # (first, column, chunk)
    """Every (column, inner chunk) covering ``[start, stop)``, by first position."""
    plan = []
    for i, c in enumerate(layout):
        for chunk in range(start // c.rows, (stop - 1) // c.rows + 1):
            plan.append((chunk * c.rows, i, chunk))
    plan.sort()
    return plan


def _read(root: Path, layout: list[_Column], items: list[tuple[int, int, int]]) -> bytes:
    """The records of ``items``: shard bytes copied behind their record heads."""
    pieces: list[bytes] = []
    files: dict[Path, int] = {}
    try:
        for first, i, chunk in items:
            c = layout[i]
            per_shard = c.shard_rows // c.rows
            shard, inner = divmod(chunk, per_shard)
            path = shard_file(root, c.name, c.ndim, shard)
            offset, nbytes = (int(v) for v in _shard_index(path, per_shard)[inner])
            data = b""
            if (offset, nbytes) != (_ABSENT, _ABSENT):
                fd = files.get(path)
                if fd is None:
                    fd = files[path] = os.open(path, os.O_RDONLY)
                data = os.pread(fd, nbytes, offset)
                if len(data) != nbytes:
                    raise logitstore.CorruptStoreError(f"shard {path} is cut short")
            pieces += encode_chunk(i, first, c.rows, data)
    finally:
        for fd in files.values():
            os.close(fd)
    return b"".join(pieces)


def _batches(
    layout: list[_Column], plan: list[tuple[int, int, int]]
) -> list[list[tuple[int, int, int]]]:
    """The plan cut into steps of about _BATCH_BYTES of stored data (estimated by rows)."""
    out: list[list[tuple[int, int, int]]] = [[]]
    budget = 0
    for item in plan:
        c = layout[item[1]]
        budget += c.rows * 64  # an upper estimate of a chunk's compressed size
        out[-1].append(item)
        if budget >= _BATCH_BYTES:
            out.append([])
            budget = 0
    return [b for b in out if b]


def chunk_response(span: Span, layout: list[_Column], metrics: Metrics) -> StreamingResponse:
    """``span`` as the compressed stream."""
    return StreamingResponse(
        _body(span, layout, metrics),
        media_type=CHUNKS_MEDIA_TYPE,
        headers={"X-Logitstore-Positions": f"{span.start}-{span.stop}", "Vary": "Accept"},
    )


async def _body(span: Span, layout: list[_Column], metrics: Metrics) -> AsyncIterator[bytes]:
    store, start, stop = span.store, span.start, span.stop
    root = Path(store.path)
    wire = [{"name": c.name, "rows": c.rows, "codec": c.codec} for c in layout]
    yield encode_chunks_header(store.metadata, start, stop, wire)
    steps = _batches(layout, _plan(layout, start, stop)) if stop > start else []

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
            yield data
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
