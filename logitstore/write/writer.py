"""Writing a store: create or resume, accept encoded rows in position order, and write and
commit whole shards off the caller's thread.

Commit protocol (docs/FORMAT.md §6): a shard's arrays are written whole (each file lands by
write-temp-then-rename), then its commit record; the group is marked ``complete`` only when
every shard is committed. A writer killed at any moment leaves a store whose committed
shards are intact; the same call resumes at the first uncommitted shard and, because
encoding is deterministic, finishes with the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr

from .. import __version__
from ..errors import (
    IncompleteStoreError,
    LogitStoreError,
    ResumeMismatchError,
    StoreExistsError,
    TeacherError,
)
from ..format.metadata import (
    LOSS_MASK_EXTENSION,
    TOKENS_ONLY_EXTENSION,
    Encoding,
    Layout,
    StoreMetadata,
)
from ..format.schema import COMMITS, IDS, RESIDUAL, TEACHER_COLUMNS, VALUES
from ..format.storage import (
    StorePath,
    array,
    codecs_version,
    create_store,
    open_group,
    read_all,
    remove_shard,
    shard_key,
    store_path,
    write_metadata,
)
from .checks import check_loss_mask, check_sequences, check_target
from .durable import local_key, sync_file, sync_tree
from .encode import EncodedRows
from .lease import check_lease

__all__ = ["StoreWriter"]

_STOP = object()


def _identity(
    settings: dict[str, Any],
    input_ids: np.ndarray,
    offsets: np.ndarray,
    loss_mask: np.ndarray | None,
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    # In blocks: the digest of the concatenation, without a whole int64 copy of the inputs.
    step = 1 << 20
    for s in range(0, len(input_ids), step):
        h.update(np.ascontiguousarray(input_ids[s : s + step], dtype="<i8").data)
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    if loss_mask is not None:
        for s in range(0, len(loss_mask), step):
            h.update(np.ascontiguousarray(loss_mask[s : s + step], dtype=np.uint8).data)
    return "sha256:" + h.hexdigest()


def _created_at() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds convention) pins the timestamp for byte-equal stores.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """Device tensor → host array; int16/int32 carry the bits of uint16/uint32 columns."""
    if t is None:
        return None
    a = t.detach().cpu().numpy()
    if a.dtype == np.int16:
        return a.view(np.uint16)
    if a.dtype == np.int32:
        return a.view(np.uint32)
    return a


class StoreWriter:
    """Create (or resume) a store at ``path`` and fill it with encoded rows.

    Rows are handed over in position order with :meth:`write`; full shards are written and
    committed by a background thread, so the caller (a teacher on a GPU) does not wait for
    transfer, compression or I/O. Leaving the ``with`` block normally marks the store
    complete; leaving it with an exception keeps every committed shard for a resume.

    Args:
        path: the store directory.
        encoding: how distributions are reduced (see :class:`Encoding`).
        vocab_size: the teacher's output vocabulary size.
        input_ids: ``(N,)`` the tokens the teacher reads, sequences concatenated.
        offsets: ``(S + 1,)`` sequence boundaries into ``input_ids``.
        seq_len: the maximum sequence length used to split documents (provenance only).
        seed: seeds ``sampled`` draws (with each row's position).
        teacher, tokenizer: provenance dictionaries (name, revision, vocab hash, ...).
        tokenizer_json: a Hugging Face ``tokenizer.json`` to keep in the store (for ``show``).
        loss_mask: ``(N,)`` 0/1: which positions' predictions count for training (1 where
            the next token is one a student should learn, e.g. a completion's). Stored as
            the ``loss_mask`` array (format 1.1).
        generation: how the text was generated (``logitstore generate``), kept as metadata.
        fsync: force each shard file, then its commit record, then the completed metadata to
            stable storage before the next step (file and directory ``fsync``), so a commit
            survives a power loss, not only a kill (FORMAT.md §6.4). Local stores only.
        overwrite: replace an existing store instead of refusing or resuming.
        attach: join a store another writer of the same job created (a torchrun rank other
            than 0): open it, check it is the same store, and neither create nor clean up.
            Such a writer writes only the shards it is given with :meth:`claim`.

    Raises:
        StoreExistsError: a complete store is already at ``path`` (pass ``overwrite``).
        ResumeMismatchError: an interrupted store at ``path`` was written from other inputs
            or settings.

    Example:
        >>> with StoreWriter("s.zarr", encoding=enc, vocab_size=V, input_ids=x, offsets=o) as w:
        ...     w.write(0, encode_rows(logits, enc, 0, positions))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encoding: Encoding,
        vocab_size: int,
        input_ids: np.ndarray,
        offsets: np.ndarray,
        seq_len: int | None = None,
        seed: int = 0,
        teacher: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        tokenizer_json: bytes | None = None,
        chunk_positions: int | None = None,
        shard_positions: int | None = None,
        overwrite: bool = False,
        fsync: bool = True,
        queue_depth: int = 4,
        loss_mask: np.ndarray | None = None,
        generation: dict[str, Any] | None = None,
        attach: bool = False,
    ) -> None:
        encoding.check_vocab(vocab_size)
        self._fsync = fsync
        input_ids = np.asarray(input_ids)
        offsets = np.asarray(offsets, dtype=np.int64)
        check_sequences(input_ids, offsets, vocab_size)
        if loss_mask is not None:
            loss_mask = check_loss_mask(loss_mask, len(input_ids))
        extensions = tuple(
            name
            for name, used in (
                (LOSS_MASK_EXTENSION, loss_mask is not None),
                (TOKENS_ONLY_EXTENSION, encoding.kind == "none"),
            )
            if used
        )
        # The lowest version that describes the store, so older readers read what they can.
        version = "1.1" if extensions or generation is not None else "1.0"
        self.path: StorePath = store_path(path)  # a directory, or an object-storage URL
        layout = Layout.choose(encoding, vocab_size, chunk_positions, shard_positions)
        if codecs_version(encoding, layout) == "1.2":  # an array with a chain new in 1.2
            version = "1.2"
        teacher = dict(teacher or {})
        settings = {
            "format_version": version,
            "encoding": encoding.to_dict(),
            "layout": layout.to_dict(),
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "seed": seed,
            "teacher": teacher,
            "tokenizer": None if tokenizer is None else tokenizer.get("vocab_hash"),
            "tool_version": __version__,
        }
        if generation is not None:
            settings["generation"] = generation
        md = StoreMetadata(
            encoding=encoding,
            layout=layout,
            vocab_size=vocab_size,
            num_positions=len(input_ids),
            num_sequences=len(offsets) - 1,
            seq_len=seq_len,
            seed=seed,
            identity=_identity(settings, input_ids, offsets, loss_mask),
            teacher=teacher,
            tokenizer=tokenizer,
            tool={"name": "logitstore", "version": __version__},
            created_at=_created_at(),
            format_version=version,
            extensions=extensions,
            generation=None if generation is None else dict(generation),
        )
        self.group, self.metadata = self._create_or_resume(
            md, input_ids, offsets, tokenizer_json, overwrite, loss_mask, attach
        )
        if fsync and self.metadata is md:  # just created: its files and its name, durable
            sync_tree(self.path)
        #: a complete store of the same identity was there: nothing is written (a rerun)
        self.already_complete = self.metadata.state == "complete"
        commits = read_all(self.group, COMMITS)
        self._committed = commits.astype(bool)
        self._owns_all = not attach
        self._todo = ~self._committed if self._owns_all else np.zeros_like(self._committed)
        #: the first position a caller still has to supply; rows of other shards are dropped.
        self.resume_position = self._first_todo()
        teacher_columns = TEACHER_COLUMNS[self.metadata.encoding.kind]
        self._arrays: dict[str, zarr.Array[Any]] = {
            name: array(self.group, name, writable=True) for name in teacher_columns
        }
        self._cursor = self.resume_position
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self._commit_queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _first_todo(self) -> int:
        pending = np.flatnonzero(self._todo)
        return (
            self.metadata.shard_range(int(pending[0]))[0]
            if len(pending)
            else self.metadata.num_positions
        )

    @property
    def committed(self) -> np.ndarray:
        """``(num_shards,)`` bool: the shards committed when this writer opened the store."""
        return self._committed.copy()

    @property
    def todo(self) -> np.ndarray:
        """``(num_shards,)`` bool: the shards this writer is to write."""
        return self._todo.copy()

    def claim(self, shards: np.ndarray) -> None:
        """Write only ``shards`` (indices), this writer's share of a job whose writers write
        disjoint sets of whole shards (FORMAT.md §6.5); rows of other shards are dropped.
        Committed shards stay committed. Call before the ``with`` block. Closing such a
        writer checks its own shards; :meth:`mark_complete` finishes the store."""
        if self._threads:
            raise LogitStoreError("StoreWriter.claim() must come before its `with` block")
        mine = np.zeros_like(self._committed)
        mine[np.asarray(shards, dtype=np.int64)] = True
        self._owns_all = bool(mine.all())
        self._todo = mine & ~self._committed
        self.resume_position = self._cursor = self._first_todo()

    # -- creation and resume -------------------------------------------------------------

    def _create_or_resume(
        self,
        md: StoreMetadata,
        input_ids: np.ndarray,
        offsets: np.ndarray,
        tokenizer_json: bytes | None,
        overwrite: bool,
        loss_mask: np.ndarray | None,
        attach: bool = False,
    ) -> tuple[zarr.Group, StoreMetadata]:
        path = self.path
        existing = check_target(path, overwrite and not attach, identity=md.identity)
        if attach and existing is None:
            raise IncompleteStoreError(
                f"{str(path)!r} holds no store being written, though the writer that "
                "creates it said it had; is --out on a file system every rank shares?"
            )
        if existing is not None:
            if existing.identity != md.identity:
                raise ResumeMismatchError(
                    f"{str(path)!r} holds an interrupted store written from other data or "
                    f"settings (identity {existing.identity[:19]}… vs {md.identity[:19]}…); "
                    "rerun the original command to resume it, or pass --overwrite to "
                    "start again"
                )
            if not attach:  # an attached writer's peers may be writing already
                _remove_partials(path)
            return open_group(path, mode="r+"), existing
        # A crash during creation leaves nothing that looks like a store (FORMAT.md §6.6).
        create_store(path, md, input_ids, offsets, tokenizer_json, loss_mask)
        return open_group(path, mode="r+"), md

    # -- the pipeline ----------------------------------------------------------------------

    def __enter__(self) -> StoreWriter:
        self._threads = [
            threading.Thread(target=self._run_fill, name="logitstore-fill", daemon=True),
            threading.Thread(target=self._run_commit, name="logitstore-commit", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(abort=exc_type is not None)

    def write(self, start: int, rows: EncodedRows) -> None:
        """Hand over encoded rows for positions ``[start, start + len(rows))``.

        Calls must come in position order without gaps; rows before
        :attr:`resume_position` are dropped (they are committed already).
        """
        self._raise_if_failed()
        if not self._threads:
            raise LogitStoreError("StoreWriter.write() called outside its `with` block")
        try:
            self._put(self._queue, (start, rows))
        except _Failed:
            self._raise_if_failed()

    def close(self, abort: bool = False) -> None:
        """Flush, commit and (unless ``abort``) mark the store complete."""
        if self._closed:
            return
        self._closed = True
        if self._threads:
            with contextlib.suppress(_Failed):
                self._put(self._queue, _STOP)
            for t in self._threads:
                t.join()
        if abort:
            return
        self._raise_if_failed()
        if self._owns_all:
            self.mark_complete()
            return
        missing = self._todo & ~read_all(self.group, COMMITS).astype(bool)
        if missing.any():
            self._incomplete(missing, "of its own ")

    def mark_complete(self) -> None:
        """Mark the store complete: every shard must be committed (by any writer).

        Raises:
            IncompleteStoreError: a shard is not committed.
        """
        commits = read_all(self.group, COMMITS).astype(bool)
        if not commits.all():
            self._incomplete(~commits, "")
        if self.metadata.state == "complete":  # a finished store rerun: nothing changes
            return
        self.metadata = self.metadata.with_state("complete")
        write_metadata(self.group, self.metadata)
        if self._fsync:
            sync_file(local_key(self.path, "zarr.json"))

    def _incomplete(self, missing: np.ndarray, whose: str) -> None:
        first = int(np.flatnonzero(missing)[0])
        raise IncompleteStoreError(
            f"the writer was closed with {int(missing.sum())} {whose}shard(s) not written "
            f"(first: shard {first}, from position {self.metadata.shard_range(first)[0]}); "
            "every position must be supplied before the store can be complete"
        )

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        """Put without blocking forever: give up once a pipeline thread has failed."""
        while True:
            try:
                q.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._error is not None:
                    raise _Failed from None

    def _fail(self, error: BaseException) -> None:
        if self._error is None:  # the first failure is the cause; later ones are its echoes
            self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, LogitStoreError):
                raise err
            raise LogitStoreError(f"writing {str(self.path)!r} failed: {err!r}") from err

    def _host_rows(self, start: int, rows: EncodedRows) -> dict[str, np.ndarray]:
        """Device→host copy and validation of one batch of encoded rows."""
        bad = _to_numpy(rows.bad)
        if bad is not None and bad.any():
            pos = start + int(np.flatnonzero(bad)[0])
            raise TeacherError(
                f"the teacher's logits at position {pos} are NaN, +inf or all -inf; "
                "check the model's dtype (try float32) and its inputs"
            )
        given = {IDS: rows.gaps, VALUES: rows.values, RESIDUAL: rows.residual}
        host: dict[str, np.ndarray] = {}
        for name, arr in self._arrays.items():
            a = _to_numpy(given[name])
            if a is None or a.dtype != arr.dtype or a.shape[1:] != arr.shape[1:]:
                found = "nothing" if a is None else f"{a.dtype} {a.shape[1:]}"
                raise LogitStoreError(
                    f"encoded rows for {name!r} are {found}, but this store holds "
                    f"{arr.dtype} {tuple(arr.shape[1:])}: encode with the store's encoding "
                    f"({self.metadata.encoding})"
                )
            host[name] = a
        return host

    def _run_fill(self) -> None:
        """Host side: device→host copy, validation, and filling shard buffers in order."""
        md = self.metadata
        buffers: dict[str, np.ndarray] = {}
        shard = -1
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                start, rows = item
                if start > self._cursor and not self._todo_between(self._cursor, start):
                    self._cursor = start  # the rows between belong to no shard of ours
                if start > self._cursor:
                    raise LogitStoreError(
                        f"rows must be written in position order without gaps: expected "
                        f"position {self._cursor}, got {start}"
                    )
                host = self._host_rows(start, rows)
                n = len(host[VALUES])
                lo = self._cursor - start  # rows already committed or already buffered
                while lo < n:
                    pos = start + lo
                    s = pos // md.layout.shard_positions
                    s0, s1 = md.shard_range(s)
                    take = min(n - lo, s1 - pos)
                    if self._todo[s]:
                        if s != shard:
                            shard = s
                            buffers = {
                                name: np.empty((s1 - s0, *arr.shape[1:]), dtype=arr.dtype)
                                for name, arr in self._arrays.items()
                            }
                        for name, buf in buffers.items():
                            buf[pos - s0 : pos - s0 + take] = host[name][lo : lo + take]
                    lo += take
                    self._cursor += take
                    if self._cursor == s1 and shard == s:
                        self._put(self._commit_queue, (s, buffers))
                        shard, buffers = -1, {}
        except _Failed:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            with contextlib.suppress(_Failed):
                self._put(self._commit_queue, _STOP)

    def _todo_between(self, lo: int, hi: int) -> bool:
        """Whether positions ``[lo, hi)`` touch a shard this writer still has to write."""
        sp = self.metadata.layout.shard_positions
        return bool(self._todo[lo // sp : (hi - 1) // sp + 1].any())

    def _run_commit(self) -> None:
        """Writes each full shard (arrays first, commit record last)."""
        commits = array(self.group, COMMITS)
        s, key = -1, ""
        try:
            while True:
                item = self._commit_queue.get()
                if item is _STOP:
                    break
                if self._error is not None:
                    continue
                s, buffers = item
                key = ""
                if isinstance(self.path, str):  # object storage: still this job's store?
                    check_lease(self.path)
                s0, s1 = self.metadata.shard_range(s)
                for name, buf in buffers.items():
                    key = f"{name}/c/{s}"
                    # An uncommitted file from an interrupted run may be damaged, and zarr
                    # reads the old file when it rewrites a shard that is cut short by the end
                    # of the array: remove it first.
                    remove_shard(self.path, name, buf.ndim, s)
                    self._arrays[name][s0:s1] = buf
                    if self._fsync:  # the shard is on disk before its commit record says so
                        sync_file(local_key(self.path, shard_key(name, buf.ndim, s)))
                key = f"{COMMITS}/c/{s}"
                commits[s] = 1
                if self._fsync:
                    sync_file(local_key(self.path, f"{COMMITS}/c/{s}"))
                self._committed[s] = True
        except BaseException as e:
            self._fail(
                LogitStoreError(
                    f"writing shard {s} ({key!r}) of {str(self.path)!r} failed: {e!r}; the "
                    "shards committed before it are kept, so the same command resumes"
                )
                if isinstance(e, OSError) and not isinstance(e, StoreExistsError)
                else e
            )


class _Failed(Exception):
    """A pipeline thread failed; the failure itself is in ``StoreWriter._error``."""


def _remove_partials(path: StorePath) -> None:
    if not isinstance(path, Path):  # an object lands whole in one PUT: no temporary objects
        return
    # Temporary files a killed writer left behind (zarr writes `<key>.<uuid>.partial`, renames).
    for p in path.rglob("*.partial"):
        p.unlink(missing_ok=True)
