"""Decoded blocks for :class:`logitstore.LogitDataset`: their memory, their labels, and the
reader that keeps a few in memory and reads the next one ahead.

A block is ``block_positions`` consecutive positions, decoded once per epoch and cut into
windows. Its two large arrays (candidate ids and probabilities, 256 B per top-64 position
each) are decoded into memory the reader reuses once nothing refers to it any more
(:class:`~logitstore.read.buffers.BufferPool`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from ..format.codec import Batch

__all__ = ["Block", "BlockReader", "block_of"]


class Block(NamedTuple):
    """A decoded block, as tensors over its ``L`` positions from ``start``."""

    start: int
    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64: the next token or -100
    loss_mask: torch.Tensor  # (L,) bool
    ids: Any  # (L, m) int32 (int64 past 2³¹ ids) tensor; a full store's read-only broadcast ndarray
    probs: torch.Tensor  # (L, m) float32
    residual: torch.Tensor  # (L,) float32


def block_of(start: int, data: Batch, offsets: np.ndarray) -> Block:
    """``data`` (positions from ``start``) as tensors that share its memory, with its labels
    computed once for all its windows: ``labels[t]`` is the next token, -100 at the block's
    end, where the next position starts another sequence (``offsets``), and where the
    store's loss mask excludes the position."""
    n = len(data.input_ids)
    assert data.loss_mask is not None
    labels = np.empty(n, dtype=np.int64)  # (L,)
    labels[:-1] = data.input_ids[1:]
    labels[-1:] = -100
    # sequence starts inside (start, start + n): the position before each has no next token
    starts = offsets[np.searchsorted(offsets, start + 1) : np.searchsorted(offsets, start + n)]
    labels[starts - start - 1] = -100
    if not data.loss_mask.all():
        labels[~data.loss_mask] = -100
    # A full store's ids are a read-only broadcast view: each sample copies its rows.
    ids = torch.from_numpy(data.ids) if data.ids.strides[0] else data.ids
    return Block(
        start,
        torch.from_numpy(data.input_ids),
        torch.from_numpy(labels),
        torch.from_numpy(data.loss_mask),
        ids,
        torch.from_numpy(data.probs),
        torch.from_numpy(data.residual),
    )


class BlockReader:
    """Decoded blocks for one iteration: an LRU of ``cache_blocks`` blocks, and the next
    block in the iteration's order read ahead on a thread while the current one is used
    (which also hides network latency for remote stores).

    Args:
        load: block number → the decoded block (run on the read-ahead thread).
        blocks_in_order: the blocks the iteration will ask for, in order.
        cache_blocks: blocks kept decoded.
        close: called once the iteration ends (e.g. to close the read-ahead thread's
            HTTP connection).
    """

    def __init__(
        self,
        load: Callable[[int], Block],
        blocks_in_order: np.ndarray,
        cache_blocks: int,
        close: Callable[[], None],
    ) -> None:
        self._load, self._close, self._size = load, close, cache_blocks
        order = [int(b) for b in blocks_in_order]
        self.next = dict(itertools.pairwise(order))
        self.cache: OrderedDict[int, Block] = OrderedDict()
        self.pending: dict[int, Future[Block]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitstore-prefetch")

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._close()

    def get(self, b: int) -> Block:
        hit = self.cache.get(b)
        if hit is not None:
            self.cache.move_to_end(b)
            return hit
        future = self.pending.pop(b, None)
        entry = future.result() if future is not None else self._load(b)
        self.cache[b] = entry
        if len(self.cache) > self._size:
            self.cache.popitem(last=False)
        nxt = self.next.get(b)
        if nxt is not None and nxt not in self.cache and nxt not in self.pending:
            self.pending[nxt] = self.pool.submit(self._load, nxt)
        return entry
