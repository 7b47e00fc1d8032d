"""Reading a store: random access by position range and by sequence, decoded to NumPy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codec import Batch, StoredRows, decode_rows
from .errors import CorruptStoreError, FormatError, IncompleteStoreError, PositionError
from .metadata import Encoding, StoreMetadata
from .storage import (
    COMMITS,
    IDS,
    INPUT_IDS,
    LOSS_MASK,
    OFFSETS,
    RESIDUAL,
    TOKENIZER,
    VALUES,
    maybe_array,
    open_group,
    read_all,
    read_metadata,
    shard_file,
)

if TYPE_CHECKING:
    import tokenizers

__all__ = ["Batch", "LogitStore", "StoreBase", "open"]


class StoreBase:
    """What every store reader offers, local or remote: sizes, decoding, sequences.

    Subclasses provide ``metadata``, ``offsets``, :meth:`read_stored`, :meth:`tokenizer`,
    :meth:`committed` and :meth:`nbytes_stored`.
    """

    metadata: StoreMetadata
    offsets: np.ndarray
    path: Any  # a directory (Path) or a URL (str): what `open` takes to open it again

    def read_stored(self, start: int, stop: int) -> StoredRows:
        raise NotImplementedError

    def tokenizer(self) -> tokenizers.Tokenizer | None:
        raise NotImplementedError

    def committed(self) -> np.ndarray:
        raise NotImplementedError

    def nbytes_stored(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections or handles (a no-op for local stores; reads reopen them)."""

    def __len__(self) -> int:
        return self.metadata.num_positions

    @property
    def num_sequences(self) -> int:
        return self.metadata.num_sequences

    @property
    def encoding(self) -> Encoding:
        return self.metadata.encoding

    @property
    def vocab_size(self) -> int:
        return self.metadata.vocab_size

    def read(self, start: int, stop: int, *, id_dtype: type = np.int64) -> Batch:
        """Decode positions ``[start, stop)``.

        ``id_dtype`` is int64 by default (what ``torch.gather`` wants); int32 halves the
        memory traffic of large reads.

        Raises:
            PositionError: the range is reversed or outside ``[0, len(store)]``.
            IncompleteStoreError: (incomplete stores only) the range touches uncommitted shards.
            CorruptStoreError: a checksum failed or decoded ids fall outside the vocabulary.

        Example:
            >>> b = logitstore.open("s.zarr").read(0, 4096)
            >>> b.probs.shape          # (4096, k)
        """
        return decode_rows(self.metadata, self.read_stored(start, stop), id_dtype)

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens ``(n,)`` int64 and loss mask ``(n,)`` bool of positions ``[start, stop)``,
        without the teacher's rows. Raises: as :meth:`read`."""
        b = self.read(start, stop)
        assert b.loss_mask is not None
        return b.input_ids, b.loss_mask

    def loss_mask_positions(self) -> int | None:
        """How many positions count for training (``None`` for stores without a mask)."""
        if not self.metadata.has_loss_mask:
            return None
        step = 1 << 22
        return sum(
            int(self.read_tokens(a, min(a + step, len(self)))[1].sum())
            for a in range(0, len(self), step)
        )

    def sequence(self, index: int) -> Batch:
        """Decode all positions of sequence ``index`` (one teacher context)."""
        if not 0 <= index < self.num_sequences:
            raise PositionError(
                f"sequence {index} is out of range: the store has {self.num_sequences} sequences"
            )
        return self.read(int(self.offsets[index]), int(self.offsets[index + 1]))

    def sequence_of(self, position: int) -> int:
        """Index of the sequence that holds ``position``."""
        if not 0 <= position < len(self):
            raise PositionError(f"position {position} is outside [0, {len(self)})")
        return int(np.searchsorted(self.offsets, position, side="right") - 1)


