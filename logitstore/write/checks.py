"""What a write refuses before any work is done: sequences that do not partition the tokens
or leave the vocabulary, a target that is not ours or is already complete, a malformed mask.
Checked before a teacher is loaded, so a bad command fails in seconds, not hours."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, LogitStoreError, StoreExistsError
from ..format.metadata import Encoding, StoreMetadata
from ..format.storage import open_group, read_metadata, store_path, target_state

__all__ = ["check_loss_mask", "check_sequences", "check_target"]


def check_sequences(input_ids: np.ndarray, offsets: np.ndarray, vocab_size: int) -> None:
    """Raise :class:`InputError` unless ``offsets`` partition ``input_ids`` into non-empty
    sequences of ids below ``vocab_size``."""
    if input_ids.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2:
        raise InputError(
            f"expected 1-D input_ids and at least two offsets, got shapes {input_ids.shape} "
            f"and {offsets.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != len(input_ids) or np.any(np.diff(offsets) < 1):
        raise InputError(
            "offsets must start at 0, end at len(input_ids) and strictly increase "
            "(no empty sequences)"
        )
    if len(input_ids) and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        bad = int(np.flatnonzero((input_ids < 0) | (input_ids >= vocab_size))[0])
        raise InputError(
            f"input token id {int(input_ids[bad])} at position {bad} is outside the teacher's "
            f"vocabulary [0, {vocab_size}); was the data tokenised with another tokenizer?"
        )


def check_target(
    path: str | os.PathLike[str],
    overwrite: bool,
    identity: str | None = None,
    *,
    allow_complete: bool = False,
    encoding: Encoding | None = None,
    seed: int | None = None,
) -> StoreMetadata | None:
    """Check ``path`` (a directory or an object-storage URL) before any work: returns an
    interrupted store's metadata (to resume), or ``None`` when a new store may be created
    there. A complete store's metadata is returned when its identity is ``identity`` (a
    rerun of a finished write: nothing to do), or, with ``allow_complete``, whatever its
    identity (an early check, before the identity is known; the writer decides) — unless
    ``encoding`` or ``seed`` already differ from the store's: then it is refused at once,
    before hours of work.

    Raises:
        StoreExistsError: a complete store of another identity is there and ``overwrite`` is
            false, or something that is not a logitstore store (never touched, even with
            ``overwrite``).
        StorageError: (object storage) no such bucket, access denied, endpoint unreachable.
    """
    path = store_path(path)
    if isinstance(path, Path):
        _check_local_target(path)
    state = target_state(path)
    if state == "foreign":
        raise StoreExistsError(
            f"{str(path)!r} exists and is not a logitstore store; refusing to touch it. "
            "Choose another --out"
        )
    if state == "empty":
        return None
    try:
        existing = read_metadata(open_group(path))
    except LogitStoreError as e:
        raise StoreExistsError(
            f"{str(path)!r} holds something that is not a readable logitstore store ({e}); "
            "remove it yourself or choose another --out"
        ) from None
    if overwrite:
        return None
    if existing.state == "complete" and allow_complete:
        differs = (encoding is not None and encoding != existing.encoding) or (
            seed is not None and seed != existing.seed
        )
        if differs:
            raise StoreExistsError(
                f"{str(path)!r} already holds a complete store with another encoding or seed "
                f"({existing.encoding}, seed {existing.seed}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out"
            )
    if existing.state == "complete" and not (allow_complete or existing.identity == identity):
        raise StoreExistsError(
            f"{str(path)!r} already holds a complete store written from other data or "
            "settings; pass --overwrite (overwrite=True) to replace it, or choose another --out"
            if identity is not None
            else f"{str(path)!r} already holds a complete store; pass --overwrite "
            "(overwrite=True) to replace it, or choose another --out"
        )
    return existing


def _check_local_target(path: Path) -> None:
    """A directory can be made and written at ``path``: not a symbolic link (``--overwrite``
    would replace the link's target), under directories only, writable."""
    try:
        _check_local_path(path)
    except OSError as e:  # a name too long, a loop of links, an unreadable directory
        raise InputError(f"--out {str(path)!r}: {e.strerror or e}; choose another --out") from None


def _check_local_path(path: Path) -> None:
    if path.is_symlink():
        raise InputError(
            f"--out {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); logitstore "
            "writes a store only at its real path: pass that path instead"
        )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(
            f"--out {str(path)!r}: {str(ancestor)!r} is a file, not a directory; choose "
            "another --out"
        )
    writable = path if path.is_dir() else ancestor
    if not os.access(writable, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {str(path)!r}: cannot write in {str(writable)!r} (a read-only file system, "
            "or no permission); choose another --out"
        )


def check_loss_mask(loss_mask: np.ndarray, num_positions: int) -> np.ndarray:
    """``loss_mask`` as uint8 0/1 of one entry per position, or :class:`InputError`."""
    mask = np.asarray(loss_mask)
    if mask.shape != (num_positions,):
        raise InputError(
            f"loss_mask has shape {mask.shape}; expected ({num_positions},), one entry per position"
        )
    if mask.dtype == np.bool_ or not len(mask):
        ok = True
    elif mask.dtype.kind in "iu":  # min/max: no temporary arrays the size of the input
        ok = mask.min() >= 0 and mask.max() <= 1
    else:
        ok = bool(np.isin(mask, (0, 1)).all())
    if not ok:
        raise InputError("loss_mask must hold only 0 and 1 (or booleans)")
    return mask.astype(np.uint8, copy=False)
