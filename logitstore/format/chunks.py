"""The compressed stream (docs/PROTOCOL.md §2.1): the store's own chunks on the wire.

A client that sends ``Accept: application/x-logitstore-chunks`` gets the stored inner chunks
of every per-position array, byte for byte as the shards hold them (compressed, each with its
CRC-32C), and decodes them itself. The server copies bytes and spends no CPU per position; the
wire carries on-disk bytes, not decoded rows (2.5× fewer for top-64 u8).

    stream = header chunk* (end | error)
    header = b"LGSTRM02" | u32 json_len | json
    chunk  = b"CHK0" | u8 column | 3 × u8 0 | u64 first | u32 rows | u32 nbytes | bytes
    end, error: as in the row stream (protocol.py)

``bytes`` is one inner chunk of column ``column`` (the header's ``columns[column]``) covering
positions ``[first, first + rows)`` as stored: the compressed chunk followed by its CRC-32C
(little-endian u32 over the compressed bytes). ``nbytes = 0`` is a chunk the shard does not
hold: the array's fill value (0); clients accept it, though this server answers a
``store_error`` instead. Chunks may start before the requested start and end past
its stop; the client keeps exactly ``[start, stop)``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import ProtocolError, StreamMismatchError

# The shards' chunks (the server's copy, a local reader's fast path) live in shards.py and
# chunk_decode.py; named here too, where the server and the tests have always found them.
from .chunk_decode import CHUNK_CODECS, decode_chunk, decode_chunk_into, decode_part
from .metadata import StoreMetadata
from .protocol import encode_header, read_error_record, read_header
from .schema import StoredRows, columns, rows_from_columns
from .shards import (
    ChunkColumn,
    ShardFiles,
    chunk_bytes,
    chunk_layout,
    chunk_plan,
    read_chunked,
)

__all__ = [
    "CHUNKS_MAGIC",
    "CHUNKS_MEDIA_TYPE",
    "CHUNK_CODECS",
    "CHUNK_HEAD_BYTES",
    "ChunkColumn",
    "ChunkParser",
    "ShardFiles",
    "alloc_columns",
    "chunk_bytes",
    "chunk_layout",
    "chunk_plan",
    "decode_chunk",
    "decode_chunk_into",
    "encode_chunk",
    "encode_chunks_header",
    "pack_chunk_head",
    "read_chunked",
]

CHUNKS_MAGIC = b"LGSTRM02"
CHUNKS_MEDIA_TYPE = "application/x-logitstore-chunks"
_CHUNK = struct.Struct("<4sB3xQII")  # tag, column, first, rows, nbytes
#: bytes of a chunk record before its stored bytes
CHUNK_HEAD_BYTES = _CHUNK.size
_YIELD_ROWS = 1 << 16


def encode_chunks_header(
    md: StoreMetadata, start: int, stop: int, layout: list[dict[str, Any]]
) -> bytes:
    """The header: the row stream's fields plus ``columns``, one ``{"name", "rows",
    "codec"}`` per per-position array in schema order (rows per inner chunk)."""
    return encode_header(md, start, stop, magic=CHUNKS_MAGIC, extra={"columns": layout})


def encode_chunk(column: int, first: int, rows: int, data: bytes) -> list[bytes]:
    """One chunk record, as the pieces to send (the stored bytes are not copied)."""
    return [_CHUNK.pack(b"CHK0", column, first, rows, len(data)), data]


def pack_chunk_head(
    buf: bytearray, at: int, column: int, first: int, rows: int, nbytes: int
) -> None:
    """The head of a chunk record of ``nbytes`` stored bytes, written at ``buf[at:]`` (the
    bytes follow at ``at + CHUNK_HEAD_BYTES``)."""
    _CHUNK.pack_into(buf, at, b"CHK0", column, first, rows, nbytes)


class ChunkParser:
    """Reads one compressed stream through ``read_exactly`` and checks it as the row stream's
    parser does (header against request and store, every chunk's checksum and place, the end
    record). ``rows()`` yields ``(start, StoredRows)`` as soon as every column covers them;
    ``position`` is where the verified rows stop, so a cut stream resumes from there.

    Chunks are decoded straight into ``into`` (arrays by column name whose row 0 is position
    ``at``, covering ``[start, stop)``: e.g. one read's result, reused across its retries),
    or into arrays the parser allocates for ``[start, stop)``; the rows handed over are views
    of them. A chunk that lies wholly inside the range is decompressed in place, with no
    decoded copy; one cut by the range's ends is decoded aside and its rows copied."""

    def __init__(
        self,
        read_exactly: Callable[[int], bytes],
        md: StoreMetadata,
        start: int,
        stop: int,
        into: dict[str, np.ndarray] | None = None,
        at: int | None = None,
    ) -> None:
        self._read = read_exactly
        self.md, self.start, self.stop = md, start, stop
        self.position = start
        self._cols = columns(md)
        self._header()
        if into is None:
            into, at = alloc_columns(md, stop - start), start
        self._at = start if at is None else at
        self._out = [into[c.name] for c in self._cols]
        for c, out in zip(self._cols, self._out, strict=True):
            if (
                out.dtype != c.stored_dtype
                or out.shape[1:] != c.shape(0)[1:]
                or not out.flags.c_contiguous
                or not out.flags.writeable
                or len(out) < stop - self._at
                or self._at > start
            ):
                raise ValueError(
                    f"{c.name}: a {out.dtype} array {out.shape} cannot hold [{start}, {stop}) "
                    f"from row {self._at} (expected {c.stored_dtype}, C-contiguous, writeable)"
                )
        self._covered = [start] * len(self._cols)  # per column: where the next chunk starts

    def _header(self) -> None:
        info = read_header(
            self._read, CHUNKS_MAGIC, "compressed stream", self.md, self.start, self.stop
        )
        layout = info.get("columns")
        if not isinstance(layout, list):
            raise ProtocolError("compressed stream header has no columns")
        names = [c.get("name") if isinstance(c, dict) else None for c in layout]
        if names != [c.name for c in self._cols]:
            raise StreamMismatchError(
                "stream header does not match the request and store (found, expected): "
                f"{ {'columns': (names, [c.name for c in self._cols])} }"
            )
        self._rows: list[int] = []
        self._codecs: list[str] = []
        for c, col in zip(layout, self._cols, strict=True):
            rows, codec = c.get("rows"), c.get("codec")
            if rows != col.chunk_positions:  # the store's layout fixes it (FORMAT.md §4)
                raise ProtocolError(
                    f"compressed stream column {c}: the store's chunks hold {col.chunk_positions}"
                    " positions"
                )
            if codec not in CHUNK_CODECS:
                raise ProtocolError(f"compressed stream column {c} is not one this client reads")
            self._rows.append(rows)
            self._codecs.append(codec)

    def rows(self) -> Iterator[tuple[int, StoredRows]]:
        while True:
            head = self._read(4)
            if head == b"END0":
                stop, sent = struct.unpack("<QQ", self._read(16))
                if stop != self.stop or sent != self.stop - self.start or self.position != stop:
                    raise ProtocolError(
                        f"stream ended at {self.position} (end record: stop {stop}, sent {sent});"
                        f" expected {self.stop}"
                    )
                return
            if head == b"ERR0":
                read_error_record(self._read, self.position)
            if head != b"CHK0":
                raise ProtocolError(f"expected a chunk or the end record, found {head!r}")
            _, col, first, rows, nbytes = _CHUNK.unpack(head + self._read(_CHUNK.size - 4))
            self._chunk(col, first, rows, nbytes)
            ready = min(min(self._covered), self.stop)
            # Hand rows over in runs of _YIELD_ROWS (fewer, larger runs for a caller that
            # decodes each); a cut stream resumes from the last run handed over.
            run = ready - self.position
            if run >= _YIELD_ROWS or (ready == self.stop and run > 0):
                start = self.position
                yield start, self._view(start, ready)
                self.position = ready

    def _chunk(self, col: int, first: int, rows: int, nbytes: int) -> None:
        if col >= len(self._cols):
            raise ProtocolError(f"chunk of column {col}: the stream has {len(self._cols)}")
        want = self._covered[col]
        inner = self._rows[col]
        if rows != inner or first % inner or not first <= want < first + rows:
            raise ProtocolError(
                f"chunk of {self._cols[col].name} at {first} ({rows} rows) does not continue "
                f"at position {want} in chunks of {inner}"
            )
        c = self._cols[col]
        if want >= self.stop:  # only a column's last chunk may end past the range
            raise ProtocolError(
                f"chunk of {c.name} at {first}: the column already covers [{self.start}, "
                f"{self.stop})"
            )
        if nbytes > 2 * rows * c.row_nbytes + (1 << 16):  # incompressible + frame
            raise ProtocolError(f"chunk of {nbytes} bytes is implausibly large")
        # Ours: from the verified position to the range's stop (in place if that is all).
        end = min(first + rows, self.stop)
        dest = self._out[col][want - self._at : end - self._at]
        decode_part(self._read(nbytes), self._codecs[col], dest, rows, want - first)
        self._covered[col] = first + rows

    def _view(self, start: int, stop: int) -> StoredRows:
        """Rows ``[start, stop)`` as views of the arrays the chunks were decoded into."""
        a, b = start - self._at, stop - self._at
        arrays = {c.name: out[a:b] for c, out in zip(self._cols, self._out, strict=True)}
        return rows_from_columns(self.md, arrays, stop - start)


def alloc_columns(
    md: StoreMetadata, n: int, alloc: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty
) -> dict[str, np.ndarray]:
    """Uninitialised arrays for ``n`` stored positions, by column name, in the byte order the
    chunks hold (little-endian), from ``alloc(shape, dtype)``."""
    return {c.name: alloc(c.shape(n), c.stored_dtype) for c in columns(md)}
