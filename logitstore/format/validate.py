"""A defensive open: a store's metadata checked against itself and its arrays before use.

:class:`~.metadata.StoreMetadata` checks each key's type and range. This module checks what
only the arrays can tell (docs/FORMAT.md §4, §7), before a reader allocates anything sized
by the store:

* :func:`check_arrays`: every array's own ``zarr.json`` — shape, data type, chunk grid,
  shard and inner chunk shapes, the codec chain (little-endian ``bytes``, a ``crc32c``
  last, the shard index at the end and checksummed), fill value 0;
* :func:`read_offsets`: the sequence boundaries, read one chunk at a time and checked in
  O(S) (start at 0, strictly increase, end at N), so a damaged offset is refused before
  a Dataset sizes a window by it, and a chunk that is missing stops the read at once;
* :func:`check_shard_index`: a shard's index (checksum, every inner chunk present and
  inside the file), which zarr would otherwise read as zeros where a chunk is marked empty.

Every failure is a :class:`~logitstore.errors.FormatError` (a
:class:`~logitstore.errors.CorruptStoreError` for damaged bytes) naming the array.
"""

from __future__ import annotations

import struct
from typing import Any

import crc32c
import numpy as np

from ..errors import CorruptStoreError, FormatError
from .metadata import StoreMetadata
from .schema import COMMITS, OFFSETS, TOKENIZER, Column, columns

__all__ = [
    "MAX_OFFSETS_CHUNK",
    "check_array",
    "check_arrays",
    "check_offsets",
    "check_shard_index",
    "inner_chunks",
    "read_offsets",
]

#: The most entries of one ``offsets`` chunk (FORMAT.md §4): 8 MiB decoded.
MAX_OFFSETS_CHUNK = 1 << 20
#: The largest ``tokenizer`` array a reader loads (FORMAT.md §4).
MAX_TOKENIZER_BYTES = 1 << 30
#: An index entry of two all-ones 64-bit words: zarr's "chunk not stored" (FORMAT.md §4).
_EMPTY = (1 << 64) - 1
#: bytes-to-bytes codecs a reader accepts between ``bytes`` and the final ``crc32c``
_COMPRESSORS = frozenset({"ZstdCodec", "BloscCodec", "GzipCodec"})


def _name(codec: Any) -> str:
    return type(codec).__name__


def _check_chain(name: str, codecs: tuple[Any, ...], itemsize: int, what: str) -> None:
    """``bytes`` (little-endian), compressors, ``crc32c`` last (FORMAT.md §4, §7)."""
    kinds = [_name(c) for c in codecs]
    if (
        len(kinds) < 2
        or kinds[0] != "BytesCodec"
        or kinds[-1] != "Crc32cCodec"
        or any(k not in _COMPRESSORS for k in kinds[1:-1])
    ):
        raise FormatError(
            f"array {name!r}: {what} codecs are {kinds}; expected BytesCodec, optional "
            f"compressors ({', '.join(sorted(_COMPRESSORS))}), then Crc32cCodec (FORMAT.md §4)"
        )
    endian = getattr(codecs[0], "endian", None)
    endian = getattr(endian, "value", endian)
    if itemsize > 1 and endian != "little":
        raise FormatError(
            f"array {name!r}: the bytes codec is {endian!r}-endian; logitstore stores are "
            "little-endian (FORMAT.md §1): a reader would byte-swap every value"
        )


