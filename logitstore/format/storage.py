"""The stored layout: which Zarr v3 arrays a store holds, their codecs, and commit records,
in a local directory or in object storage (an ``s3://...`` URL; :mod:`.objects`).

Only standard Zarr v3 codecs are used (``sharding_indexed``, ``bytes``, ``zstd``, ``blosc``,
``crc32c``), so any Zarr v3 implementation can open the raw arrays (docs/FORMAT.md §4).

A store's place is a :data:`StorePath`: a :class:`~pathlib.Path` for a directory, or the
normalised URL (a ``str``) for object storage. Every function here takes either.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.storage import LocalStore

from ..errors import CorruptStoreError, FormatError, StoreNotFoundError
from .metadata import ATTRS_KEY, Encoding, Layout, StoreMetadata
from .objects import CREATING_KEY, WRITER_KEY, ObjectLocation, is_object_url
from .schema import (
    COMMITS,
    IDS,
    INPUT_IDS,
    LOSS_MASK,
    OFFSETS,
    RESIDUAL,
    TEACHER_COLUMNS,
    TOKENIZER,
    VALUES,
    Column,
    columns,
)

if TYPE_CHECKING:  # zarr's private module; only its type is used
    from zarr.core.array_spec import ArrayConfigParams

__all__ = [
    "StorePath",
    "array",
    "codecs_version",
    "create_arrays",
    "create_store",
    "is_object_url",
    "leftover_keys",
    "location",
    "nbytes_stored",
    "open_group",
    "per_position_codecs",
    "read_all",
    "read_metadata",
    "read_shard_tail",
    "remove_shard",
    "shard_file",
    "shard_key",
    "shard_present",
    "store_path",
    "target_state",
    "write_metadata",
]

#: a local store directory, or the URL of a store in object storage
StorePath: TypeAlias = Path | str


def store_path(target: str | os.PathLike[str]) -> StorePath:
    """``target`` as a :data:`StorePath`: an object-storage URL normalised (no trailing
    ``/``), anything else a :class:`Path` (``file://`` prefixes dropped)."""
    if is_object_url(target):
        return ObjectLocation(str(target)).url
    text = os.fspath(target)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def location(root: StorePath) -> ObjectLocation | None:
    """The object location of ``root``; ``None`` for a local directory."""
    return ObjectLocation(root) if isinstance(root, str) and is_object_url(root) else None


def _zarr_root(root: StorePath, *, read_only: bool) -> Any:
    loc = location(root)
    if loc is None:
        return _RegularFiles(str(root), read_only=True) if read_only else str(root)
    return loc.zarr_store(read_only=read_only)


class _RegularFiles(LocalStore):
    """A local store that reads keys only from regular files: a named pipe would block its
    reader for ever, a device (``/dev/zero``) never ends; either is damage, not data."""

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        try:
            mode = os.stat(self.root / key).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise OSError(errno.EINVAL, f"{self.root / key} is not a regular file")
        return await super().get(key, prototype, byte_range)


# Every chunk is written, even all-zero ones, so a missing chunk is a fault, not a zero.
_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def _crc() -> zc.Crc32cCodec:
    return zc.Crc32cCodec()


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def per_position_codecs(col: Column, version: str) -> list[Any]:
    """The inner chunk codecs (after ``bytes``) of per-position array ``col`` in a store of
    format ``version`` (FORMAT.md §4): the 1.0/1.1 table below 1.2, the 1.2 table from it.

    Readers never depend on these (any standard chain decoding to the same array is valid);
    the writer uses them, and a store keeps the table of the version it records.
    """
    itemsize = np.dtype(col.dtype).itemsize
    if _minor(version) < (1, 2):
        # Measured on real top-64 output (FORMAT.md §8): byte-shuffled blosc-zstd is the best
        # fast codec for id gaps; plain zstd level 1 for values already near their entropy.
        if col.name == VALUES and itemsize == 1:
            return [zc.ZstdCodec(level=1), _crc()]
        return [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize), _crc()]
    # 1.2 (FORMAT.md §8, benchmarks/results/write.md (c)): id gaps are compressed as one
    # blosc block per chunk (blosc's default cuts a chunk into blocks that each start without
    # context) at a higher level; the float32 residual is bit-shuffled. Both lossless.
    if col.name == IDS:
        block = min(col.chunk_positions * col.row_nbytes, _MAX_BLOCK)
        blosc = zc.BloscCodec(
            cname="zstd", clevel=IDS_CLEVEL, shuffle="shuffle", typesize=itemsize, blocksize=block
        )
        return [blosc, _crc()]
    if col.name == VALUES and itemsize == 1:
        return [zc.ZstdCodec(level=1), _crc()]
    shuffle: Literal["shuffle", "bitshuffle"] = "bitshuffle" if col.name == RESIDUAL else "shuffle"
    return [zc.BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=itemsize), _crc()]


#: blosc's level for the 1.2 ``ids`` chain (blosc maps it to zstd level 2·clevel − 1)
IDS_CLEVEL = 4
#: blosc blocks of at most 64 MiB (a chunk is at most 256 MiB decoded, FORMAT.md §3)
_MAX_BLOCK = 1 << 26


