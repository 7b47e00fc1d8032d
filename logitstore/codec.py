"""Decoding stored rows back into token ids and probabilities (NumPy only).

The stored row layout is docs/FORMAT.md §5: candidate ids sorted ascending and kept as gaps
(first id, then differences; a gap of 0 after the first column marks padding), values in the
same order. Encoding, on the teacher's device, is :mod:`logitstore.encode`.
"""

from __future__ import annotations

import numpy as np

from .metadata import SQRT_BINS

__all__ = ["decode_ids", "decode_values", "sqrt_table"]


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
        decoded: np.ndarray = table[stored]
        return decoded
    raise ValueError(f"cannot decode values of kind {values!r}")


def decode_ids(gaps: np.ndarray, dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Sorted-id gaps ``(n, m)`` → ids ``(n, m)`` and the padding mask ``(n, m)``.

    Padding slots (gap 0 after the first column) decode to id 0. ``dtype`` may be int32 for
    vocabularies below 2**31 (half the memory traffic of int64).
    """
    ids: np.ndarray = np.cumsum(
        gaps, axis=1, dtype=dtype
    )  # (n, m); the last column is each row's max id
    pad = gaps == 0
    pad[:, 0] = False
    np.putmask(ids, pad, 0)
    return ids, pad
