"""Decoding stored rows back into token ids and probabilities (NumPy; top-k rows of √p codes
by a compiled kernel instead where numba is installed: fused.py, the same bits).

The stored row layout is docs/FORMAT.md §5: candidate ids sorted ascending and kept as gaps
(first id, then differences; a gap of 0 after the first column marks padding), values in the
same order. Encoding, on the teacher's device, is :mod:`logitstore.write.encode`.

Decoding is one pass over tiles of about :data:`TILE_VALUES` values that stay in
cache: the gaps' running sum, the value table lookup, the row sum and the rescale each read
what the step before just wrote, and every step writes into the output arrays (a caller may
pass its own, e.g. memory it reuses), so no temporary as large as the block is made. The bits
are FORMAT.md §5.2's: integer sums, table lookups, and the row sum in NumPy's own order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptStoreError, FormatError, LogitStoreError
from .fused import decode_topk
from .metadata import SQRT_BINS, StoreMetadata
from .schema import StoredRows

__all__ = [
    "TILE_VALUES",
    "Batch",
    "StoredRows",
    "decode_candidates_into",
    "decode_ids",
    "decode_rows",
    "decode_values",
    "decode_values_into",
    "rescale_into",
    "sqrt_table",
]

#: Values decoded at a time (2048 rows of top-64): a tile's gaps, ids, values and
#: probabilities (11-17 bytes a value: ~1.4 MB with u16 gaps and int32 ids, ~2.2 MB with
#: int64 ids) stay in a core's L2 or the L3 cache between the steps of the pass; the size
#: was chosen for fewer GIL hand-offs. Measured against 1 << 15 (2026-12-02, 2 cores,
#: top-64 u8, positions per CPU-s): one decoding thread the same (Dataset 2.38M vs 2.46M,
#: remote reads 2.22-2.34M vs 2.15-2.21M); 16 threads decoding remote reads in one process
#: 1.27-1.39M vs 0.80-1.05M, as each tile is one release of the GIL per NumPy step, not four.
TILE_VALUES = 1 << 17


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
_PAIR_TABLES: dict[str, np.ndarray] = {}


def _pair_table(kind: str) -> np.ndarray:
    """``(65536,)`` uint64: two float32 table entries for each pair of u8 codes read as one
    little-endian uint16, so one lookup decodes two values (half the index conversions
    of a per-code lookup; 512 KB, built on first use)."""
    pairs = _PAIR_TABLES.get(kind)
    if pairs is None:
        table = _SQRT_TABLES[kind]
        codes = np.arange(1 << 16)
        two = np.empty((1 << 16, 2), dtype=np.float32)  # (65536, 2): low code, high code
        two[:, 0], two[:, 1] = table[codes & 0xFF], table[codes >> 8]
        pairs = _PAIR_TABLES[kind] = two.view("<u8").reshape(-1)
    return pairs


def decode_values_into(stored: np.ndarray, values: str, out: np.ndarray) -> None:
    """Stored values ``(n, m)`` → float32 probabilities in ``out`` (before any rescale).

    Raises:
        FormatError: an unknown value kind.
    """
    if values in ("fp32", "fp16"):
        np.copyto(out, stored, casting="unsafe")
    elif values == "bf16":  # the 16 stored bits are the float32's high half
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif values in _SQRT_TABLES:
        pairs = stored.shape[-1] % 2 == 0 and stored.flags.c_contiguous and out.flags.c_contiguous
        if pairs and np.little_endian:
            np.take(_pair_table(values), stored.view("<u2"), out=out.view("<u8"), mode="clip")
        else:
            np.take(_SQRT_TABLES[values], stored, out=out, mode="clip")
    else:
        raise FormatError(f"cannot decode values of kind {values!r}")


def decode_values(stored: np.ndarray, values: str) -> np.ndarray:
    """Stored values → float32 probabilities (before any renormalisation)."""
    if values == "fp32":
        return np.asarray(stored, dtype=np.float32)
    out = np.empty(stored.shape, dtype=np.float32)
    decode_values_into(np.ascontiguousarray(stored), values, out)
    return out


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
    _ids_into(gaps, ids, vocab_size)
    pad = gaps == 0
    pad[:, 0] = False
    return ids, pad


def _ids_into(gaps: np.ndarray, ids: np.ndarray, vocab_size: int | None) -> None:
    """(n, m) gaps → (n, m) ids: each row's running sum, then 0 where a later gap is 0
    (padding).

    Raises:
        CorruptStoreError: ``vocab_size`` is given and a decoded id reaches it.
    """
    if not ids.size:
        return
    np.add.accumulate(gaps, axis=1, dtype=ids.dtype, out=ids)
    fits = np.iinfo(ids.dtype).max // gaps.shape[1]  # gaps up to this cannot wrap a row's sum
    if np.iinfo(gaps.dtype).max > fits and int(gaps.max()) > fits:
        # e.g. uint32 gaps into int32 ids: a corrupt row's sum could wrap; check it in int64
        top = int(np.add.reduce(gaps, axis=1, dtype=np.int64).max())
    else:  # before padding is zeroed, the last column holds each row's largest id
        top = int(ids[:, -1].max())
    _check_top(top, vocab_size, ids.dtype)
    later = gaps[:, 1:]  # (n, m - 1)
    if not later.all():  # padding is rare in top-k rows: find it only where it is
        ids[:, 1:] *= later != 0


def _check_top(top: int, vocab_size: int | None, id_dtype: np.dtype[Any]) -> None:
    """Refuse decoded ids reaching ``vocab_size`` (``top`` the largest, summed exactly), or
    past what the ids' dtype holds (they would have wrapped).

    Raises:
        CorruptStoreError: they reach the vocabulary's size.
        LogitStoreError: they do not fit ``id_dtype`` (e.g. int32 for a vocabulary > 2³¹).
    """
    if vocab_size is not None and top >= vocab_size:
        raise CorruptStoreError(
            f"decoded token ids reach {top}, outside the vocabulary of {vocab_size}; "
            "run `logitstore verify`"
        )
    if top > np.iinfo(id_dtype).max:
        raise LogitStoreError(
            f"decoded token ids reach {top}, more than {id_dtype} holds: read with "
            "id_dtype=np.int64"
        )


def rescale_into(probs: np.ndarray, target: np.ndarray) -> None:
    """Scale each row of ``probs`` ``(n, m)`` in place to its known total ``target``
    ``(n,)`` (``1 − residual``), in FORMAT.md §5.2's float32 order: this removes the
    quantiser's systematic bias in the row sum. A row summing to 0 becomes 0."""
    total = np.add.reduce(probs, axis=1, dtype=np.float32)  # (n,) NumPy's pairwise order
    empty = total <= 0
    if empty.any():
        total[empty] = 1
        scale = np.divide(target, total, dtype=np.float32)  # (n,)
        scale[empty] = 0
    else:
        scale = np.divide(target, total, dtype=np.float32)
    probs *= scale[:, None]


