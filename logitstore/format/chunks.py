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
hold: the array's fill value (0). Chunks may start before the requested start and end past
its stop; the client keeps exactly ``[start, stop)``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from numcodecs import blosc
from numcodecs.zstd import Zstd

from ..errors import CorruptStoreError, ProtocolError, StreamMismatchError
from .metadata import StoreMetadata
from .protocol import encode_header, read_error_record, read_header
from .schema import StoredRows, columns, rows_from_columns
from .storage import shard_file
from .validate import check_shard_index

__all__ = [
    "CHUNKS_MAGIC",
    "CHUNKS_MEDIA_TYPE",
    "CHUNK_CODECS",
    "ChunkColumn",
    "ChunkParser",
    "chunk_bytes",
    "chunk_layout",
    "chunk_plan",
    "decode_chunk",
    "encode_chunk",
    "encode_chunks_header",
    "read_chunked",
]

CHUNKS_MAGIC = b"LGSTRM02"
CHUNKS_MEDIA_TYPE = "application/x-logitstore-chunks"
#: the compressors a client decodes (each inner chunk: bytes → one of these → crc32c)
CHUNK_CODECS = ("zstd", "blosc")
_CHUNK = struct.Struct("<4sB3xQII")  # tag, column, first, rows, nbytes
_ZSTD = Zstd()
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


def decode_chunk(data: bytes, codec: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    """Stored inner-chunk bytes → the array they hold, after checking their CRC-32C.

    Raises:
        ProtocolError: the checksum, the codec's frame or the decoded size is wrong.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if not data:  # not in the shard: the fill value
        return np.zeros(shape, dtype=dtype)
    if len(data) < 4:
        raise ProtocolError(f"a chunk of {len(data)} bytes has no room for its checksum")
    body = memoryview(data)[:-4]
    (crc,) = struct.unpack("<I", data[-4:])
    if crc32c.crc32c(body) != crc:
        raise ProtocolError("chunk CRC-32C mismatch (corrupted in transit or on disk)")
    try:
        raw = _ZSTD.decode(body) if codec == "zstd" else blosc.decompress(body)
    except Exception as e:  # the codecs raise RuntimeError/ValueError for a bad frame
        raise ProtocolError(f"chunk does not decompress ({codec}): {e}") from None
    if len(raw) != nbytes:
        raise ProtocolError(f"chunk holds {len(raw)} bytes, expected {nbytes}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class ChunkParser:
    """Reads one compressed stream through ``read_exactly`` and checks it as the row stream's
    parser does (header against request and store, every chunk's checksum and place, the end
    record). ``rows()`` yields ``(start, StoredRows)`` as soon as every column covers them;
    ``position`` is where the verified rows stop, so a cut stream resumes from there."""

    def __init__(
        self, read_exactly: Callable[[int], bytes], md: StoreMetadata, start: int, stop: int
    ) -> None:
        self._read = read_exactly
        self.md, self.start, self.stop = md, start, stop
        self.position = start
        self._cols = columns(md)
        self._header()
        # Per column: decoded chunks not yet handed out, and where the next one must start.
        self._pending: list[list[tuple[int, np.ndarray]]] = [[] for _ in self._cols]
        self._covered = [start] * len(self._cols)

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
        for c in layout:
            rows, codec = c.get("rows"), c.get("codec")
            if not isinstance(rows, int) or rows < 1 or codec not in CHUNK_CODECS:
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
            # Hand rows over in runs of _YIELD_ROWS (fewer, larger arrays to join); a cut
            # stream resumes from the last run handed over.
            run = ready - self.position
            if run >= _YIELD_ROWS or (ready == self.stop and run > 0):
                start = self.position
                yield start, self._take(ready)
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
        if nbytes > 2 * rows * self._cols[col].row_nbytes + (1 << 16):  # incompressible + frame
            raise ProtocolError(f"chunk of {nbytes} bytes is implausibly large")
        c = self._cols[col]
        dtype = np.dtype(c.dtype).newbyteorder("<")
        arr = decode_chunk(self._read(nbytes), self._codecs[col], dtype, c.shape(rows))
        lo = want - first  # rows of this chunk before the verified position: not ours
        self._pending[col].append((want, arr[lo:]))
        self._covered[col] = first + rows

    def _take(self, stop: int) -> StoredRows:
        """Rows ``[position, stop)`` from every column's pending chunks."""
        n = stop - self.position
        arrays: dict[str, np.ndarray] = {}
        for i, c in enumerate(self._cols):
            parts, rest, need = [], [], n
            for at, arr in self._pending[i]:
                if need > 0:
                    parts.append(arr[:need])
                    if len(arr) > need:
                        rest.append((at + need, arr[need:]))
                    need -= len(parts[-1])
                else:
                    rest.append((at, arr))
            self._pending[i] = rest
            # A copy: the rows own their memory (a slice would keep the whole chunk alive).
            arrays[c.name] = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        return rows_from_columns(self.md, arrays, n)


# -- the shards' inner chunks, read directly (the server's copy, a local reader's fast path) --

_ABSENT = (1 << 64) - 1  # a shard index entry for a chunk that was never written
_indexes: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True)
class ChunkColumn:
    """A per-position array as its inner chunks are found in its shards."""

    name: str
    ndim: int
    rows: int  # positions per inner chunk
    shard_rows: int  # positions per shard
    codec: str  # "zstd" or "blosc"