def check_array(
    arr: Any, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], **kw: Any
) -> None:
    """Check one array's own metadata: ``shape``, ``dtype``, its chunk grid (``chunks``: the
    shard shape when ``inner`` is given) and codecs.

    Keyword Args:
        inner: the inner chunk shape of a sharded array (``None``: not sharded).
        max_chunks: (unsharded arrays) ``chunks[0]`` may be any size from 1 to this.

    Raises:
        FormatError: a mismatch, naming the array, what was found and what was expected.
    """
    inner: tuple[int, ...] | None = kw.get("inner")
    max_chunks: int | None = kw.get("max_chunks")
    md = arr.metadata
    found_shape = tuple(md.shape)
    if found_shape != shape or np.dtype(arr.dtype) != np.dtype(dtype):
        raise FormatError(
            f"array {name!r} has shape {found_shape} and dtype {arr.dtype}; the store's "
            f"metadata requires shape {shape} and dtype {dtype}"
        )
    grid = tuple(getattr(md.chunk_grid, "chunk_shape", ()) or ())
    if max_chunks is not None:
        ok = len(grid) == 1 and 1 <= grid[0] <= max_chunks
        expected = f"one dimension of 1 to {max_chunks} entries"
    else:
        ok = grid == chunks
        expected = str(chunks)
    if not ok:
        raise FormatError(f"array {name!r} has chunks {grid}; expected {expected} (FORMAT.md §4)")
    try:
        fill = float(np.asarray(md.fill_value, dtype=np.float64))
    except (TypeError, ValueError):
        fill = float("nan")
    if fill != 0:
        raise FormatError(f"array {name!r} has fill value {md.fill_value!r}; expected 0")
    itemsize = np.dtype(dtype).itemsize
    codecs = tuple(md.codecs)
    if inner is None:
        _check_chain(name, codecs, itemsize, "its")
        return
    if len(codecs) != 1 or _name(codecs[0]) != "ShardingCodec":
        raise FormatError(
            f"array {name!r} has codecs {[_name(c) for c in codecs]}; expected one "
            "ShardingCodec (FORMAT.md §4)"
        )
    sharding = codecs[0]
    if tuple(sharding.chunk_shape) != inner:
        raise FormatError(
            f"array {name!r} has inner chunks {tuple(sharding.chunk_shape)}; the store's "
            f"layout requires {inner}"
        )
    location = getattr(sharding.index_location, "value", sharding.index_location)
    if location != "end":
        raise FormatError(f"array {name!r} has its shard index at the {location}; expected end")
    _check_chain(name, tuple(sharding.codecs), itemsize, "inner chunk")
    _check_chain(name, tuple(sharding.index_codecs), 8, "shard index")


def check_arrays(md: StoreMetadata, get: Any) -> dict[str, Any]:
    """Check every array of the store against ``md``; return them by name (the tokenizer
    only when the store has one).

    ``get(name)`` returns the zarr array ``name`` or ``None`` (see
    :func:`~.storage.maybe_array`).

    Raises:
        FormatError: an array is missing or disagrees with the metadata.
    """
    lay, n = md.layout, md.num_positions
    arrays: dict[str, Any] = {}
    for col in columns(md):
        arr = get(col.name)
        if arr is None:
            raise FormatError(f"the store lacks the required array {col.name!r}")
        check_array(
            arr,
            col.name,
            col.shape(n),
            col.dtype,
            col.shape(lay.shard_positions),
            inner=col.shape(col.chunk_positions),
        )
        arrays[col.name] = arr
    for name, shape, dtype, chunks in (
        (OFFSETS, (md.num_sequences + 1,), "int64", None),
        (COMMITS, (md.num_shards,), "uint8", (1,)),
    ):
        arr = get(name)
        if arr is None:
            raise FormatError(f"the store lacks the required array {name!r}")
        bound = MAX_OFFSETS_CHUNK if chunks is None else None
        check_array(arr, name, shape, dtype, chunks or (), max_chunks=bound)
        arrays[name] = arr
    tok = get(TOKENIZER)
    if tok is not None:
        size = tuple(tok.metadata.shape)
        if len(size) != 1 or not 0 < size[0] <= MAX_TOKENIZER_BYTES:
            raise FormatError(
                f"array 'tokenizer' has shape {size}; expected (bytes,) with 1 to "
                f"{MAX_TOKENIZER_BYTES} bytes"
            )
        check_array(tok, TOKENIZER, size, "uint8", size)
        arrays[TOKENIZER] = tok
    return arrays