def decode_candidates_into(
    md: StoreMetadata,
    gaps: np.ndarray | None,
    values: np.ndarray,
    target: np.ndarray | None,
    ids: np.ndarray | None,
    probs: np.ndarray,
) -> None:
    """Stored candidate rows ``(n, m)`` → ``ids`` and ``probs`` (given arrays of ``n``
    rows, written in place), tile by tile. ``target`` ``(n,)`` is each row's total
    (``1 − residual`` for top-k, ones for full) where the values are lossy; ``ids`` is
    ``None`` for a store without gaps (``full``).

    Raises:
        CorruptStoreError: a decoded id falls outside the vocabulary.
        LogitStoreError: decoded ids do not fit the ids' dtype (int32 past 2³¹).
    """
    enc = md.encoding
    n = len(values)
    rescale = enc.lossy and target is not None
    if rescale and enc.values in _SQRT_TABLES and gaps is not None and ids is not None:
        assert target is not None  # numba's one pass over each row where it can: the same bits
        top = decode_topk(gaps, values, target, _SQRT_TABLES[enc.values], ids, probs)
        if top is not None:
            _check_top(top, md.vocab_size, ids.dtype)
            return
    tile = max(1, TILE_VALUES // max(1, values.shape[1]))
    for a in range(0, n, tile):
        z = min(a + tile, n)
        if gaps is not None and ids is not None:
            _ids_into(gaps[a:z], ids[a:z], md.vocab_size)
        p = probs[a:z]
        if enc.kind == "sampled":
            assert enc.samples is not None
            np.divide(values[a:z], np.float32(enc.samples), out=p, dtype=np.float32)
        else:
            decode_values_into(values[a:z], enc.values, p)
        if rescale:
            assert target is not None
            rescale_into(p, target[a:z])


def decode_rows(
    md: StoreMetadata,
    rows: StoredRows,
    id_dtype: type = np.int64,
    alloc: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
) -> Batch:
    """Stored rows → ids and probabilities (FORMAT.md §5). The one decoder every reader uses,
    local or remote, so both give the same bits. ``ids`` and ``probs`` are allocated with
    ``alloc(shape, dtype)`` (e.g. memory the caller reuses).

    Raises:
        CorruptStoreError: a decoded id falls outside the vocabulary.
        LogitStoreError: decoded ids do not fit the ids' dtype (int32 past 2³¹).
    """
    enc = md.encoding
    n = len(rows.input_ids)
    residual = rows.residual if rows.residual is not None else np.zeros(n, dtype=np.float32)
    mask = rows.loss_mask.astype(bool) if rows.loss_mask is not None else np.ones(n, dtype=bool)
    input_ids = rows.input_ids.astype(np.int64)
    if enc.kind == "none":  # tokens only: no candidates
        empty: np.ndarray = np.zeros((n, 0), dtype=id_dtype)
        return Batch(input_ids, empty, np.zeros((n, 0), dtype=np.float32), residual, mask)
    values = np.ascontiguousarray(rows.values)
    probs = alloc(values.shape, np.float32)  # (n, m)
    ids: np.ndarray
    if rows.gaps is None:  # full: column j is token j
        ids = np.broadcast_to(np.arange(md.vocab_size, dtype=id_dtype), (n, md.vocab_size))
        target = np.ones(n, dtype=np.float32)
        decode_candidates_into(md, None, values, target, None, probs)
    else:
        ids = alloc(rows.gaps.shape, id_dtype)  # (n, m)
        target = np.subtract(np.float32(1), residual, dtype=np.float32)  # fl32(1 − residual)
        decode_candidates_into(md, rows.gaps, values, target, ids, probs)
    return Batch(input_ids, ids, probs, residual, mask)
