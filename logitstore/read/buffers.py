"""Memory for decoded arrays that is handed out again: :class:`BufferPool`.

Writing fresh memory costs the kernel a page fault and a zeroed page every 4 KB, which
measured a quarter of the decoder's own time for LogitDataset's blocks, and more with many
reading threads in one process (the allocator's arenas grow and shrink). A pool hands a
buffer out again only once no array, view or tensor refers to it, so reuse never changes
what a caller holds. NumPy only (the HTTP client uses it too).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["BufferPool"]


class BufferPool:
    """Memory for decoded arrays, handed out again once no array, view or tensor refers to
    it (its reference count is back to the pool's own): a sample a caller still holds keeps
    its block's memory from being reused.

    Args:
        keep: buffers kept for reuse; more are allocated as needed and freed by Python.
    """

    def __init__(self, keep: int) -> None:
        self._buffers: list[np.ndarray] = []  # flat uint8 arrays
        self._keep = keep

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` (``np.empty``'s signature)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        for buf in self._buffers:
            # 3 references: the list, this loop's name, getrefcount's argument. Any view of
            # it (and so any tensor made from one) holds another.
            if sys.getrefcount(buf) == 3 and nbytes <= buf.nbytes <= 2 * nbytes:
                return _shaped(buf, nbytes, dtype, shape)
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        if len(self._buffers) < self._keep:
            self._buffers.append(buf)
        return _shaped(buf, nbytes, dtype, shape)


def _shaped(
    buf: np.ndarray, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    out: np.ndarray = buf[:nbytes].view(dtype).reshape(shape)
    return out
