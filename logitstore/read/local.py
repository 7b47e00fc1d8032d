"""A store opened for reading — a local directory or an object-storage URL
(``s3://bucket/prefix/store.zarr``): random access by position range, checked against its
metadata.

A local store in the layout FORMAT.md §4 describes is read straight from its shards
(format/shards.py, format/direct.py: the same bytes and checksums as zarr's reader, without
its per-chunk machinery), and its teacher rows decoded one inner chunk at a time; any other
local layout, object storage, and any store while ``LOGITSTORE_LOCAL_READER=zarr`` is set,
through zarr.

From object storage every array of a read is fetched at once (zarr turns each into parallel
ranged GETs of the chunks it needs), and a read that continues the previous one starts the
next range of the same length in the background (read-ahead for scans: export, verify,
copy, sequential training).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import CorruptStoreError, IncompleteStoreError, LogitStoreError
from ..format.codec import Batch
from ..format.direct import Alloc, read_decoded
from ..format.fused import check_decoder
from ..format.metadata import StoreMetadata
from ..format.schema import (
    COMMITS,
    INPUT_IDS,
    LOSS_MASK,
    OFFSETS,
    TOKENIZER,
    StoredRows,
    columns,
    rows_from_columns,
)
from ..format.shards import ChunkColumn, chunk_layout, read_columns
from ..format.storage import (
    StorePath,
    location,
    maybe_array,
    nbytes_stored,
    open_group,
    read_all,
    read_metadata,
    read_shard_tail,
    shard_file,
    shard_present,
    store_path,
)
from ..format.validate import check_arrays, check_shard_index, inner_chunks, read_offsets
from .store import StoreBase, check_range

if TYPE_CHECKING:
    import tokenizers

__all__ = ["LOCAL_READER_ENV", "LogitStore", "local_reader"]

_T = TypeVar("_T")

#: ``shards`` (default: a local store's shards read and decoded directly) or ``zarr`` (zarr's
#: own reader, as local stores were read until 2026-12: a cross-check, and the baseline
#: benchmarks/bench_http.py serves the row stream from, as it was when issue 15 was filed)
LOCAL_READER_ENV = "LOGITSTORE_LOCAL_READER"


def local_reader() -> str:
    """How local stores are read: ``LOGITSTORE_LOCAL_READER``, ``shards`` when unset.

    Raises:
        LogitStoreError: the setting is neither ``shards`` nor ``zarr``.
    """
    value = os.environ.get(LOCAL_READER_ENV, "shards") or "shards"
    if value not in ("shards", "zarr"):
        raise LogitStoreError(
            f"{LOCAL_READER_ENV} is {value!r}; expected 'shards' (the default) or 'zarr', or "
            "leave it unset"
        )
    return value


class LogitStore(StoreBase):
    """A store opened for reading, in a directory or object storage. Use :func:`open`.

    Attributes:
        metadata: the store's :class:`StoreMetadata`.
        offsets: ``(num_sequences + 1,)`` int64 sequence boundaries.
        path: the directory (a :class:`Path`) or the normalised URL (a ``str``).
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> None:
        reader = local_reader()  # a bad setting is refused before anything is read
        check_decoder()
        self.path: StorePath = store_path(path)
        self._remote = location(self.path) is not None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._ahead: tuple[int, int, tuple[str, ...], Future[dict[str, np.ndarray]]] | None = None
        self._last_stop = -1
        self._group = open_group(self.path)
        self.metadata: StoreMetadata = read_metadata(self._group)
        md = self.metadata
        # Every array's own metadata is checked against the store's before anything is read
        # or sized by it (FORMAT.md §4); the offsets are checked as they are read.
        checked = check_arrays(md, lambda name: maybe_array(self._group, name))
        self._arrays: dict[str, Any] = {c.name: checked[c.name] for c in columns(md)}
        self._commits = checked[COMMITS]
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
        self.offsets: np.ndarray = read_offsets(checked[OFFSETS], md, str(self.path))
        self._present: set[int] = set()  # shards whose files were seen
        # The shards read directly, or through zarr (None: object storage, another layout,
        # or zarr asked for).
        self._layout: list[ChunkColumn] | None = (
            None if self._remote or reader == "zarr" else chunk_layout(Path(self.path), md)
        )

    def committed(self) -> np.ndarray:
        """``(num_shards,)`` bool: which shards are committed (all, once complete)."""
        if self.metadata.state == "complete":
            return np.ones(self.metadata.num_shards, dtype=bool)
        return self.commit_records().astype(bool)

    def commit_records(self) -> np.ndarray:
        """``(num_shards,)`` uint8: the commit records as stored (1 = committed), whatever
        the store's state says (``verify`` checks that they agree).

        Raises:
            CorruptStoreError: the commits array is damaged.
        """
        return read_all(self._group, COMMITS)

    def shard_file(self, name: str, shard: int) -> Path:
        """The file that holds ``shard`` of per-position array ``name`` (local stores)."""
        return shard_file(Path(self.path), name, self._arrays[name].ndim, shard)

    def shard_present(self, name: str, shard: int) -> bool:
        """Whether the file or object of ``shard`` of array ``name`` exists."""
        return shard_present(self.path, name, self._arrays[name].ndim, shard)

    def read_columns(
        self, start: int, stop: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Per-position arrays ``names`` (default: all of the store's) at ``[start, stop)``,
        as stored, in the order asked for.

        Raises:
            ValueError: the store has no array of one of the ``names``.
            others: as :meth:`read`.
        """
        if names is None:
            names = tuple(self._arrays)
        unknown = [n for n in names if n not in self._arrays]
        if unknown:
            raise ValueError(
                f"{str(self.path)!r} has no per-position array {unknown[0]!r}; it has "
                f"{', '.join(self._arrays)}"
            )
        got = self._read_arrays(start, stop, names)[2]
        return {n: got[n] for n in names}

    # -- sizes -----------------------------------------------------------------------------

    def nbytes_stored(self) -> int:
        """Bytes the store occupies (all its files, or all objects under its prefix)."""
        return nbytes_stored(self.path)

    # -- reading ---------------------------------------------------------------------------

    def read_stored(self, start: int, stop: int) -> StoredRows:
        """Positions ``[start, stop)`` exactly as stored, before decoding (FORMAT.md §5).

        Raises: as :meth:`read`.
        """
        start, stop, got = self._read_arrays(start, stop, tuple(self._arrays))
        return rows_from_columns(self.metadata, got, stop - start)

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # Only the two small arrays: export and info need no teacher rows.
        names = (INPUT_IDS, LOSS_MASK) if LOSS_MASK in self._arrays else (INPUT_IDS,)
        start, stop, got = self._read_arrays(start, stop, names)
        mask = got.get(LOSS_MASK)
        return (
            got[INPUT_IDS].astype(np.int64),
            np.ones(stop - start, dtype=bool) if mask is None else mask.astype(bool),
        )

    def _checked(self, start: int, stop: int) -> tuple[int, int]:
        """The range, checked: inside the store, its shards committed and present."""
        start, stop = check_range(start, stop, len(self))
        if self._committed is not None:
            self._check_committed(start, stop)
        if stop > start:
            self._check_present(start, stop)
        return start, stop

    def _decode(self, start: int, stop: int, id_dtype: type, alloc: Alloc) -> Batch:
        if self._layout is None:
            return super()._decode(start, stop, id_dtype, alloc)
        start, stop = self._checked(start, stop)
        root, md, layout = Path(self.path), self.metadata, self._layout
        return self._direct(lambda: read_decoded(root, md, layout, start, stop, id_dtype, alloc))

    def _read_arrays(
        self, start: int, stop: int, names: tuple[str, ...]
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        """Checked range, and arrays ``names`` at positions ``[start, stop)`` as stored."""
        start, stop = self._checked(start, stop)
        if self._layout is not None:
            root, md, layout = Path(self.path), self.metadata, self._layout
            return (
                start,
                stop,
                self._direct(lambda: read_columns(root, md, layout, start, stop, names)),
            )
        if not self._remote:
            return start, stop, {name: self._read_one(name, start, stop) for name in names}
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:3] == (start, stop, names):
            got = ahead[3].result()
        else:
            got = self._read_parallel(start, stop, names)
        if start == self._last_stop and stop < len(self) and stop > start:
            nxt = min(stop + (stop - start), len(self))
            if self._committed is None or self._committed_between(stop, nxt):
                job = self._executor().submit(self._read_parallel, stop, nxt, names)
                self._ahead = (stop, nxt, names, job)
        self._last_stop = stop
        return start, stop, got

    def _direct(self, read: Callable[[], _T]) -> _T:
        """``read()`` of the shards on disk; an operating-system failure (a file made
        unreadable, an I/O error) as the store's, naming it."""
        try:
            return read()
        except OSError as e:
            raise CorruptStoreError(
                f"reading {str(self.path)!r} failed: {e}; run `logitstore verify` to locate "
                "the damage"
            ) from None

    def _read_one(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self._arrays[name][start:stop])
        except LogitStoreError:  # object storage failed (it names the bucket and key)
            raise
        except Exception as e:  # zarr raises its own types on checksum or decode failures
            shard = start // self.metadata.layout.shard_positions
            raise CorruptStoreError(
                f"reading array {name!r} at positions [{start}, {stop}) of "
                f"{str(self.path)!r} failed (shard {shard} or later): {e}; run "
                "`logitstore verify` to locate the damage"
            ) from None

    def _read_parallel(
        self, start: int, stop: int, names: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        jobs = {n: self._executor().submit(self._read_one, n, start, stop) for n in names}
        return {n: job.result() for n, job in jobs.items()}

    def _executor(self) -> ThreadPoolExecutor:
        # A DataLoader worker forked from a process that read has the pool object but not
        # its threads: each process makes its own.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="logitstore-read")
            self._pool_pid = os.getpid()
        return self._pool

    def _committed_between(self, start: int, stop: int) -> bool:
        assert self._committed is not None
        sp = self.metadata.layout.shard_positions
        return bool(self._committed[start // sp : (stop - 1) // sp + 1].all())

    def close(self) -> None:
        """Stop the read-ahead threads of an object-storage store (reads restart them)."""
        self._ahead = None
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=0, _ahead=None)
        return state

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
        # zarr reads a missing shard file, or an inner chunk its index marks as not stored,
        # as zeros; a store never lacks one (FORMAT.md §4), so either is damage. A complete
        # store's commit record must say so too. Each shard is checked once per open store.
        sp = self.metadata.layout.shard_positions
        for s in range(start // sp, (stop - 1) // sp + 1):
            if s in self._present:
                continue
            s0, s1 = self.metadata.shard_range(s)
            where = f"shard {s} (positions {s0}-{s1 - 1})"
            for name, arr in self._arrays.items():
                self._check_shard_file(name, arr.ndim, s, f"{where} of array {name!r}")
            if self._committed is None and self._commit_record(s) != 1:
                raise CorruptStoreError(
                    f"{where} of {str(self.path)!r} has no commit record, yet the store says it "
                    "is complete; run `logitstore verify`"
                )
            self._present.add(s)

    def _check_shard_file(self, name: str, ndim: int, shard: int, where: str) -> None:
        col = next(c for c in columns(self.metadata) if c.name == name)
        per, used = inner_chunks(col, self.metadata, shard)
        want = 16 * per + 4
        try:
            tail, size = read_shard_tail(self.path, name, ndim, shard, want)
        except LogitStoreError:  # object storage failed (it names the bucket and key)
            raise
        except FileNotFoundError:
            raise CorruptStoreError(
                f"{where} is missing from {str(self.path)!r}; run `logitstore verify`"
            ) from None
        except OSError as e:
            raise CorruptStoreError(f"{where} of {str(self.path)!r} is unreadable: {e}") from None
        check_shard_index(tail, size, per, used, f"{where} of {str(self.path)!r}")

    def _commit_record(self, shard: int) -> int:
        try:
            return int(np.asarray(self._commits[shard : shard + 1])[0])
        except Exception as e:  # zarr raises several types on checksum or decode failures
            raise CorruptStoreError(f"the commit record of shard {shard} is damaged: {e}") from None

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
