"""Which decoder turns the common rows — top-k ids as gaps, values coded through a √p table
(``u4``…``u8``) — into ids and probabilities: NumPy (codec.py, always there) or a compiled
one-pass kernel (fused_kernel.py) when numba is installed (``pip install 'logitstore[fast]'``).

Both give the same bits (FORMAT.md §5.2; tests/test_decode_fast.py checks both against the
spec step by step, tests/test_fused_decoder.py against each other for rows of 1-128 slots,
uint16 and uint32 gaps, int32 and int64 ids). The kernel decodes a row in one pass while it is
in cache instead of NumPy's five passes over a tile: about 2-3× less CPU for top-64 u8 rows
(benchmarks/results/read.md). It costs numba and llvmlite on disk (~210 MB) and, once per
machine and argument types, a compile of ~1.5 s that numba caches beside the module (or in
its user-wide cache; where neither is writable, each process compiles); then ~0.4-0.7 s per
process to import numba and load the kernel, which LogitDataset spends before DataLoader
workers fork (:func:`warm`).

``LOGITSTORE_DECODER`` chooses: ``auto`` (the default: the kernel when numba loads),
``numpy``, or ``numba`` (an error when it cannot be loaded). Under ``auto`` a kernel that
fails at run time (e.g. its cache directory vanished) is dropped with a warning, and NumPy
decodes from then on.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import LogitStoreError
from .metadata import SQRT_BINS, StoreMetadata

__all__ = ["DECODERS", "DECODER_ENV", "check_decoder", "decode_topk", "decoder", "warm"]

DECODER_ENV = "LOGITSTORE_DECODER"
DECODERS = ("auto", "numpy", "numba")

_lock = threading.Lock()
# A fork waits for a load in progress, so no child inherits the lock held.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_lock.release
    )
_kernel: Callable[..., Any] | None = None
_max_slots = 0
_unavailable: str | None = None  # why the kernel is not used, once loading it was tried
#: argument types the kernel has been compiled (or loaded from numba's cache) for: numba does
#: that on the first call with new types, holding its own lock, so that call is made under
#: ``_lock`` too, and a fork waits for it (a child forked mid-compile would wait forever)
_ready: set[tuple[Any, ...]] = set()


def _setting() -> str:
    value = os.environ.get(DECODER_ENV, "auto") or "auto"
    if value not in DECODERS:
        raise LogitStoreError(
            f"{DECODER_ENV} is {value!r}; expected one of {', '.join(DECODERS)} "
            "(auto, the default, uses numba when it is installed), or leave it unset"
        )
    return value


def check_decoder() -> None:
    """Refuse a bad ``LOGITSTORE_DECODER`` before anything is read (stores call this when
    opened): numba is loaded here only when the setting asks for it by name.

    Raises:
        LogitStoreError: the setting is not one of :data:`DECODERS`, or it is ``numba`` and
            the kernel cannot be loaded.
    """
    if _setting() == "numba":
        decoder()


def decoder() -> str:
    """The decoder this process uses now: ``numba`` or ``numpy``, from
    ``LOGITSTORE_DECODER`` (numba is imported, once, only when the setting allows it).

    Raises:
        LogitStoreError: as :func:`check_decoder`.
    """
    value = _setting()
    if value == "numpy":
        return "numpy"
    _load()
    if _kernel is None:
        if value == "numba":
            raise LogitStoreError(
                f"{DECODER_ENV}=numba, but numba's decoder cannot be used ({_unavailable}); "
                "install numba with `pip install 'logitstore[fast]'`, or unset the variable"
            )
        return "numpy"
    return "numba"


def _load() -> None:
    global _kernel, _max_slots, _unavailable
    if _kernel is not None or _unavailable is not None:
        return
    with _lock:
        if _kernel is not None or _unavailable is not None:
            return
        try:
            from . import fused_kernel
        except Exception as e:  # not installed, or a numba that does not fit this NumPy
            _unavailable = f"{type(e).__name__}: {e}"
            return
        _max_slots = fused_kernel.MAX_SLOTS
        _kernel = fused_kernel.decode_topk_table


def _fits(
    gaps: np.ndarray, values: np.ndarray, target: np.ndarray, ids: np.ndarray, probs: np.ndarray
) -> bool:
    """Whether the kernel was written for these arrays: one (n, m) shape with 1 ≤ m ≤ 128
    (the kernel reads without bounds checks), native byte order, C order, writeable outputs."""
    n, m = values.shape if values.ndim == 2 else (0, 0)
    return (
        0 < m <= _max_slots
        and gaps.shape == ids.shape == probs.shape == (n, m)
        and target.shape == (n,)
        and values.dtype == np.uint8
        and gaps.dtype.kind == "u"
        and gaps.dtype.itemsize <= 4  # uint64 sums could wrap past int64
        and ids.dtype in (np.int32, np.int64)
        and probs.dtype == np.float32
        and target.dtype == np.float32
        and all(a.dtype.isnative and a.flags.c_contiguous for a in (gaps, target, ids, probs))
        and values.flags.c_contiguous
        and ids.flags.writeable
        and probs.flags.writeable
    )


def decode_topk(
    gaps: np.ndarray,
    values: np.ndarray,
    target: np.ndarray,
    table: np.ndarray,
    ids: np.ndarray,
    probs: np.ndarray,
) -> int | None:
    """Decode top-k rows ``(n, m)`` with the kernel into ``ids`` and ``probs``, each row
    scaled to ``target`` ``(n,)``; returns the largest id a row reaches (for the caller's
    vocabulary check), or ``None`` when NumPy is to decode them (the setting, numba missing,
    arrays the kernel was not written for, or a kernel that failed under ``auto``).

    Raises:
        LogitStoreError: the setting is bad, or it is ``numba`` and the kernel failed.
    """
    global _kernel, _unavailable
    kernel = _kernel if decoder() == "numba" else None
    if kernel is None or not _fits(gaps, values, target, ids, probs):
        return None
    args = (gaps, values, target, table, ids, probs)
    types = tuple((a.dtype, a.flags.writeable, a.flags.aligned) for a in args)
    try:
        if types in _ready:
            return int(kernel(*args))
        with _lock:  # the first call with these types compiles: no fork meanwhile
            top = int(kernel(*args))
            _ready.add(types)
            return top
    except Exception as e:  # numba compiles per argument types, on first use: it can fail then
        why = f"{type(e).__name__}: {e}"
        if _setting() == "numba":
            raise LogitStoreError(
                f"numba's decoder failed ({why}); set {DECODER_ENV}=numpy to decode with NumPy"
            ) from None
        _kernel, _unavailable = None, why  # before the warning, which may be raised as an error
        warnings.warn(
            f"numba's decoder failed ({why}); decoding with NumPy from now on "
            f"(set {DECODER_ENV}=numpy to choose it and silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def warm(md: StoreMetadata, id_dtype: type) -> None:
    """Load the kernel for a store's rows and these ids now (e.g. before DataLoader workers
    fork, so they inherit it instead of each loading it every epoch); nothing where NumPy
    decodes them.

    Raises:
        LogitStoreError: as :func:`decode_topk`.
    """
    enc = md.encoding
    if enc.kind != "topk" or enc.values not in SQRT_BINS or decoder() != "numba":
        return
    shape = (1, 8)
    decode_topk(
        np.zeros(shape, md.layout.id_dtype),
        np.zeros(shape, np.uint8),
        np.ones(1, np.float32),
        np.zeros(256, np.float32),
        np.empty(shape, id_dtype),
        np.empty(shape, np.float32),
    )
