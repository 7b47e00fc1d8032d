"""A local store's positions decoded straight from its shards (complete, or committed where
read), one inner chunk at a time: how :class:`logitstore.LogitStore` reads a local store,
and so :class:`logitstore.LogitDataset` (no torch here).

Each inner chunk of ``ids`` and ``values`` is decompressed into a small buffer, and decoded
from it (:func:`logitstore.format.codec.decode_candidates_into`) while it is still in the
core's cache, into arrays the caller may provide. No array of stored rows as large as the
read is ever made, and the result is :func:`~logitstore.format.codec.decode_rows`'s to the
bit: the same decoder, over the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .chunk_decode import into_place
from .codec import Batch, decode_candidates_into, decode_rows
from .metadata import StoreMetadata
from .schema import IDS, INPUT_IDS, LOSS_MASK, RESIDUAL, VALUES, columns
from .shards import ChunkColumn, ShardFiles, chunk_bytes, chunk_plan, read_chunked

__all__ = ["Alloc", "read_decoded"]

#: ``alloc(shape, dtype)`` → an uninitialised array (``np.empty``, or memory the caller reuses)
Alloc = Callable[[tuple[int, ...], Any], np.ndarray]


def read_decoded(
    root: Path,
    md: StoreMetadata,
    layout: list[ChunkColumn],
    start: int,
    stop: int,
    id_dtype: type = np.int64,
    alloc: Alloc = np.empty,
) -> Batch:
    """Positions ``[start, stop)`` of the local store at ``root`` (its
    :func:`~logitstore.format.shards.chunk_layout` is ``layout``; every shard the range
    touches committed), decoded. ``ids`` and ``probs`` are allocated with ``alloc``.

    Raises:
        CorruptStoreError: a missing or damaged shard or chunk, or ids outside the vocabulary.
    """
    cols = {c.name: (c, layout[i]) for i, c in enumerate(columns(md))}
    enc = md.encoding
    ids_col, values_col = cols.get(IDS), cols.get(VALUES)
    if values_col is None or (ids_col is not None and ids_col[1].rows != values_col[1].rows):
        # tokens only, or ids and values chunked differently: decode the rows as read
        return decode_rows(md, read_chunked(root, md, layout, start, stop), id_dtype)
    n = stop - start
    vectors = read_chunked(root, md, layout, start, stop, (INPUT_IDS, RESIDUAL, LOSS_MASK))
    input_ids = vectors.input_ids.astype(np.int64)  # (n,)
    residual = vectors.residual
    if residual is None:  # no residual column: 0 (FORMAT.md §5.2)
        residual = np.zeros(n, dtype=np.float32)
    mask = np.ones(n, dtype=bool) if vectors.loss_mask is None else vectors.loss_mask.astype(bool)
    m = values_col[0].width or 0
    probs = alloc((n, m), np.float32)  # (n, m)
    ids: np.ndarray
    if ids_col is None:  # full: column j is token j
        ids = np.broadcast_to(np.arange(md.vocab_size, dtype=id_dtype), (n, md.vocab_size))
        target: np.ndarray | None = np.ones(n, dtype=np.float32)
    else:
        ids = alloc((n, m), id_dtype)  # (n, m)
        target = (
            np.subtract(np.float32(1), residual, dtype=np.float32) if enc.kind == "topk" else None
        )
    chunk = values_col[1].rows
    # One chunk of stored gaps and values at a time, decoded from where it was decompressed.
    gaps_buf = np.empty((chunk, m), dtype=np.dtype(md.layout.id_dtype).newbyteorder("<"))
    values_buf = np.empty((chunk, m), dtype=np.dtype(md.layout.value_dtype).newbyteorder("<"))
    with ShardFiles() as files:
        for first, _, k in chunk_plan([values_col[1]], start, stop):
            lo, hi = max(start, first) - first, min(stop, first + chunk) - first
            gaps = None
            if ids_col is not None:
                data = chunk_bytes(root, ids_col[1], k, files)
                into_place(data, ids_col[1].codec, gaps_buf, ids_col[1].where(root, k))
                gaps = gaps_buf[lo:hi]
            data = chunk_bytes(root, values_col[1], k, files)
            into_place(data, values_col[1].codec, values_buf, values_col[1].where(root, k))
            at = slice(first + lo - start, first + hi - start)  # the rows' place in the output
            decode_candidates_into(
                md,
                gaps,
                values_buf[lo:hi],
                None if target is None else target[at],
                None if ids_col is None else ids[at],
                probs[at],
            )
    return Batch(input_ids, ids, probs, residual, mask)