def read_offsets(arr: Any, md: StoreMetadata, where: str) -> np.ndarray:
    """The ``offsets`` array, read a chunk at a time and checked as it comes (FORMAT.md §4):
    ``S + 1`` int64 entries from 0, strictly increasing, ending at ``N``. O(S) time; memory
    is the array itself, and a damaged chunk stops the read before the next is allocated.

    Raises:
        CorruptStoreError: a chunk is damaged or missing, or the entries break the rule.
    """
    total = md.num_sequences + 1
    step = max(1, min(int(arr.metadata.chunk_grid.chunk_shape[0]), MAX_OFFSETS_CHUNK))
    parts: list[np.ndarray] = []
    prev = -1  # before entry 0: entry 0 (checked = 0) then passes the step check
    for a in range(0, total, step):
        try:
            part = np.asarray(arr[a : min(a + step, total)], dtype=np.int64)
        except Exception as e:  # zarr raises several types on checksum or decode failures
            raise CorruptStoreError(
                f"{where}: array 'offsets' is damaged at entries {a}-{a + step - 1}: {e}; "
                "run `logitstore verify`"
            ) from None
        if a == 0 and part[0] != 0:
            raise CorruptStoreError(f"{where}: offsets start at {int(part[0])}, expected 0")
        seen = np.concatenate([[prev], part])  # (len(part) + 1,): the entry before, then these
        bad = np.flatnonzero(np.diff(seen) < 1)
        if len(bad):
            i = int(bad[0])
            raise CorruptStoreError(
                f"{where}: offsets entry {a + i} is {int(seen[i + 1])} after {int(seen[i])}: "
                f"sequence {a + i - 1} is empty or reversed; offsets must strictly increase "
                f"from 0 to num_positions = {md.num_positions} (FORMAT.md §4)"
            )
        if part[-1] > md.num_positions:
            raise CorruptStoreError(
                f"{where}: offsets reach {int(part[-1])}, past num_positions = {md.num_positions}"
            )
        prev = int(part[-1])
        parts.append(part)
    if prev != md.num_positions:
        raise CorruptStoreError(
            f"{where}: offsets end at {prev}, expected num_positions = {md.num_positions}"
        )
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def check_offsets(offsets: np.ndarray, md: StoreMetadata, where: str) -> np.ndarray:
    """Offsets received whole (from a server): the rule of :func:`read_offsets`.

    Raises:
        CorruptStoreError: wrong length, or not strictly increasing from 0 to N.
    """
    if offsets.shape != (md.num_sequences + 1,):
        raise CorruptStoreError(
            f"{where}: {offsets.shape[0]} offsets, expected num_sequences + 1 = "
            f"{md.num_sequences + 1}"
        )
    steps = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != md.num_positions or (steps < 1).any():
        raise CorruptStoreError(
            f"{where}: offsets must strictly increase from 0 to num_positions = "
            f"{md.num_positions} (FORMAT.md §4)"
        )
    return offsets


def inner_chunks(col: Column, md: StoreMetadata, shard: int) -> tuple[int, int]:
    """``(in the index, holding positions)``: a shard's inner chunk count, and how many of
    them hold positions below N (the rest are not written, FORMAT.md §4)."""
    per = md.layout.shard_positions // col.chunk_positions
    s0, s1 = md.shard_range(shard)
    return per, -(-(s1 - s0) // col.chunk_positions)


def check_shard_index(tail: bytes, size: int, per: int, used: int, where: str) -> None:
    """Check a shard's index: ``tail`` holds the file's last ``16 * per + 4`` bytes, ``size``
    is the file's size. The first ``used`` inner chunks must be stored, inside the file's
    data; the rest must be marked not stored.

    Raises:
        CorruptStoreError: the index is damaged or marks a chunk holding positions empty.
    """
    want = 16 * per + 4
    if len(tail) != want or size < want:
        raise CorruptStoreError(
            f"{where}: the shard file holds {size} bytes, too few for its index"
        )
    body, (crc,) = tail[:-4], struct.unpack("<I", tail[-4:])
    if crc32c.crc32c(body) != crc:
        raise CorruptStoreError(f"{where}: the shard index fails its checksum")
    entries = np.frombuffer(body, dtype="<u8").reshape(per, 2)  # (per, [offset, nbytes])
    empty = (entries[:, 0] == _EMPTY) & (entries[:, 1] == _EMPTY)
    if empty[:used].any():
        j = int(np.flatnonzero(empty[:used])[0])
        raise CorruptStoreError(
            f"{where}: inner chunk {j} is marked not stored; every chunk holding positions is "
            "written (FORMAT.md §4), so it would read as zeros"
        )
    data_end = size - want
    stored = entries[~empty]
    if len(stored) and (
        (stored[:, 1] < 4).any()
        or (stored[:, 0] > data_end).any()
        or (stored[:, 1] > data_end - np.minimum(stored[:, 0], data_end)).any()
    ):
        raise CorruptStoreError(f"{where}: the shard index points outside the file")
