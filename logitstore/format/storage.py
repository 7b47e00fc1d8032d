"""The on-disk layout: which Zarr v3 arrays a store holds, their codecs, and commit records.

Only standard Zarr v3 codecs are used (``sharding_indexed``, ``bytes``, ``zstd``, ``blosc``,
``crc32c``), so any Zarr v3 implementation can open the raw arrays (docs/FORMAT.md §4).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.codecs as zc

from ..errors import CorruptStoreError, FormatError, StoreNotFoundError
from .metadata import ATTRS_KEY, StoreMetadata
from .schema import (
    COMMITS,
    INPUT_IDS,
    LOSS_MASK,
    OFFSETS,
    TEACHER_COLUMNS,
    TOKENIZER,
    VALUES,
    Column,
    columns,
)

if TYPE_CHECKING:  # zarr's private module; only its type is used
    from zarr.core.array_spec import ArrayConfigParams

__all__ = [
    "array",
    "create_arrays",
    "open_group",
    "read_all",
    "read_metadata",
    "write_metadata",
]

# Every chunk is written, even all-zero ones, so a missing chunk is a fault, not a zero.
_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def _crc() -> zc.Crc32cCodec:
    return zc.Crc32cCodec()


def _per_position_codecs(col: Column) -> list[Any]:
    # Measured on real top-64 output (docs/FORMAT.md §8): byte-shuffled blosc-zstd is the
    # best fast codec for id gaps; plain zstd level 1 for values already near their entropy.
    itemsize = np.dtype(col.dtype).itemsize
    if col.name == VALUES and itemsize == 1:
        return [zc.ZstdCodec(level=1), _crc()]
    return [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize), _crc()]


def create_arrays(
    root: Path,
    md: StoreMetadata,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    tokenizer_json: bytes | None,
    loss_mask: np.ndarray | None = None,
) -> zarr.Group:
    """Create the group and every array at its final shape; write the inputs, offsets and
    loss mask.

    Per-position teacher arrays stay empty until their shards are written and committed; a
    tokens-only store (encoding ``none``) has none, so all its shards are committed here.
    """
    group = zarr.open_group(
        str(root), mode="w", zarr_format=3, attributes={ATTRS_KEY: md.to_dict()}
    )
    n, sp = md.num_positions, md.layout.shard_positions
    arrays: dict[str, zarr.Array[Any]] = {}
    for col in columns(md):
        arrays[col.name] = group.create_array(
            col.name,
            shape=col.shape(n),
            dtype=col.dtype,
            chunks=col.shape(col.chunk_positions),
            shards=col.shape(sp),
            compressors=_per_position_codecs(col),
            fill_value=0,
            config=_CONFIG,
            dimension_names=("position",) if col.ndim == 1 else ("position", "candidate"),
        )
    arrays[INPUT_IDS][:] = input_ids.astype(md.layout.id_dtype)
    if loss_mask is not None:
        arrays[LOSS_MASK][:] = loss_mask.astype(np.uint8)

    off = group.create_array(
        OFFSETS,
        shape=offsets.shape,
        dtype="int64",
        chunks=(min(len(offsets), 1 << 20),),
        compressors=[zc.ZstdCodec(level=3), _crc()],
        fill_value=0,
        config=_CONFIG,
        dimension_names=("sequence_boundary",),
    )
    off[:] = offsets
    commits = group.create_array(
        COMMITS,
        shape=(md.num_shards,),
        dtype="uint8",
        chunks=(1,),
        compressors=[_crc()],
        fill_value=0,
        dimension_names=("shard",),
    )
    if not TEACHER_COLUMNS[md.encoding.kind]:  # tokens only: nothing per shard left to write
        commits.with_config(_CONFIG)[:] = 1
    if tokenizer_json is not None:
        buf = np.frombuffer(tokenizer_json, dtype=np.uint8)
        tok = group.create_array(
            TOKENIZER,
            shape=buf.shape,
            dtype="uint8",
            chunks=(max(len(buf), 1),),
            compressors=[zc.ZstdCodec(level=9), _crc()],
            fill_value=0,
            config=_CONFIG,
        )
        tok[:] = buf
    return group


def maybe_array(group: zarr.Group, name: str, *, writable: bool = False) -> zarr.Array[Any] | None:
    """Array ``name`` of ``group``, or ``None`` if the store has no node of that name.

    ``writable`` arrays write every chunk: zarr's run-time config is not stored with the
    array, so it is set again on each open.

    Raises:
        CorruptStoreError: the array's metadata is unreadable.
        FormatError: the node is not an array.
    """
    try:
        node = group.get(name)
    except Exception as e:  # unreadable zarr.json of the array
        raise CorruptStoreError(f"the metadata of array {name!r} is unreadable: {e}") from None
    if node is None:
        return None
    if not isinstance(node, zarr.Array):
        raise FormatError(f"{name!r} in the store is a {type(node).__name__}, not an array")
    return node.with_config(_CONFIG) if writable else node


def array(group: zarr.Group, name: str, *, writable: bool = False) -> zarr.Array[Any]:
    """Array ``name`` of ``group``; :class:`FormatError` if the store lacks it."""
    arr = maybe_array(group, name, writable=writable)
    if arr is None:
        raise FormatError(f"the store has no array {name!r}")
    return arr


def read_all(group: zarr.Group, name: str) -> np.ndarray:
    """The whole of a (small) array as NumPy; damage is a :class:`CorruptStoreError`."""
    arr = array(group, name)
    try:
        return np.asarray(arr[:])
    except Exception as e:  # zarr raises ValueError and others on checksum or decode failures
        raise CorruptStoreError(
            f"array {name!r} is damaged: {e}; run `logitstore verify`"
        ) from None


def shard_file(root: Path, name: str, ndim: int, shard: int) -> Path:
    """The file of ``shard`` of per-position array ``name`` in a local store (default chunk
    key encoding: ``<name>/c/<shard>`` for 1-D arrays, ``<name>/c/<shard>/0`` for 2-D)."""
    return Path(root, name, "c", str(shard), *(["0"] if ndim == 2 else []))


def open_group(root: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """Open a store's group, with a clear error when there is none."""
    path = Path(root)
    if not (path / "zarr.json").is_file():
        raise StoreNotFoundError(
            f"no logitstore store at {str(path)!r}: expected a Zarr v3 group with a zarr.json; "
            "check the path, or write one with `logitstore write`"
        )
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as e:  # zarr raises several types for unreadable metadata
        raise FormatError(f"cannot open {str(path)!r} as a Zarr v3 group: {e}") from None


def read_metadata(group: zarr.Group) -> StoreMetadata:
    return StoreMetadata.from_dict(group.attrs.get(ATTRS_KEY))


def write_metadata(group: zarr.Group, md: StoreMetadata) -> None:
    group.attrs.update({ATTRS_KEY: md.to_dict()})