def codecs_version(encoding: Encoding, layout: Layout) -> str:
    """The lowest format version whose codec table a new store of ``encoding`` and
    ``layout`` is written with: ``"1.2"`` when it has an array whose chain changed in 1.2
    (``ids``, ``residual``: ``topk`` and ``sampled``), else ``"1.0"`` (FORMAT.md §3, §10)."""
    probe = StoreMetadata(encoding, layout, 0, 0, 0, None, 0, "")  # columns() reads no more
    changed = any(
        per_position_codecs(c, "1.2") != per_position_codecs(c, "1.1") for c in columns(probe)
    )
    return "1.2" if changed else "1.0"


def create_arrays(
    root: StorePath,
    md: StoreMetadata,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    tokenizer_json: bytes | None,
    loss_mask: np.ndarray | None = None,
) -> zarr.Group:
    """Create every array at its final shape, write the inputs, offsets and loss mask, and
    then the group's metadata: the store's attributes land after everything else.

    Per-position teacher arrays stay empty until their shards are written and committed; a
    tokens-only store (encoding ``none``) has none, so all its shards are committed here.
    """
    store = _zarr_root(root, read_only=False)
    n, sp = md.num_positions, md.layout.shard_positions
    arrays: dict[str, zarr.Array[Any]] = {}
    for col in columns(md):
        arrays[col.name] = zarr.create_array(
            store,
            name=col.name,
            shape=col.shape(n),
            dtype=col.dtype,
            chunks=col.shape(col.chunk_positions),
            shards=col.shape(sp),
            compressors=per_position_codecs(col, md.format_version),
            fill_value=0,
            config=_CONFIG,
            dimension_names=("position",) if col.ndim == 1 else ("position", "candidate"),
        )
    # Whole shards at a time, ~4M positions: the inputs are never copied whole (a 10 GB
    # input's ids would otherwise exist two or three times over while the store is made).
    step = sp * max(1, (1 << 22) // sp)
    for s in range(0, n, step):
        arrays[INPUT_IDS][s : s + step] = np.asarray(input_ids[s : s + step], md.layout.id_dtype)
        if loss_mask is not None:
            arrays[LOSS_MASK][s : s + step] = np.asarray(loss_mask[s : s + step], np.uint8)

    off = zarr.create_array(
        store,
        name=OFFSETS,
        shape=offsets.shape,
        dtype="int64",
        chunks=(min(len(offsets), 1 << 20),),
        compressors=[zc.ZstdCodec(level=3), _crc()],
        fill_value=0,
        config=_CONFIG,
        dimension_names=("sequence_boundary",),
    )
    off[:] = offsets
    commits = zarr.create_array(
        store,
        name=COMMITS,
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
        tok = zarr.create_array(
            store,
            name=TOKENIZER,
            shape=buf.shape,
            dtype="uint8",
            chunks=(max(len(buf), 1),),
            compressors=[zc.ZstdCodec(level=9), _crc()],
            fill_value=0,
            config=_CONFIG,
        )
        tok[:] = buf
    # zarr wrote a bare group zarr.json with the first array; the store's metadata makes it a
    # store, and lands last.
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    group.attrs.update({ATTRS_KEY: md.to_dict()})
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


def shard_key(name: str, ndim: int, shard: int) -> str:
    """The key of ``shard`` of per-position array ``name`` (default chunk key encoding:
    ``<name>/c/<shard>`` for 1-D arrays, ``<name>/c/<shard>/0`` for 2-D)."""
    return f"{name}/c/{shard}" + ("/0" if ndim == 2 else "")


def shard_file(root: Path, name: str, ndim: int, shard: int) -> Path:
    """The file of ``shard`` of per-position array ``name`` in a local store."""
    return Path(root, shard_key(name, ndim, shard))


def shard_present(root: StorePath, name: str, ndim: int, shard: int) -> bool:
    """Whether the file or object of ``shard`` of array ``name`` exists."""
    loc = location(root)
    key = shard_key(name, ndim, shard)
    return Path(root, key).is_file() if loc is None else loc.exists(key)


def read_shard_tail(
    root: StorePath, name: str, ndim: int, shard: int, nbytes: int
) -> tuple[bytes, int]:
    """The last ``nbytes`` of a shard's file or object (where its index lies) and its size.

    Raises:
        FileNotFoundError: the shard is not there.
        OSError: it cannot be read (a :class:`StorageError` for objects).
    """
    key = shard_key(name, ndim, shard)
    loc = location(root)
    if loc is None:
        # O_NONBLOCK: opening a named pipe would wait for a writer; only a regular file is a
        # shard (a hostile store must not hang its reader)
        fd = os.open(Path(root, key), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{Path(root, key)} is not a regular file")
            size = st.st_size
            f.seek(max(size - nbytes, 0))
            return f.read(nbytes), size
    found = loc.size(key)
    if found is None:
        raise FileNotFoundError(f"{loc.url}/{key}")
    return loc.read_range(key, max(found - nbytes, 0), found), found


def remove_shard(root: StorePath, name: str, ndim: int, shard: int) -> None:
    """Delete an uncommitted shard's file or object (a resume rewrites it whole)."""
    loc = location(root)
    if loc is None:
        shard_file(Path(root), name, ndim, shard).unlink(missing_ok=True)
    else:
        loc.delete(shard_key(name, ndim, shard))


def nbytes_stored(root: StorePath) -> int:
    """Bytes a store occupies: all its files, or all objects under its prefix."""
    loc = location(root)
    if loc is None:
        return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    return sum(loc.sizes().values())


def leftover_keys(root: StorePath) -> list[str]:
    """What an interrupted writer left that is no part of a store: temporary files
    (``*.partial``) of a directory, the creation marker of an object store."""
    loc = location(root)
    if loc is None:
        return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.partial"))
    return [CREATING_KEY] if loc.exists(CREATING_KEY) else []


def open_group(root: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """Open a store's group (a directory or an object-storage URL), with a clear error when
    there is none.

    Raises:
        StoreNotFoundError: no ``zarr.json`` there.
        StorageError: (object storage) no such bucket, access denied, endpoint unreachable.
        FormatError: the metadata is unreadable.
    """
    path = store_path(root)
    loc = location(path)
    if loc is None:
        try:
            found = Path(path, "zarr.json").is_file()
            creating = found and Path(path, CREATING_KEY).exists()
        except OSError:  # a name too long for the file system, a directory it may not read
            found = creating = False
    else:
        found = loc.exists("zarr.json")
        if not found:
            loc.check_bucket()  # a missing bucket or bad credentials say so, not "no store"
        creating = found and loc.exists(CREATING_KEY)
    if creating:
        raise StoreNotFoundError(
            f"no logitstore store at {str(path)!r} yet: it is being created or copied, or that "
            f"was cut short ({CREATING_KEY} is there); rerun the write or copy to finish it"
        )
    if not found:
        raise StoreNotFoundError(
            f"no logitstore store at {str(path)!r}: expected a Zarr v3 group with a zarr.json; "
            "check the path, or write one with `logitstore write`"
        )
    try:
        return zarr.open_group(
            _zarr_root(path, read_only=mode == "r"),
            mode=mode,  # type: ignore[arg-type]
            zarr_format=3,
        )
    except StoreNotFoundError:
        raise
    except Exception as e:  # zarr raises several types for unreadable metadata
        if isinstance(e, OSError) and loc is not None:
            raise loc.error(e, "opening") from None
        raise FormatError(f"cannot open {str(path)!r} as a Zarr v3 group: {e}") from None


def target_state(root: StorePath) -> str:
    """What is at a write target: ``"empty"`` (nothing, or only what a creation cut short
    left), ``"store"`` (a group's ``zarr.json``) or ``"foreign"`` (anything else)."""
    loc = location(root)
    if loc is None:
        path = Path(root)
        if (path / CREATING_KEY).exists():
            return "empty"
        if path.is_file() or (
            path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists()
        ):
            return "foreign"
        return "store" if (path / "zarr.json").exists() else "empty"
    keys = set(loc.sizes())
    if not keys - {WRITER_KEY} or CREATING_KEY in keys:
        return "empty"
    if "zarr.json" in keys:
        return "store"
    loc.check_bucket()
    return "foreign"


def create_store(
    root: StorePath,
    md: StoreMetadata,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    tokenizer_json: bytes | None,
    loss_mask: np.ndarray | None = None,
) -> None:
    """Create a new store at ``root`` so that a crash at any moment leaves nothing that
    reads as a store (FORMAT.md §6.6), replacing whatever a store or a cut-short creation
    left there.

    A directory is built beside its destination and renamed into place. Objects cannot be
    renamed: a creation marker is put first, every earlier object under the prefix is
    deleted, the arrays are written, the group's ``zarr.json`` last, and the marker removed.
    """
    loc = location(root)
    if loc is None:
        path = Path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:12]}"
        create_arrays(tmp, md, input_ids, offsets, tokenizer_json, loss_mask)
        if path.exists():  # an empty directory, or a store the caller asked to overwrite
            shutil.rmtree(path)
        tmp.rename(path)
        return
    loc.check_bucket()
    marker = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    loc.write(CREATING_KEY, json.dumps(marker).encode())
    loc.delete("zarr.json")  # an overwritten store stops being one first
    loc.delete_many(k for k in loc.sizes() if k not in (CREATING_KEY, WRITER_KEY))
    create_arrays(root, md, input_ids, offsets, tokenizer_json, loss_mask)
    loc.delete(CREATING_KEY)


def read_metadata(group: zarr.Group) -> StoreMetadata:
    return StoreMetadata.from_dict(group.attrs.get(ATTRS_KEY))


def write_metadata(group: zarr.Group, md: StoreMetadata) -> None:
    group.attrs.update({ATTRS_KEY: md.to_dict()})
