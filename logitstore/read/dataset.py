"""``LogitDataset``: a resumable, shardable torch dataset of windows over a store.

Each sample is a window of at most ``seq_len`` consecutive positions of one sequence (a
teacher context), so contexts never mix. At position ``t`` of a window the student's logits
and the teacher's stored distribution both predict token ``t + 1``; ``labels[t]`` is that token
(-100 where the sequence ends, and where the store's loss mask excludes the position: the
prompt of a generated store). Windows are read in large blocks: the epoch's order permutes
blocks, then shuffles windows within groups of ``buffer_blocks`` blocks, so each block is read
and decoded once per epoch while the order stays well mixed.

The order is a pure function of (seed, epoch, rank, world size, worker, num workers), which
is what makes ``state_dict()``/``load_state_dict()`` exact: a resumed run recomputes the order
and skips what was already yielded.

A student whose vocabulary is smaller than the teacher's output layer (a teacher head padded
past its tokenizer: Qwen 2.5 7B predicts 152,064 ids, its 0.5B sibling 151,936) cannot score
the teacher's candidates at the ids it lacks; the losses refuse such targets. With
``student_vocab_size`` the dataset folds their mass into the residual as each block is
decoded (:func:`fold_to_vocab`), so every loss sees targets the student can score, with the
teacher's mass accounted for exactly.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import LogitStoreError
from ..format.codec import Batch
from ..format.direct import Alloc
from ..format.fused import warm
from ..format.provenance import tokenizer_identity
from . import open as open_store
from .blocks import Block, BlockReader, block_of
from .buffers import BufferPool
from .collate import collate, fold_to_vocab
from .store import StoreBase

__all__ = ["LogitDataset", "collate", "fold_to_vocab"]  # the last two: collate.py


class LogitDataset(IterableDataset[dict[str, torch.Tensor]]):
    """Windows of a store as training samples, for a torch ``DataLoader``.

    Args:
        source: a store path or ``http(s)://`` URL (or an open store).
        seq_len: positions per window (>= 2); longer sequences are cut into several windows.
        shuffle: deterministic block shuffle from ``seed`` and the epoch (``set_epoch``).
        seed: the shuffle seed; every rank must use the same one.
        rank, world_size: this process's place among data-parallel ranks (default: read
            from ``torch.distributed`` when initialised, else 0 and 1). Every rank yields the
            same number of samples (windows are repeated to fill the last ranks), so no rank
            waits forever at the end of an epoch.
        block_positions: positions read and decoded at once.
        buffer_blocks: blocks whose windows are shuffled together.
        tokenizer, tokenizer_hash: the student's tokenizer (or its vocabulary hash,
            ``"sha256:…"``, FORMAT.md §3); a store of another tokenizer is refused unless
            ``allow_tokenizer_mismatch``.
        student_vocab_size: the width of the student's logits, when it is smaller than the
            teacher's (``metadata.vocab_size``): the teacher's mass on ids the student lacks
            is folded into the residual (:func:`fold_to_vocab`), so every sample's ids are
            below it and probabilities plus residual still sum to 1. The student then learns
            to put that mass on its tail bucket (with a ``full`` store, which has no tail, it
            is a constant term of the forward KL). Without it, a loss given student logits
            narrower than the stored ids refuses them. A sample whose input tokens reach it
            raises: those the student cannot read.

    Raises:
        LogitStoreError: ``seq_len`` < 2, ``student_vocab_size`` < 1, an empty store, or a
            tokenizer mismatch; while iterating, input tokens at or above
            ``student_vocab_size``.

    Example:
        >>> ds = LogitDataset("teacher.zarr", seq_len=512, seed=0)
        >>> loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate)
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | StoreBase,
        seq_len: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        block_positions: int = 1 << 16,
        buffer_blocks: int = 4,
        tokenizer_hash: str | None = None,
        tokenizer: Any = None,
        allow_tokenizer_mismatch: bool = False,
        student_vocab_size: int | None = None,
    ) -> None:
        if seq_len < 2:
            raise LogitStoreError(f"seq_len must be at least 2, got {seq_len}")
        if student_vocab_size is not None and student_vocab_size < 1:
            raise LogitStoreError(f"student_vocab_size must be positive, got {student_vocab_size}")
        store = source if isinstance(source, StoreBase) else open_store(source)
        self.path = store.path  # a directory or a URL: reopened in every worker process
        self.metadata = store.metadata
        if len(store) == 0:
            raise LogitStoreError(f"store {str(self.path)!r} has no positions")
        if tokenizer is not None:  # the student's tokenizer: compare its vocabulary hash
            tokenizer_hash = tokenizer_identity(tokenizer)[0]["vocab_hash"]
        stored_hash = (store.metadata.tokenizer or {}).get("vocab_hash")
        mismatch = tokenizer_hash is not None and stored_hash != tokenizer_hash
        if mismatch and not allow_tokenizer_mismatch:
            raise LogitStoreError(
                f"the store's teacher tokenizer ({stored_hash}) differs from the student's "
                f"({tokenizer_hash}): token ids would not mean the same thing. Use a "
                "student with the teacher's tokenizer, or pass allow_tokenizer_mismatch=True"
            )
        if rank is None or world_size is None:
            dist = torch.distributed
            active = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if active else 0)
            world_size = (
                world_size if world_size is not None else (dist.get_world_size() if active else 1)
            )
        if not 0 <= rank < world_size:
            raise LogitStoreError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.shuffle, self.seed = seq_len, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.block_positions, self.buffer_blocks = block_positions, buffer_blocks
        self.student_vocab_size = student_vocab_size
        #: every sample's candidate ids are below this: the teacher's or the student's vocabulary
        self.vocab_size = min(
            self.metadata.vocab_size, student_vocab_size or self.metadata.vocab_size
        )
        # Window starts and ends: every sequence cut into pieces of at most seq_len.
        offsets = store.offsets
        starts, ends = [], []
        for s0, s1 in itertools.pairwise(offsets):
            w = np.arange(s0, s1, seq_len, dtype=np.int64)
            starts.append(w)
            ends.append(np.minimum(w + seq_len, s1))
        self._starts = np.concatenate(starts)
        self._ends = np.concatenate(ends)
        self._offsets = np.asarray(offsets, dtype=np.int64)  # (S + 1,) sequence starts
        self.epoch = 0
        self._yielded = 0  # samples yielded by the current iteration of this worker
        self._resume_from = 0  # set by load_state_dict, consumed by the next __iter__
        self._store: StoreBase | None = None  # opened lazily, inside each worker
        self._store_pid = -1
        # int32 ids (half the memory traffic) unless the vocabulary needs more
        self._id_dtype = np.int32 if self.metadata.vocab_size <= 1 << 31 else np.int64
        warm(self.metadata, self._id_dtype)  # numba's decoder, if used: loaded before workers fork

    # -- order -------------------------------------------------------------------------------

    @property
    def num_windows(self) -> int:
        return len(self._starts)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (over all its DataLoader workers)."""
        return -(-self.num_windows // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. Call it before each epoch (as with DistributedSampler):
        iterating again without it repeats the same order."""
        if epoch != self.epoch:
            self.epoch, self._yielded, self._resume_from = epoch, 0, 0

    def _epoch_order(self) -> np.ndarray:
        """All window indices of the epoch, in order, before splitting across ranks."""
        n = self.num_windows
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        block = self._starts // self.block_positions  # (W,) block of each window
        rank_of_block = np.argsort(rng.permutation(int(block.max()) + 1))
        group = rank_of_block[block] // self.buffer_blocks  # (W,) shuffle group of each window
        return np.lexsort((rng.random(n), group))  # groups in order, windows shuffled within

    def _worker_order(self) -> np.ndarray:
        order = self._epoch_order()
        per_rank = len(self)
        order = np.resize(order, per_rank * self.world_size)  # repeats fill the last ranks
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        info = get_worker_info()
        if info is None:
            return mine
        bounds = np.linspace(0, len(mine), info.num_workers + 1).astype(np.int64)
        return mine[bounds[info.id] : bounds[info.id + 1]]

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this (worker's) iteration stands; pair with :meth:`load_state_dict`."""
        return {
            "epoch": self.epoch,
            "yielded": self._yielded,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise LogitStoreError(
                f"this state was saved with seed {state['seed']} and world size "
                f"{state['world_size']}; resuming with seed {self.seed} and world size "
                f"{self.world_size} would not continue the same order"
            )
        self.epoch = int(state["epoch"])
        self._yielded = self._resume_from = int(state["yielded"])

    # -- iteration ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # zarr and its I/O threads must not cross a fork/pickle
        return state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A forked DataLoader worker inherits the parent's open store (and zarr's I/O thread
        # state) without pickling: open a fresh one in every process.
        if self._store is None or self._store_pid != os.getpid():
            self._store, self._store_pid = open_store(self.path), os.getpid()
        order = self._worker_order()
        skip, self._resume_from = self._resume_from, 0
        self._yielded = skip
        todo = order[skip:]
        blocks = self._starts[todo] // self.block_positions
        _, first = np.unique(blocks, return_index=True)
        cached = self.buffer_blocks + 1
        # Memory for the cached blocks, the one read ahead, and the one being decoded.
        pool = BufferPool(keep=2 * (cached + 2))

        def load(b: int) -> Block:
            start, stop = self._block_range(b)
            data = self._for_student(start, self._read_block(start, stop, pool.alloc))
            return block_of(start, data, self._offsets)

        def close() -> None:
            if self._store is not None:
                self._store.close()  # e.g. the read-ahead thread's HTTP connection

        with BlockReader(load, blocks[np.sort(first)], cached, close) as reader:
            for w in todo:
                sample = self._sample(int(w), reader)
                self._yielded += 1
                yield sample

    def _read_block(self, start: int, stop: int, alloc: Alloc = np.empty) -> Batch:
        """Decode positions ``[start, stop)`` (int32 ids, int64 past a vocabulary of 2³¹; ids
        and probabilities in memory from ``alloc``); subclasses may read elsewhere. A local
        store decodes straight from its shards (:class:`~logitstore.read.local.LogitStore`)."""
        store = self._store
        assert store is not None
        return store.read(start, stop, id_dtype=self._id_dtype, alloc=alloc)

    def _for_student(self, start: int, data: Batch) -> Batch:
        """A decoded block as the student can use it: ids folded below its vocabulary."""
        v = self.student_vocab_size
        if v is None or v >= self.metadata.vocab_size:
            return data
        if len(data.input_ids) and int(data.input_ids.max()) >= v:
            pos = start + int(np.flatnonzero(data.input_ids >= v)[0])
            raise LogitStoreError(
                f"the token at position {pos} of {str(self.path)!r} is "
                f"{int(data.input_ids[pos - start])}, outside the student's vocabulary of {v}: "
                "the student cannot read it (only the teacher's predicted ids can be folded)"
            )
        return fold_to_vocab(data, v, full=self.metadata.encoding.kind == "full")

    def _block_range(self, b: int) -> tuple[int, int]:
        start = b * self.block_positions
        # One position more than the block, for the label of its last window.
        return start, min(
            start + self.block_positions + self.seq_len + 1, self.metadata.num_positions
        )

    def _sample(self, w: int, reader: BlockReader) -> dict[str, torch.Tensor]:
        a, e = int(self._starts[w]), int(self._ends[w])
        block = reader.get(a // self.block_positions)
        n, lo = e - a, a - block.start
        real = slice(lo, lo + n)
        ids = block.ids[real]
        sample = {
            "input_ids": block.input_ids[real],  # (n,)
            "labels": block.labels[real],  # (n,) next token, -100 where there is none
            "attention_mask": torch.ones(n, dtype=torch.long),  # (n,)
            "loss_mask": block.loss_mask[real],  # (n,) bool: rows that count (FORMAT §4)
            # (n, m) int32: half the bytes of int64 (int64 past a vocabulary of 2³¹).
            "ids": ids if isinstance(ids, torch.Tensor) else torch.from_numpy(np.array(ids)),
            "probs": block.probs[real],  # (n, m)
            "residual": block.residual[real],  # (n,)
        }
        if n < self.seq_len:  # pad every field to (T, ...) with zeros (labels with -100)
            pad = self.seq_len - n
            for key, t in sample.items():
                fill = -100 if key == "labels" else 0
                sample[key] = torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])
        elif get_worker_info() is not None:
            # In a worker, copies: a view would pin the whole block, and ship it to the main
            # process if the loader does not collate (batch_size=None). In the main process
            # collate's stack is the one copy.
            sample = {key: t.clone() for key, t in sample.items()}
        return sample