class LogitStore(StoreBase):
    """A store opened for reading. Use :func:`open`.

    Attributes:
        metadata: the store's :class:`StoreMetadata`.
        offsets: ``(num_sequences + 1,)`` int64 sequence boundaries.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self._group = open_group(self.path)
        self.metadata: StoreMetadata = read_metadata(self._group)
        md = self.metadata
        self._committed: np.ndarray | None = None
        if md.state != "complete":
            commits = self.committed()
            if not allow_incomplete:
                raise IncompleteStoreError(
                    f"{str(self.path)!r} is not complete: {int(commits.sum())} of "
                    f"{md.num_shards} shards are committed. Its writer is still running or was "
                    "interrupted: rerun the same `logitstore write` command to resume it, or "
                    "open with allow_incomplete=True to read the committed shards"
                )
            self._committed = commits
        names = (INPUT_IDS, IDS, VALUES, RESIDUAL) + ((LOSS_MASK,) if md.has_loss_mask else ())
        found = {n: maybe_array(self._group, n) for n in names}
        self._arrays = {name: arr for name, arr in found.items() if arr is not None}
        self._check_arrays()
        self.offsets: np.ndarray = read_all(self._group, OFFSETS).astype(np.int64)
        if len(self.offsets) != md.num_sequences + 1 or self.offsets[-1] != md.num_positions:
            raise CorruptStoreError(
                f"offsets array has {len(self.offsets)} entries ending at "
                f"{int(self.offsets[-1]) if len(self.offsets) else None}; expected "
                f"{md.num_sequences + 1} ending at {md.num_positions}"
            )
        self._present: set[int] = set()  # shards whose files were seen

    def committed(self) -> np.ndarray:
        """``(num_shards,)`` bool: which shards are committed (all, once complete)."""
        if self.metadata.state == "complete":
            return np.ones(self.metadata.num_shards, dtype=bool)
        return read_all(self._group, COMMITS).astype(bool)

    def _check_arrays(self) -> None:
        md, lay = self.metadata, self.metadata.layout
        n, kind = md.num_positions, md.encoding.kind
        expected: dict[str, tuple[tuple[int, ...], str]] = {INPUT_IDS: ((n,), lay.id_dtype)}
        if kind != "none":
            expected[VALUES] = ((n, lay.width), lay.value_dtype)
        if kind not in ("full", "none"):
            expected[IDS] = ((n, lay.width), lay.id_dtype)
        if kind == "topk":
            expected[RESIDUAL] = ((n,), "float32")
        if md.has_loss_mask:
            expected[LOSS_MASK] = ((n,), "uint8")
        for name, (shape, dtype) in expected.items():
            arr = self._arrays.get(name)
            if arr is None:
                raise FormatError(f"store {str(self.path)!r} lacks the required array {name!r}")
            if tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(dtype):
                raise FormatError(
                    f"array {name!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}; the "
                    f"metadata requires shape {shape} and dtype {dtype}"
                )

    # -- sizes -----------------------------------------------------------------------------

    def nbytes_stored(self) -> int:
        """Bytes the store occupies on disk (all files)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # -- reading ---------------------------------------------------------------------------

    def read_stored(self, start: int, stop: int) -> StoredRows:
        """Positions ``[start, stop)`` exactly as stored, before decoding (FORMAT.md §5).

        Raises: as :meth:`read`.
        """
        start, stop, got = self._read_arrays(start, stop, tuple(self._arrays))
        values = got.get(VALUES)
        if values is None:  # tokens only (FORMAT.md §5.7)
            values = np.zeros((stop - start, 0), dtype=self.metadata.layout.value_dtype)
        return StoredRows(
            got[INPUT_IDS], got.get(IDS), values, got.get(RESIDUAL), got.get(LOSS_MASK)
        )

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # Only the two small arrays: export and info need no teacher rows.
        names = (INPUT_IDS, LOSS_MASK) if LOSS_MASK in self._arrays else (INPUT_IDS,)
        start, stop, got = self._read_arrays(start, stop, names)
        mask = got.get(LOSS_MASK)
        return (
            got[INPUT_IDS].astype(np.int64),
            np.ones(stop - start, dtype=bool) if mask is None else mask.astype(bool),
        )

    def _read_arrays(
        self, start: int, stop: int, names: tuple[str, ...]
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        """Checked range, and arrays ``names`` at positions ``[start, stop)`` as stored."""
        start, stop = _check_range(start, stop, len(self))
        if self._committed is not None:
            self._check_committed(start, stop)
        if stop > start:
            self._check_present(start, stop)
        try:
            return start, stop, {n: np.asarray(self._arrays[n][start:stop]) for n in names}
        except Exception as e:  # zarr raises its own types on checksum or decode failures
            shard = start // self.metadata.layout.shard_positions
            raise CorruptStoreError(
                f"reading positions [{start}, {stop}) of {str(self.path)!r} failed (shard "
                f"{shard} or later): {e}; run `logitstore verify` to locate the damage"
            ) from None

    def tokenizer(self) -> tokenizers.Tokenizer | None:
        """The teacher's tokenizer, if the writer stored it (``None`` otherwise)."""
        if maybe_array(self._group, TOKENIZER) is None:
            return None
        import tokenizers

        raw = read_all(self._group, TOKENIZER).tobytes()
        try:
            return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise CorruptStoreError(f"the stored tokenizer is unreadable: {e}") from None

    def _check_present(self, start: int, stop: int) -> None:
        # zarr reads a missing shard file as zeros; a store never lacks one (FORMAT.md §4), so
        # a missing file is damage. Each shard is checked once per open store.
        sp = self.metadata.layout.shard_positions
        for s in range(start // sp, (stop - 1) // sp + 1):
            if s in self._present:
                continue
            for name, arr in self._arrays.items():
                if not shard_file(self.path, name, arr.ndim, s).is_file():
                    s0, s1 = self.metadata.shard_range(s)
                    raise CorruptStoreError(
                        f"shard {s} (positions {s0}-{s1 - 1}) of array {name!r} is missing "
                        f"from {str(self.path)!r}; run `logitstore verify`"
                    )
            self._present.add(s)

    def _check_committed(self, start: int, stop: int) -> None:
        assert self._committed is not None
        sp = self.metadata.layout.shard_positions
        first, last = start // sp, max(start, stop - 1) // sp
        missing = np.flatnonzero(~self._committed[first : last + 1])
        if stop > start and len(missing):
            raise IncompleteStoreError(
                f"positions [{start}, {stop}) touch shard {first + int(missing[0])}, which is not "
                "committed yet"
            )


def _check_range(start: int, stop: int, size: int) -> tuple[int, int]:
    try:
        start, stop = int(start), int(stop)
    except (TypeError, ValueError):
        raise PositionError(f"positions must be integers, got {start!r} and {stop!r}") from None
    if not 0 <= start <= stop <= size:
        raise PositionError(
            f"range [{start}, {stop}) is not within the store's positions [0, {size}); "
            "expected 0 <= start <= stop <= len(store)"
        )
    return start, stop


def open(
    path: str | os.PathLike[str], *, allow_incomplete: bool = False, token: str | None = None
) -> StoreBase:
    """Open the store at ``path`` — a directory, or an ``http(s)://`` URL that
    ``logitstore serve`` printed — for reading.

    Raises:
        StoreNotFoundError: no store at ``path``.
        UnsupportedVersionError: written in a format version this reader does not know.
        IncompleteStoreError: the writer has not finished (unless ``allow_incomplete``).

    Example:
        >>> store = logitstore.open("teacher.zarr")   # or "http://host:8000/v1/stores/teacher"
        >>> len(store), store.offsets[:3]
    """
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        from .remote import RemoteStore

        return RemoteStore(path, token=token)
    return LogitStore(path, allow_incomplete=allow_incomplete)
