"""Capture under torchrun: which process of a job this is, how the processes agree, and which
shards each one writes.

``torchrun --nproc-per-node N -m logitstore write ...`` starts N processes ("ranks") with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment (``--nnodes`` and a c10d
rendezvous make it N per node). The ranks exchange no tensors. Rank 0 creates (or resumes)
the store and tells the others which shards are committed; every rank derives the same
assignment of the remaining shards from that (:func:`assign_shards`), runs the teacher on
exactly the forward passes a single process would run for its shards, writes and commits
them, and says so; rank 0 marks the store complete when every rank has. The messages are
small, so they travel through the key-value store of torchrun's rendezvous (c10d), and the
process group is gloo on every device.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch

from ..errors import LogitStoreError, TeacherError

__all__ = ["Ranks", "assign_shards", "join", "rank_device", "shard_costs"]

T = TypeVar("T")

# How long a rank waits for another (rank 0 creating a store of billions of positions, a
# rank finishing its last shard). A rank that dies does not make the others wait this long:
# torchrun stops the whole job when one of its processes fails.
_WAIT = timedelta(days=7)
_POLL_S = 0.2

_joined: Ranks | None = None
_calls = itertools.count()  # every rank makes the same calls in the same order


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job, and the job's shared key-value store."""

    rank: int
    world: int
    local_rank: int
    store: Any  # a torch.distributed.Store, prefixed for one call of capture/generate

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def scope(self, name: str) -> Ranks:
        """A fresh key namespace for one call (the same on every rank)."""
        from torch.distributed.distributed_c10d import PrefixStore

        prefix = f"{name}/{next(_calls)}/"
        return Ranks(self.rank, self.world, self.local_rank, PrefixStore(prefix, self.store))

    def lead(self, key: str, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn``; every rank returns its result, or raises its error."""
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:
                # The other ranks raise rank 0's error, named as rank 0's.
                failed = (
                    type(e)(f"{self}: {e}")
                    if isinstance(e, LogitStoreError)
                    else LogitStoreError(f"{self} failed: {e!r}")
                )
                self.store.set(key, pickle.dumps((False, failed)))
                raise
            self.store.set(key, pickle.dumps((True, result)))
            return result
        self.store.wait([key], _WAIT)
        ok, value = pickle.loads(self.store.get(key))
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def add(self, key: str, n: int) -> int:
        """Add ``n`` to the job-wide counter ``key``; its new value."""
        return int(self.store.add(key, n))

    def barrier(self, key: str, tick: Callable[[], None] | None = None) -> None:
        """Wait until every rank has arrived at ``key``, calling ``tick`` while waiting."""
        everyone = f"{key}/all"
        if self.add(key, 1) == self.world:  # the last to arrive lets everyone go
            self.store.set(everyone, b"1")
        if tick is None:
            self.store.wait([everyone], _WAIT)
            return
        while not self.store.check([everyone]):
            tick()
            time.sleep(_POLL_S)


def join() -> Ranks | None:
    """The torchrun job this process is a rank of, or ``None`` when it runs alone
    (``WORLD_SIZE`` unset or 1). Joins the job's process group (gloo) on first use; a group
    the caller initialised already is used as it is.

    Raises:
        TeacherError: torch was built without distributed support.
    """
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if _joined is not None:
        return _joined
    import torch.distributed as dist

    if not dist.is_available():
        raise TeacherError(
            f"WORLD_SIZE is {world} (torchrun?), but this torch has no torch.distributed; "
            "install a torch build with distributed support or run one process"
        )
    if dist.is_initialized():
        # The caller's own job: its group's store (no public accessor exists for it).
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        from torch.distributed.rendezvous import rendezvous

        store, rank, world = next(rendezvous("env://", timeout=_WAIT))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=_WAIT)
    # A restarted job (torchrun --max-restarts) must not read the last attempt's keys.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    from torch.distributed.distributed_c10d import PrefixStore

    prefixed = PrefixStore(f"logitstore/{attempt}/", store)
    _joined = Ranks(rank, world, int(os.environ.get("LOCAL_RANK", "0") or 0), prefixed)
    return _joined


def rank_device(requested: str | None, ranks: Ranks | None) -> str | None:
    """The device a rank runs its teacher on: ``cuda:LOCAL_RANK`` (or the CPU when asked for,
    or when there is no GPU); alone, the device asked for.

    Raises:
        TeacherError: a single GPU (``cuda:N``) was named for a job of several ranks.
    """
    if ranks is None:
        return requested
    if requested not in (None, "cuda", "cpu"):
        raise TeacherError(
            f"--device {requested} under torchrun: every rank uses cuda:LOCAL_RANK; pass "
            "--device cuda (or cpu), and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{ranks.local_rank}"


def shard_costs(
    offsets: np.ndarray, widths: np.ndarray, shard_positions: int, num_shards: int
) -> np.ndarray:
    """``(num_shards,)`` the teacher's work for each shard, in tokens computed (padding
    included): sequence ``s`` costs ``widths[s]`` (the padded length of its batch), spread
    evenly over its positions."""
    cum = np.concatenate([[0.0], np.cumsum(widths, dtype=np.float64)])  # (S + 1,)
    bounds = np.minimum(np.arange(num_shards + 1) * shard_positions, offsets[-1])
    return np.diff(np.interp(bounds, offsets, cum))  # (num_shards,)


def assign_shards(cost: np.ndarray, todo: np.ndarray, world: int, unit: int = 1) -> np.ndarray:
    """``(num_shards,)`` the rank that writes each shard (-1 where nothing is left to write).

    Shards are taken in blocks of ``unit`` (the shards one group of the batch plan spans).
    The blocks with shards left to write, in order, are cut into ``world`` contiguous runs of
    about equal cost: a block goes to the rank whose share of the total cost holds its
    midpoint. Contiguous runs of whole groups keep the forward passes two ranks both need
    to the batch of a sequence that crosses the cut. A pure function: every rank computes
    the same assignment, and a resumed job (with any number of ranks) assigns what is left.

    Example:
        >>> assign_shards(np.ones(5), np.array([1, 1, 0, 1, 1], bool), 2)
        array([ 0,  0, -1,  1,  1])
    """
    todo = np.asarray(todo, dtype=bool)
    owner = np.full(len(cost), -1, dtype=np.int64)
    if not todo.any():
        return owner
    block = np.arange(len(cost)) // max(unit, 1)  # (num_shards,)
    left = np.asarray(cost, dtype=np.float64) * todo
    block_cost = np.bincount(block, weights=left)  # (num_blocks,)
    idx = np.flatnonzero(np.bincount(block, weights=todo) > 0)
    c = np.maximum(block_cost[idx], 1e-9)
    mid = np.cumsum(c) - c / 2
    block_owner = np.full(len(block_cost), -1, dtype=np.int64)
    block_owner[idx] = np.minimum((mid * world / c.sum()).astype(np.int64), world - 1)
    owner[todo] = block_owner[block[todo]]
    return owner
