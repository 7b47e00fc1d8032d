"""Memory for decoded arrays that is handed out again: :class:`BufferPool`.

Writing fresh memory costs the kernel a page fault and a zeroed page every 4 KB, which
measured a quarter of the decoder's own time for LogitDataset's blocks, and more with many
reading threads in one process (the allocator's arenas grow and shrink). A pool hands a
buffer out again only once no array, view or tensor refers to it, so reuse never changes
what a caller holds. NumPy only (the HTTP client uses it too).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BufferPool"]


class BufferPool:
    """Memory for decoded arrays, handed out again once no array, view or tensor refers to
    it (its reference count is back to the pool's own): a sample a caller still holds keeps
    its block's memory from being reused.

    The pool keeps at most ``keep`` buffers: when none is free and fits, a free one that
    does not fit gives its place to the new one, so the pool follows the sizes being read
    (a few small reads first do not leave it without room for the large ones).

    Args:
        keep: buffers kept for reuse; more are allocated as needed and freed by Python.
    """

    def __init__(self, keep: int) -> None:
        # [0] is a sentinel the pool holds and never hands out. A buffer is free when its
        # reference count is the sentinel's, both taken the same way: straight from the
        # list, never through a local name (a debugger or tracer keeps a frame's locals),
        # and under the lock (a second thread inside the loop would hold references too).
        self._buffers: list[np.ndarray] = [np.empty(0, dtype=np.uint8)]  # flat uint8 arrays
        self._keep = keep
        self._lock = threading.Lock()  # LogitDataset's reader and read-ahead thread share one

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` (``np.empty``'s signature)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:  # nothing to reuse, and no place to take
            return np.empty(shape, dtype)
        with self._lock:
            buffers = self._buffers
            free = sys.getrefcount(buffers[0])
            unfit = 0  # a free buffer of another size, whose place a new one may take
            for i in range(1, len(buffers)):
                if sys.getrefcount(buffers[i]) == free:  # nothing outside refers to it
                    if nbytes <= buffers[i].nbytes <= 2 * nbytes:
                        return _shaped(buffers[i], nbytes, dtype, shape)
                    unfit = i
            new = np.empty(nbytes, dtype=np.uint8)
            if len(buffers) <= self._keep:
                buffers.append(new)
            elif unfit:
                buffers[unfit] = new
            return _shaped(new, nbytes, dtype, shape)


def _shaped(
    buf: np.ndarray, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    out: np.ndarray = buf[:nbytes].view(dtype).reshape(shape)
    return out
