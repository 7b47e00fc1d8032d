"""The compiled one-pass decoder of top-k rows with table-coded values (numba). Imported only
through :mod:`logitstore.format.fused`, which decides whether it is used.

Each row is decoded in one pass while it sits in cache: the gaps' running sum (the ids, 0 in
padding), the value table lookup, the row's pairwise sum, ``s = t / Σ`` and ``q · s``. The
bits are FORMAT.md §5.2's, as codec.py computes them with NumPy: integer sums; float32
division and multiplication, rounded once each (numba compiles without fast-math, so nothing
is reassociated or fused into a multiply-add); and the row sum in the spec's pairwise order,
written out for rows of up to 128 slots (wider rows stay with NumPy: no recursion here, as
numba's cache mishandles recursive functions — numba/numba#6061, a segfault on reload).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["MAX_SLOTS", "decode_topk_table"]

#: The widest row this kernel decodes: the spec's pairwise sum is one level up to here.
MAX_SLOTS = 128


def _jit(fn: Any) -> Any:
    """Compiled without the GIL and bounds checks (fused.py checks shapes first), and cached
    on disk; where numba finds no writable place for its cache, compiled in each process."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False, error_model="numpy")(fn)


@_jit
def _row_sum(p: Any, m: int) -> Any:
    """``Σ p[0:m]`` in FORMAT.md §5.2's pairwise order, float32, for ``m ≤ 128``."""
    if m < 8:
        s = np.float32(-0.0)
        for i in range(m):
            s = np.float32(s + p[i])
        return s
    r0, r1, r2, r3 = p[0], p[1], p[2], p[3]
    r4, r5, r6, r7 = p[4], p[5], p[6], p[7]
    whole = m - m % 8
    for i in range(8, whole, 8):
        r0 = np.float32(r0 + p[i])
        r1 = np.float32(r1 + p[i + 1])
        r2 = np.float32(r2 + p[i + 2])
        r3 = np.float32(r3 + p[i + 3])
        r4 = np.float32(r4 + p[i + 4])
        r5 = np.float32(r5 + p[i + 5])
        r6 = np.float32(r6 + p[i + 6])
        r7 = np.float32(r7 + p[i + 7])
    low = np.float32(np.float32(r0 + r1) + np.float32(r2 + r3))
    high = np.float32(np.float32(r4 + r5) + np.float32(r6 + r7))
    s = np.float32(low + high)
    for i in range(whole, m):
        s = np.float32(s + p[i])
    return s


@_jit
def decode_topk_table(gaps: Any, values: Any, target: Any, table: Any, ids: Any, probs: Any) -> Any:
    """Rows ``(n, m)`` of id gaps and table codes → ``ids`` and ``probs`` (written in place),
    each row scaled to ``target`` ``(n,)``; returns the largest id any row reaches before
    padding is zeroed (its last running sum), for the caller's vocabulary check. Sums run in
    int64, whatever ``ids``' dtype."""
    n, m = values.shape
    top = np.int64(0)
    for i in range(n):
        s = np.int64(gaps[i, 0])
        ids[i, 0] = s
        for j in range(1, m):
            g = np.int64(gaps[i, j])
            s += g
            ids[i, j] = s if g != 0 else 0
        top = max(top, s)
        p = probs[i]
        v = values[i]
        for j in range(m):
            p[j] = table[v[j]]
        total = _row_sum(p, m)
        scale = np.float32(target[i] / total) if total > 0 else np.float32(0)
        for j in range(m):
            p[j] = np.float32(p[j] * scale)
    return top
