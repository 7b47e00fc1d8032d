"""Decoding stored rows back into token ids and probabilities (NumPy only).

The stored row layout is docs/FORMAT.md §5: candidate ids sorted ascending and kept as gaps
(first id, then differences; a gap of 0 after the first column marks padding), values in the
same order. Encoding, on the teacher's device, is :mod:`logitstore.write.encode`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import CorruptStoreError, FormatError
from .metadata import SQRT_BINS, StoreMetadata
from .schema import StoredRows

__all__ = ["Batch", "StoredRows", "decode_ids", "decode_rows", "decode_values", "sqrt_table"]


class Batch(NamedTuple):
    """Decoded rows for ``n`` consecutive positions; ``m`` stored candidates per position
    (``m = 0`` for a tokens-only store)."""

    input_ids: np.ndarray  # (n,) int64: the token the teacher read at each position
    ids: np.ndarray  # (n, m) int64 (or the dtype asked for): candidate ids, 0 in padding
    probs: np.ndarray  # (n, m) float32: teacher probabilities at the store's temperature
    residual: np.ndarray  # (n,) float32: mass outside the stored ids (0 unless topk)
    # (n,) bool: whether each position's prediction counts for training (all true unless
    # the store has a loss mask, FORMAT.md §4). None only in Batches built by hand.
    loss_mask: np.ndarray | None = None


def sqrt_table(bins: int) -> np.ndarray:
    # code 0 → 0; code c in 1..bins → the centre of sqrt-bin c, squared (FORMAT.md §5.2).
    centres = (np.arange(1, bins + 1, dtype=np.float64) - 0.5) / bins
    table = np.zeros(256, dtype=np.float32)
    table[1 : bins + 1] = centres**2
    return table


_SQRT_TABLES = {kind: sqrt_table(bins) for kind, bins in SQRT_BINS.items()}


def decode_values(stored: np.ndarray, values: str) -> np.ndarray:
    """Stored values → float32 probabilities (before any renormalisation)."""
    if values == "fp32":
        return np.asarray(stored, dtype=np.float32)
    if values == "fp16":
        return stored.astype(np.float32)
    if values == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    table = _SQRT_TABLES.get(values)
    if table is not None:
        decoded: np.ndarray = np.take(table, stored)  # one lookup pass, float32 out
        return decoded
    raise FormatError(f"cannot decode values of kind {values!r}")


def decode_ids(
    gaps: np.ndarray, dtype: type = np.int64, vocab_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted-id gaps ``(n, m)`` → ids ``(n, m)`` and the padding mask ``(n, m)``.

    Padding slots (gap 0 after the first column) decode to id 0. ``dtype`` may be int32 for
    vocabularies below 2**31 (half the memory traffic of int64).

    Raises:
        CorruptStoreError: ``vocab_size`` is given and a decoded id reaches it.
    """
    ids: np.ndarray = np.empty(gaps.shape, dtype=dtype)  # (n, m)
    if ids.size:
        # add.accumulate into a given buffer: measured 2x np.cumsum's time on (65536, 64) u16.
        np.add.accumulate(gaps, axis=1, dtype=dtype, out=ids)
    # Padding adds 0, so the last column holds each row's largest id: a free range check.
    top = int(ids[:, -1].max()) if ids.size else 0
    if vocab_size is not None and top >= vocab_size:
        raise CorruptStoreError(
            f"decoded token ids reach {top}, outside the vocabulary of {vocab_size}; "
            "run `logitstore verify`"
        )
    pad = gaps == 0
    pad[:, 0] = False
    if ids.size:
        ids[:, 1:] *= ~pad[:, 1:]  # padding → id 0 (a multiply: cheaper than putmask)
    return ids, pad


def _rescale(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    # Lossy values: scale each row to its known total (1 − residual), which removes the
    # quantiser's systematic bias in the row sum (FORMAT.md §5.2).
    total = probs.sum(axis=1, dtype=np.float32)  # (n,)
    empty = total <= 0
    total[empty] = 1
    scale = np.divide(target, total, dtype=np.float32)  # (n,)
    scale[empty] = 0
    probs *= scale[:, None]
    return probs


def decode_rows(md: StoreMetadata, rows: StoredRows, id_dtype: type = np.int64) -> Batch:
    """Stored rows → ids and probabilities (FORMAT.md §5). The one decoder every reader uses,
    local or remote, so both give the same bits.

    Raises:
        CorruptStoreError: a decoded id falls outside the vocabulary.
    """
    enc = md.encoding
    n = len(rows.input_ids)
    residual = rows.residual if rows.residual is not None else np.zeros(n, dtype=np.float32)
    mask = rows.loss_mask.astype(bool) if rows.loss_mask is not None else np.ones(n, dtype=bool)
    input_ids = rows.input_ids.astype(np.int64)
    if enc.kind == "none":  # tokens only: no candidates
        empty: np.ndarray = np.zeros((n, 0), dtype=id_dtype)
        return Batch(input_ids, empty, np.zeros((n, 0), dtype=np.float32), residual, mask)
    if enc.kind == "sampled":
        assert enc.samples is not None
        probs = rows.values.astype(np.float32) / np.float32(enc.samples)
    else:
        probs = decode_values(rows.values, enc.values)
    if rows.gaps is None:
        ids: np.ndarray = np.broadcast_to(
            np.arange(md.vocab_size, dtype=id_dtype), (n, md.vocab_size)
        )
        if enc.lossy:
            probs = _rescale(probs, np.ones(n, dtype=np.float32))
    else:
        ids, _ = decode_ids(rows.gaps, id_dtype, md.vocab_size)
        if enc.lossy and enc.kind == "topk":
            probs = _rescale(probs, 1.0 - residual)
    return Batch(input_ids, ids, probs, residual, mask)
