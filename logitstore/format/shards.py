"""A shard's inner chunks, read straight from disk (FORMAT.md §4): what the compressed stream
sends (server/chunks.py) and what a local reader decodes without zarr's per-chunk machinery.

Every chunk is checked as zarr checks it (the shard index's CRC-32C and bounds, the chunk's
own CRC-32C), then decompressed by the codec its array names (chunk_decode.py), straight
into the memory it belongs in when the whole chunk is wanted.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from ..errors import CorruptStoreError
from .chunk_decode import CHUNK_CODECS, into_place
from .metadata import StoreMetadata
from .schema import StoredRows, columns, rows_from_columns
from .storage import shard_file
from .validate import check_shard_index

__all__ = [
    "ChunkColumn",
    "ShardFiles",
    "chunk_bytes",
    "chunk_layout",
    "chunk_plan",
    "read_chunked",
    "read_columns",
]

_ABSENT = (1 << 64) - 1  # a shard index entry for a chunk that was never written
_indexes: OrderedDict[tuple[str, int, int, int, int, int], np.ndarray] = OrderedDict()
_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A DataLoader worker forked while another thread held the lock would wait on it forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_lock_after_fork)


@dataclass(frozen=True)
class ChunkColumn:
    """A per-position array as its inner chunks are found in its shards."""

    name: str
    ndim: int
    rows: int  # positions per inner chunk
    shard_rows: int  # positions per shard
    codec: str  # "zstd" or "blosc"

    def shard_of(self, chunk: int) -> tuple[int, int]:
        """Inner chunk ``chunk`` as (shard, inner chunk within that shard)."""
        return divmod(chunk, self.shard_rows // self.rows)

    def where(self, root: Path, chunk: int) -> Callable[[], str]:
        """Inner chunk ``chunk`` named for an error (its array, shard and first position),
        when an error asks."""
        return lambda: (
            f"{root / self.name}: shard {self.shard_of(chunk)[0]}, the chunk from position "
            f"{chunk * self.rows}"
        )


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


def _shard_index(fd: int, path: Path, chunks: int) -> np.ndarray:
    """``(chunks, 2)`` offsets and sizes from the index of the shard open as ``fd``, checked
    once, then cached under the file's identity (a file replaced under the same name, even
    with the same size and time, is read afresh).

    Raises:
        CorruptStoreError: the shard is not a file, too short, or its index fails its CRC-32C.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a directory or a named pipe: damage, never a read
        raise CorruptStoreError(f"shard {path} is not a file; run `logitstore verify`")
    key = (str(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    with _lock:
        hit = _indexes.get(key)
    if hit is not None:
        return hit
    size = chunks * 16 + 4
    if st.st_size < size:
        raise CorruptStoreError(f"shard {path} is shorter than its index")
    raw = os.pread(fd, size, st.st_size - size)
    if len(raw) != size:
        raise CorruptStoreError(f"shard {path} is cut short; run `logitstore verify`")
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


class ShardFiles:
    """The shard files one read has open: a descriptor and the checked index of each, so a
    shard is opened, stat'ed and its index looked up once per read, not once per chunk.
    Close it (or use it as a context manager) when the read is done."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], tuple[int, np.ndarray, Path]] = {}
        self._root: Path | None = None  # one store per read: shards are keyed by array

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd, _, _ in self._open.values():
            os.close(fd)
        self._open.clear()

    def locate(self, root: Path, c: ChunkColumn, chunk: int) -> tuple[int, int, int, Path]:
        """Where inner chunk ``chunk`` of ``c`` lies: ``(descriptor, offset, nbytes, shard
        path)``, its shard opened and its index checked on first use.

        Raises:
            CorruptStoreError: the index marks the chunk as not stored. Callers ask only for
                chunks holding positions, which are always written (FORMAT.md §4): reading
                one as zeros would hand out data the store does not hold.
        """
        shard, inner = c.shard_of(chunk)
        hit = self._open.get((c.name, shard))
        if hit is None:
            if self._root is None:
                self._root = root
            elif root != self._root:
                raise ValueError(f"one ShardFiles reads one store: {self._root}, not {root}")
            path = shard_file(root, c.name, c.ndim, shard)
            try:  # O_NONBLOCK: a named pipe put in a shard's place must not block the open
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                raise CorruptStoreError(
                    f"shard {path} is missing; run `logitstore verify`"
                ) from None
            except OSError as e:
                raise CorruptStoreError(f"shard {path} cannot be opened: {e}") from None
            try:
                index = _shard_index(fd, path, c.shard_rows // c.rows)
            except BaseException:
                os.close(fd)
                raise
            hit = self._open[c.name, shard] = (fd, index, path)
        fd, index, path = hit
        offset, nbytes = int(index[inner, 0]), int(index[inner, 1])
        if offset == _ABSENT and nbytes == _ABSENT:
            raise CorruptStoreError(
                f"shard {path}: inner chunk {inner} is marked not stored, yet holds positions "
                "(FORMAT.md §4); run `logitstore verify`"
            )
        return fd, offset, nbytes, path


def chunk_bytes(root: Path, c: ChunkColumn, chunk: int, files: ShardFiles) -> bytes:
    """Inner chunk ``chunk`` of ``c`` as its shard holds it, through the read's ``files``
    (raises as :meth:`ShardFiles.locate` does, and when the shard is cut short)."""
    fd, offset, nbytes, path = files.locate(root, c, chunk)
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise CorruptStoreError(f"shard {path} is cut short; run `logitstore verify`")
    return data


def read_columns(
    root: Path,
    md: StoreMetadata,
    layout: list[ChunkColumn],
    start: int,
    stop: int,
    names: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Per-position arrays ``names`` at positions ``[start, stop)`` as stored, read straight
    from the shards of a local store: the same bytes and checks as zarr's reader (the
    index's and every chunk's CRC-32C), without its per-chunk machinery. Every shard the
    range touches must be complete (committed, or the store complete).

    Raises:
        CorruptStoreError: a missing or damaged shard or chunk.
    """
    n = stop - start
    arrays: dict[str, np.ndarray] = {}
    with ShardFiles() as files:
        for i, col in enumerate(columns(md)):
            if col.name not in names:
                continue
            c = layout[i]
            out = np.empty(col.shape(n), dtype=col.stored_dtype)
            for first, _, chunk in chunk_plan([c], start, stop):
                lo, hi = max(start, first), min(stop, first + c.rows)
                data = chunk_bytes(root, c, chunk, files)
                where = c.where(root, chunk)
                into_place(data, c.codec, out[lo - start : hi - start], where, c.rows, lo - first)
            arrays[col.name] = out
    return arrays


def read_chunked(
    root: Path,
    md: StoreMetadata,
    layout: list[ChunkColumn],
    start: int,
    stop: int,
    names: tuple[str, ...] | None = None,
) -> StoredRows:
    """Positions ``[start, stop)`` as stored (:func:`read_columns`). With ``names``, only
    those columns are read (the others hold no rows).

    Raises:
        CorruptStoreError: a missing or damaged shard or chunk.
    """
    cols = columns(md)
    wanted = tuple(c.name for c in cols) if names is None else names
    got = read_columns(root, md, layout, start, stop, wanted)
    arrays = {c.name: got[c.name] if c.name in got else c.empty(0) for c in cols}
    return rows_from_columns(md, arrays, stop - start)
