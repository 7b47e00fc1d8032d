"""The one interface of a readable store, whatever holds it: :class:`StoreBase`.

A local directory (:class:`logitstore.read.local.LogitStore`) and a store served over HTTP
(:class:`logitstore.read.remote.RemoteStore`) implement the four abstract methods; sizes,
decoding, sequences and tokens come from here, so every store decodes with the same code.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PositionError
from ..format.codec import Batch, decode_rows
from ..format.direct import Alloc
from ..format.metadata import Encoding, StoreMetadata
from ..format.schema import StoredRows

if TYPE_CHECKING:
    import tokenizers

__all__ = ["StoreBase", "check_range"]


class StoreBase(abc.ABC):
    """What every store reader offers, local or remote: sizes, decoding, sequences.

    Implementations set ``metadata``, ``offsets`` and ``path`` and provide
    :meth:`read_stored`, :meth:`tokenizer`, :meth:`committed` and :meth:`nbytes_stored`.

    Attributes:
        metadata: the store's :class:`StoreMetadata` (FORMAT.md §3).
        offsets: ``(num_sequences + 1,)`` int64 sequence boundaries.
        path: what :func:`logitstore.open` takes to open the store again (a directory or URL).
    """

    metadata: StoreMetadata
    offsets: np.ndarray
    path: Any

    @abc.abstractmethod
    def read_stored(self, start: int, stop: int) -> StoredRows:
        """Positions ``[start, stop)`` exactly as stored, before decoding (FORMAT.md §5).

        Raises: as :meth:`read`.
        """

    @abc.abstractmethod
    def tokenizer(self) -> tokenizers.Tokenizer | None:
        """The teacher's tokenizer, if the writer stored it (``None`` otherwise)."""

    @abc.abstractmethod
    def committed(self) -> np.ndarray:
        """``(num_shards,)`` bool: which shards are committed (all, once complete)."""

    @abc.abstractmethod
    def nbytes_stored(self) -> int:
        """Bytes the store occupies where it is kept."""

    def close(self) -> None:  # noqa: B027  (optional: most stores hold nothing to release)
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

    def read(
        self, start: int, stop: int, *, id_dtype: type = np.int64, alloc: Alloc = np.empty
    ) -> Batch:
        """Decode positions ``[start, stop)``.

        ``id_dtype`` is int64 by default (what ``torch.gather`` wants); int32 halves the
        memory traffic of large reads. ``alloc(shape, dtype)`` gives the memory the ids and
        probabilities are decoded into (default ``np.empty``; e.g. buffers the caller reuses,
        or page-locked memory for copies to a GPU).

        Raises:
            PositionError: the range is reversed or outside ``[0, len(store)]``.
            IncompleteStoreError: (incomplete stores only) the range touches uncommitted shards.
            CorruptStoreError: a checksum failed or decoded ids fall outside the vocabulary.
            LogitStoreError: decoded ids do not fit ``id_dtype`` (int32 past 2³¹).

        Example:
            >>> b = logitstore.open("s.zarr").read(0, 4096)
            >>> b.probs.shape          # (4096, k)
        """
        return self._decode(start, stop, id_dtype, alloc)

    def _decode(self, start: int, stop: int, id_dtype: type, alloc: Alloc) -> Batch:
        """:meth:`read`'s work: the stored rows, then the one decoder (a store that can
        decode its rows as it reads them overrides this, to the same bits)."""
        return decode_rows(self.metadata, self.read_stored(start, stop), id_dtype, alloc)

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens ``(n,)`` int64 and loss mask ``(n,)`` bool of positions ``[start, stop)``,
        without the teacher's rows. Raises: as :meth:`read`."""
        rows = self.read_stored(start, stop)
        mask = rows.loss_mask
        return (
            rows.input_ids.astype(np.int64),
            np.ones(len(rows.input_ids), dtype=bool) if mask is None else mask.astype(bool),
        )

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


def check_range(start: int, stop: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` as ints, checked to lie within a store of ``size`` positions.

    Raises:
        PositionError: not integers, reversed, or outside ``[0, size]``.
    """
    try:
        start, stop = int(start), int(stop)
    except (TypeError, ValueError, OverflowError):
        raise PositionError(f"positions must be integers, got {start!r} and {stop!r}") from None
    if not 0 <= start <= stop <= size:
        raise PositionError(
            f"range [{start}, {stop}) is not within the store's positions [0, {size}); "
            "expected 0 <= start <= stop <= len(store)"
        )
    return start, stop
