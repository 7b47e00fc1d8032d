"""Which per-position arrays a store has: the one table every part reads.

A store's per-position columns follow from its metadata alone (docs/FORMAT.md §4): the
tokens, the teacher's candidates and values as its encoding needs them, and the optional
loss mask. The writer creates exactly these arrays, the reader opens and checks them, the
stream (PROTOCOL.md §2) carries them in this order, and ``verify`` reads them. Adding an
encoding means a row in :data:`TEACHER_COLUMNS` and its decoding in :mod:`.codec`.

Example:
    >>> [c.name for c in columns(store.metadata)]
    ['input_ids', 'ids', 'values', 'residual']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .metadata import EncodingKind, StoreMetadata

__all__ = [
    "COLUMN_ORDER",
    "COMMITS",
    "IDS",
    "INPUT_IDS",
    "LOSS_MASK",
    "OFFSETS",
    "RESIDUAL",
    "TEACHER_COLUMNS",
    "TOKENIZER",
    "VALUES",
    "Column",
    "StoredRows",
    "column",
    "columns",
    "empty_rows",
    "rows_from_columns",
]

INPUT_IDS, IDS, VALUES, RESIDUAL, LOSS_MASK = "input_ids", "ids", "values", "residual", "loss_mask"
#: Arrays that are not per position: sequence boundaries, commit records, the tokenizer.
OFFSETS, COMMITS, TOKENIZER = "offsets", "commits", "tokenizer"

#: The order of the per-position columns: in :class:`StoredRows` and on the wire.
COLUMN_ORDER: tuple[str, ...] = (INPUT_IDS, IDS, VALUES, RESIDUAL, LOSS_MASK)

#: The teacher's columns of each encoding kind (FORMAT.md §5). ``ids`` holds the candidate
#: ids as gaps, ``values`` their probabilities, ``residual`` the mass outside them.
TEACHER_COLUMNS: dict[EncodingKind, tuple[str, ...]] = {
    "topk": (IDS, VALUES, RESIDUAL),
    "sampled": (IDS, VALUES),
    "full": (VALUES,),
    "none": (),
}


@dataclass(frozen=True)
class Column:
    """One per-position array: ``(n,)`` when ``width`` is None, else ``(n, width)``."""

    name: str
    dtype: str
    width: int | None
    #: positions per compressed chunk (the layout's chunk size for 2-D arrays)
    chunk_positions: int

    @property
    def ndim(self) -> int:
        return 1 if self.width is None else 2

    @property
    def row_nbytes(self) -> int:
        """Bytes one position takes before compression."""
        return np.dtype(self.dtype).itemsize * (1 if self.width is None else self.width)

    @property
    def stored_dtype(self) -> np.dtype[Any]:
        """The dtype in the byte order the chunks and the streams hold (little-endian)."""
        return np.dtype(self.dtype).newbyteorder("<")

    def shape(self, n: int) -> tuple[int, ...]:
        return (n,) if self.width is None else (n, self.width)

    def empty(self, n: int = 0) -> np.ndarray:
        return np.zeros(self.shape(n), dtype=self.dtype)


def columns(md: StoreMetadata) -> tuple[Column, ...]:
    """The per-position arrays of a store with metadata ``md``, in :data:`COLUMN_ORDER`."""
    lay = md.layout
    dtypes = {
        INPUT_IDS: lay.id_dtype,
        IDS: lay.id_dtype,
        VALUES: lay.value_dtype,
        RESIDUAL: "float32",
        LOSS_MASK: "uint8",
    }
    present = {INPUT_IDS, *TEACHER_COLUMNS[md.encoding.kind]}
    if md.has_loss_mask:
        present.add(LOSS_MASK)
    out = []
    for name in COLUMN_ORDER:
        if name in present:
            two_d = name in (IDS, VALUES)
            out.append(
                Column(
                    name,
                    dtypes[name],
                    lay.width if two_d else None,
                    lay.chunk_positions if two_d else lay.vector_chunk_positions,
                )
            )
    return tuple(out)


def column(md: StoreMetadata, name: str) -> Column | None:
    """The column ``name`` of the store, or ``None`` if its encoding has none."""
    return next((c for c in columns(md) if c.name == name), None)


class StoredRows(NamedTuple):
    """Rows exactly as stored (FORMAT.md §4–5), one field per :data:`COLUMN_ORDER` entry:
    what a reader decodes, what the HTTP server sends. A column the store lacks is ``None``,
    except ``values``, which has no columns for ``none``."""

    input_ids: np.ndarray  # (n,) id_dtype
    gaps: np.ndarray | None  # (n, m) id_dtype
    values: np.ndarray  # (n, m) value_dtype
    residual: np.ndarray | None  # (n,) float32
    loss_mask: np.ndarray | None = None  # (n,) uint8


def rows_from_columns(md: StoreMetadata, arrays: dict[str, np.ndarray], n: int) -> StoredRows:
    """:class:`StoredRows` of ``n`` positions from arrays keyed by column name."""
    values = arrays.get(VALUES)
    if values is None:  # tokens only (FORMAT.md §5.7): no teacher columns
        values = np.zeros((n, 0), dtype=md.layout.value_dtype)
    return StoredRows(
        arrays[INPUT_IDS], arrays.get(IDS), values, arrays.get(RESIDUAL), arrays.get(LOSS_MASK)
    )


def empty_rows(md: StoreMetadata) -> StoredRows:
    """Zero positions of a store with metadata ``md``."""
    return rows_from_columns(md, {c.name: c.empty() for c in columns(md)}, 0)