def chunk_layout(root: Path, md: StoreMetadata) -> list[ChunkColumn] | None:
    """The store's per-position arrays, in schema order, or ``None`` if one is not
    ``sharding_indexed`` over ``bytes`` → zstd or blosc → ``crc32c`` with its index (``bytes``
    → ``crc32c``) at the end and whole rows per inner chunk (FORMAT.md §4)."""
    out = []
    for col in columns(md):
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
            or list(inner[1:]) != list(shape[1:])
            or shard_rows % inner[0]
            or meta.get("data_type") != col.dtype
            or meta.get("fill_value", 0) != 0
        ):
            return None
        out.append(ChunkColumn(col.name, len(shape), inner[0], shard_rows, names[1]))
    return out


def _shard_index(path: Path, chunks: int) -> np.ndarray:
    """``(chunks, 2)`` offsets and sizes from a shard's index, checked once, then cached.

    Raises:
        CorruptStoreError: the shard is missing, too short, or its index fails its CRC-32C.
    """
    try:
        st = path.stat()
    except OSError:
        raise CorruptStoreError(f"shard {path} is missing") from None
    if not stat.S_ISREG(st.st_mode):  # a directory or a named pipe: damage, never a read
        raise CorruptStoreError(f"shard {path} is not a file; run `logitstore verify`")
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _indexes.get(key)
    if hit is not None:
        return hit
    size = chunks * 16 + 4
    if st.st_size < size:
        raise CorruptStoreError(f"shard {path} is shorter than its index")
    with path.open("rb") as f:
        f.seek(st.st_size - size)
        raw = f.read(size)
    (crc,) = struct.unpack("<I", raw[-4:])
    if crc32c.crc32c(raw[:-4]) != crc:
        raise CorruptStoreError(f"shard {path}: index CRC-32C mismatch; run `logitstore verify`")
    # every stored entry inside the file before the index (a valid CRC proves nothing
    # about where an entry points: FORMAT.md §4)
    check_shard_index(raw, st.st_size, chunks, 0, f"shard {path}")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(chunks, 2)
    with _lock:
        _indexes[key] = index
        if len(_indexes) > 4096:
            _indexes.popitem(last=False)
    return index


def chunk_plan(layout: list[ChunkColumn], start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(first position, column, chunk)`` of every inner chunk covering ``[start, stop)``,
    ordered by first position (columns advance together)."""
    plan = []
    for i, c in enumerate(layout):
        if stop > start:
            plan += [(k * c.rows, i, k) for k in range(start // c.rows, (stop - 1) // c.rows + 1)]
    plan.sort()
    return plan


def chunk_bytes(root: Path, c: ChunkColumn, chunk: int, files: dict[Path, int]) -> bytes:
    """Inner chunk ``chunk`` of ``c`` as its shard holds it. ``files`` keeps the file
    descriptors a caller opened (it closes them).

    Raises:
        CorruptStoreError: the index marks the chunk as not stored. Callers ask only for
            chunks holding positions, which are always written (FORMAT.md §4): reading
            one as zeros would hand out data the store does not hold.
    """
    shard, inner = divmod(chunk, c.shard_rows // c.rows)
    path = shard_file(root, c.name, c.ndim, shard)
    offset, nbytes = (int(v) for v in _shard_index(path, c.shard_rows // c.rows)[inner])
    if (offset, nbytes) == (_ABSENT, _ABSENT):
        raise CorruptStoreError(
            f"shard {path}: inner chunk {inner} is marked not stored, yet holds positions "
            "(FORMAT.md §4); run `logitstore verify`"
        )
    fd = files.get(path)
    if fd is None:
        fd = files[path] = os.open(path, os.O_RDONLY)
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise CorruptStoreError(f"shard {path} is cut short; run `logitstore verify`")
    return data


def read_chunked(
    root: Path, md: StoreMetadata, layout: list[ChunkColumn], start: int, stop: int
) -> StoredRows:
    """Positions ``[start, stop)`` as stored, read straight from the shards of a complete
    local store: the same bytes and checks as zarr's reader (the index's and every chunk's
    CRC-32C), without its per-chunk machinery.

    Raises:
        CorruptStoreError: a missing or damaged shard or chunk.
    """
    n = stop - start
    arrays: dict[str, np.ndarray] = {}
    files: dict[Path, int] = {}
    try:
        for i, col in enumerate(columns(md)):
            c = layout[i]
            dtype = np.dtype(col.dtype).newbyteorder("<")
            out = np.empty(col.shape(n), dtype=dtype)
            for first, _, chunk in chunk_plan([c], start, stop):
                try:
                    arr = decode_chunk(
                        chunk_bytes(root, c, chunk, files), c.codec, dtype, col.shape(c.rows)
                    )
                except ProtocolError as e:
                    raise CorruptStoreError(
                        f"array {col.name!r}, chunk {chunk}: {e}; run `logitstore verify`"
                    ) from None
                lo, hi = max(start, first), min(stop, first + c.rows)
                out[lo - start : hi - start] = arr[lo - first : hi - first]
            arrays[col.name] = out
    finally:
        for fd in files.values():
            os.close(fd)
    return rows_from_columns(md, arrays, n)
