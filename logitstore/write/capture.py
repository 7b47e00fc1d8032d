"""Running a teacher once over the input and writing its distributions into a store.

The teacher runs batched forward passes on its device; log-softmax, temperature, top-k or
sampling and quantisation run there too (:func:`logitstore.write.encode.encode_rows`). Host
transfer, compression and commits happen on the :class:`StoreWriter`'s threads, overlapped
with the next forward pass.

Batches are planned from the sequence lengths alone (:func:`plan_batches`), so a resumed run
recomputes exactly the batches of an uninterrupted one and finishes with the same bytes. By
default sequences of similar length run together (a chat set whose lengths spread over two
orders of magnitude otherwise spends most of the forward pass on padding); since the writer
takes rows in position order, encoded rows wait on the device until every earlier sequence
of their group is done, which bounds a group by the bytes of its encoded rows.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import LogitStoreError, TeacherError
from ..format.metadata import Encoding, Layout
from ..format.provenance import tokenizer_identity
from ..format.storage import StorePath, store_path
from .checks import check_sequences
from .distributed import Ranks, assign_shards, join, shard_costs
from .encode import EncodedRows, cat_rows, encode_rows, split_rows
from .inputs import Sequences
from .lock import store_lock
from .teacher import Teacher
from .writer import StoreWriter

__all__ = ["BATCHINGS", "Batching", "capture", "plan_batches"]

Batching = Literal["length", "sequential"]
#: How capture forms the teacher's batches (see :func:`plan_batches`).
BATCHINGS: tuple[Batching, ...] = ("length", "sequential")

# Rows of (rows, vocab) float32 encoded at once: bounds the encoder's working memory.
_ENCODE_ELEMENTS = 1 << 25
# A length-sorted group of an unaligned plan spans this many batches' worth of tokens
# (enough that neighbours in the sorted order differ little in length). capture aligns its
# groups to shards instead: their encoded rows, held on the device until they can be written
# in position order, are then at most a shard's (or one batch's).
_GROUP_BATCHES = 64
# Past `batch_size` sequences, a batch takes more only while they are at least this fraction
# of its longest: at most 1/8 of such a sequence's tokens are padding.
_SIMILAR = 7 / 8


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    batching: Batching = "length",
    group_positions: int | None = None,
    align: int | None = None,
) -> list[np.ndarray]:
    """The teacher's forward passes: the sequence indices of each batch, in running order.

    ``sequential``: batch ``b`` holds sequences ``[b * batch_size, (b + 1) * batch_size)``,
    right-padded to its longest. ``length``: consecutive sequences are cut into groups of
    at least ``group_positions`` positions (default: 64 batches' worth); a group runs
    longest first (ties in position order), each batch taking the next ``batch_size``
    sequences and then more while they are at least 7/8 of its longest, up to
    ``batch_size × longest`` tokens, padding included, where ``longest`` is the longest
    sequence of the input. That is the size of the largest batch ``sequential`` runs, so
    peak memory is the same; little padding is computed, and short sequences run many to a
    forward pass. With ``align`` (capture passes its shard size), a group is instead the
    sequences that start within one span of :func:`group_span` positions (whole shards), so
    writers of disjoint runs of whole shards (torchrun ranks) share at most the batch of a
    sequence that crosses the cut between them.

    A pure function of its arguments: the same command plans the same batches.

    Raises:
        TeacherError: ``batch_size`` < 1 or an unknown ``batching``.

    Example:
        >>> plan_batches(np.array([5, 1, 4, 2, 2]), 1)  # a budget of 5 tokens per batch
        [array([0]), array([2]), array([3, 4]), array([1])]
    """
    if batch_size < 1:
        raise TeacherError(f"--batch-size must be at least 1, got {batch_size}")
    n = len(lengths)
    if batching == "sequential":
        return [np.arange(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
    if batching != "length":
        raise TeacherError(f"unknown batching {batching!r}: expected one of {BATCHINGS}")
    if n == 0:
        return []
    lengths = np.asarray(lengths, dtype=np.int64)
    budget = batch_size * int(lengths.max())  # tokens per forward pass, padding included
    length_of = lengths.tolist()
    ends = np.concatenate([[0], np.cumsum(lengths)])  # (S + 1,)
    if align is not None:
        span_of = ends[:-1] // group_span(budget, align)  # (S,) the span each starts in
        bounds = [0, *(np.flatnonzero(np.diff(span_of)) + 1).tolist(), n]
    else:
        group = max(group_positions or budget * _GROUP_BATCHES, 1)
        bounds = [0]
        while bounds[-1] < n:
            g0 = bounds[-1]
            g1 = int(np.searchsorted(ends, ends[g0] + group, side="left"))
            bounds.append(min(max(g1, g0 + 1), n))
    plan: list[np.ndarray] = []
    for g0, g1 in itertools.pairwise(bounds):
        order = g0 + np.argsort(-lengths[g0:g1], kind="stable")  # longest first
        b0, g = 0, len(order)
        while b0 < g:
            width = length_of[order[b0]]  # the batch's longest: its first sequence
            most = min(b0 + budget // width, g)  # the token budget
            b1 = min(b0 + batch_size, most)
            while b1 < most and length_of[order[b1]] >= _SIMILAR * width:
                b1 += 1
            plan.append(order[b0:b1])
            b0 = b1
    return plan


def group_span(budget: int, shard_positions: int) -> int:
    """Positions of one group of an aligned plan: the fewest whole shards that hold one
    batch's token ``budget``."""
    return shard_positions * max(1, -(-budget // shard_positions))


def capture(
    teacher: Teacher,
    sequences: Sequences,
    out: str | os.PathLike[str],
    encoding: Encoding,
    *,
    batch_size: int = 8,
    batching: Batching = "length",
    seed: int = 0,
    seq_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_positions: int | None = None,
    shard_positions: int | None = None,
    loss_mask: np.ndarray | None = None,
    generation: dict[str, Any] | None = None,
    fsync: bool = True,
) -> StorePath:
    """Run ``teacher`` over ``sequences`` and write (or resume) the store at ``out``.

    ``batching`` chooses how sequences share forward passes (:func:`plan_batches`):
    ``length`` (the default) runs sequences of similar length together, in batches of at
    most ``batch_size`` × the longest sequence's tokens; ``sequential`` runs ``batch_size``
    consecutive sequences per batch. The batches are a function of the sequence lengths and
    these settings, so a resumed run recomputes exactly the batches an uninterrupted one
    did. (A sequence's logits may differ at float rounding between batchings, as between
    batch sizes.) ``loss_mask`` and ``generation`` are stored as :class:`StoreWriter`
    describes; an encoding of kind ``none`` stores the tokens without running the teacher.
    ``fsync`` (default on) forces each commit to disk (:class:`StoreWriter`).

    Raises:
        InputError, TeacherError, StoreExistsError, ResumeMismatchError: checked before the
            first forward pass.

    Example:
        >>> t = load_teacher("gpt2")
        >>> capture(t, tokenize(read_documents(["a.txt"]), t.tokenizer, 1024), "a.zarr",
        ...         Encoding("topk", "u8", k=64))
    """
    plan_batches(np.zeros(0, dtype=np.int64), batch_size, batching)  # checks both, cheaply
    encoding.check_vocab(teacher.vocab_size)
    check_sequences(sequences.input_ids, sequences.offsets, teacher.vocab_size)
    lengths = np.diff(sequences.offsets)
    longest = max(int(lengths.max()), seq_len or 0)
    if teacher.max_length is not None and longest > teacher.max_length:
        raise TeacherError(
            f"sequences of {longest} tokens were asked for but the teacher reads at most "
            f"{teacher.max_length}; pass --seq-len {teacher.max_length} or less"
        )
    tok_ident, tok_json = (None, None)
    if teacher.tokenizer is not None:
        tok_ident, tok_json = tokenizer_identity(teacher.tokenizer)
    settings: dict[str, Any] = {
        "encoding": encoding,
        "vocab_size": teacher.vocab_size,
        "input_ids": sequences.input_ids,
        "offsets": sequences.offsets,
        "seq_len": seq_len,
        "seed": seed,
        "teacher": teacher.provenance(),
        "tokenizer": tok_ident,
        "tokenizer_json": tok_json,
        "chunk_positions": chunk_positions,
        "shard_positions": shard_positions,
        "loss_mask": loss_mask,
        "generation": generation,
        "fsync": fsync,
    }
    layout = Layout.choose(encoding, teacher.vocab_size, chunk_positions, shard_positions)
    sp = layout.shard_positions
    plan = plan_batches(lengths, batch_size, batching, align=sp)
    # A group of the plan spans `unit` shards; a cut between two of them would make two
    # ranks run most of its batches, so ranks get whole groups.
    unit = group_span(batch_size * int(lengths.max()), sp) // sp if batching == "length" else 1
    job = join()
    if job is None:
        with store_lock(out):
            writer = StoreWriter(out, overwrite=overwrite, **settings)
            with _bar(out, writer, progress) as bar:
                _fill(teacher, sequences, writer, plan, encoding, seed, bar.update)
        return store_path(out)
    ranks = job.scope("capture")
    try:
        _capture_ranks(ranks, teacher, sequences, out, plan, unit, settings, overwrite, progress)
    except LogitStoreError as e:
        if str(e).startswith("rank "):
            raise
        raise type(e)(f"{ranks}: {e}") from e
    return store_path(out)


def _capture_ranks(
    ranks: Ranks,
    teacher: Teacher,
    sequences: Sequences,
    out: str | os.PathLike[str],
    plan: list[np.ndarray],
    unit: int,
    settings: dict[str, Any],
    overwrite: bool,
    progress: bool,
) -> None:
    """One rank's part of a torchrun job: rank 0 creates or resumes the store (holding its
    lock), every rank writes the shards :func:`assign_shards` gives it, and rank 0 marks the
    store complete once every rank has committed its own."""
    with contextlib.ExitStack() as stack:
        writer: StoreWriter | None = None

        def create() -> np.ndarray:
            nonlocal writer
            stack.enter_context(store_lock(out))
            writer = StoreWriter(out, overwrite=overwrite, **settings)
            return writer.committed

        committed = ranks.lead("created", create)
        if writer is None:
            writer = StoreWriter(out, attach=True, **settings)
        md = writer.metadata
        lengths = np.diff(sequences.offsets)  # (S,)
        widths = np.zeros(len(sequences), dtype=np.int64)  # (S,) padded width of each's batch
        for seqs in plan:
            widths[seqs] = int(lengths[seqs].max())
        cost = shard_costs(sequences.offsets, widths, md.layout.shard_positions, md.num_shards)
        owner = assign_shards(cost, ~committed, ranks.world, unit)
        writer.claim(np.flatnonzero(owner == ranks.rank))
        ranges = [md.shard_range(int(i)) for i in np.flatnonzero(committed)]
        initial = sum(b - a for a, b in ranges)  # positions committed before this run
        with _bar(out, writer, progress and ranks.rank == 0, initial) as bar:

            def show() -> None:  # the whole job's progress, on rank 0 only
                bar.update(initial + ranks.add("positions", 0) - bar.n)

            def report(n: int) -> None:
                ranks.add("positions", n)
                if ranks.rank == 0:
                    show()

            _fill(teacher, sequences, writer, plan, settings["encoding"], settings["seed"], report)
            ranks.barrier("written", tick=show if ranks.rank == 0 else None)
            show()
        ranks.lead("complete", writer.mark_complete)


def _bar(
    out: str | os.PathLike[str], writer: StoreWriter, progress: bool, initial: int | None = None
) -> tqdm[Any]:
    return tqdm(
        total=writer.metadata.num_positions,
        initial=writer.resume_position if initial is None else initial,
        unit="pos",
        unit_scale=True,
        desc=f"write {Path(out).name}",
        disable=not progress,
        dynamic_ncols=True,
    )


def _fill(
    teacher: Teacher,
    sequences: Sequences,
    writer: StoreWriter,
    plan: list[np.ndarray],
    encoding: Encoding,
    seed: int,
    report: Callable[[int], Any],
) -> None:
    """Run the batches of ``plan`` that hold a sequence with positions in a shard ``writer``
    is to write, and hand it those sequences' rows in position order. Every other batch is
    skipped: nothing committed is recomputed. ``report`` gets the positions each batch
    added to the writer's shards."""
    offsets = sequences.offsets
    md = writer.metadata
    sp, ns = md.layout.shard_positions, md.num_shards
    todo = writer.todo  # (ns,)
    # Sequence s needs running iff a shard it touches is to be written.
    first_shard = offsets[:-1] // sp  # (S,)
    last_shard = (offsets[1:] - 1) // sp  # (S,)
    c = np.concatenate([[0], np.cumsum(todo)])  # (ns + 1,)
    needed = c[last_shard + 1] - c[first_shard] > 0  # (S,)
    # Positions of each sequence in shards to write: the progress bar's unit.
    sizes = np.diff(np.minimum(np.arange(ns + 1) * sp, md.num_positions))  # (ns,)
    before = np.concatenate([[0], np.cumsum(sizes * todo)])  # (ns + 1,)

    def owned_before(p: np.ndarray) -> np.ndarray:
        s = np.minimum(p // sp, ns - 1)
        n: np.ndarray = before[s] + np.clip(p - s * sp, 0, sizes[s]) * todo[s]
        return n

    counts = owned_before(offsets[1:]) - owned_before(offsets[:-1])  # (S,)
    need = np.flatnonzero(needed).tolist()
    ids_all = torch.from_numpy(sequences.input_ids)
    done: dict[int, EncodedRows] = {}  # encoded sequences waiting for an earlier one
    j = 0  # need[j] is the next sequence the writer takes
    with writer, torch.inference_mode():
        for seqs in plan:
            if not needed[seqs].any():
                continue
            pieces = _run_batch(teacher, ids_all, offsets, seqs, encoding, seed)
            for i, piece in zip(seqs.tolist(), pieces, strict=True):
                if needed[i]:
                    done[i] = piece
            run: list[EncodedRows] = []  # consecutive sequences, handed over in one write
            while j < len(need) and need[j] in done:
                if run and need[j] != need[j - 1] + 1:
                    writer.write(int(offsets[need[j - len(run)]]), cat_rows(run))
                    run = []
                run.append(done.pop(need[j]))
                j += 1
            if run:
                writer.write(int(offsets[need[j - len(run)]]), cat_rows(run))
            report(int(counts[seqs].sum()))


def _run_batch(
    teacher: Teacher,
    ids_all: torch.Tensor,
    offsets: np.ndarray,
    seqs: np.ndarray,
    encoding: Encoding,
    seed: int,
) -> list[EncodedRows]:
    """One forward pass over sequences ``seqs``, right-padded together; their encoded rows,
    one piece per sequence."""
    lens = (offsets[seqs + 1] - offsets[seqs]).astype(np.int64)  # (B,)
    width = int(lens.max())
    batch = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T) right-padded
    mask = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    for r, (s, n) in enumerate(zip(offsets[seqs].tolist(), lens.tolist(), strict=True)):
        batch[r, :n] = ids_all[s : s + n]
        mask[r, :n] = 1
    batch, mask = batch.to(teacher.device), mask.to(teacher.device)
    logits = teacher.fn(batch, mask)  # (B, T, V)
    if logits.shape[:2] != batch.shape or logits.shape[-1] != teacher.vocab_size:
        raise TeacherError(
            f"the teacher returned logits of shape {tuple(logits.shape)}; expected "
            f"({len(seqs)}, {width}, {teacher.vocab_size})"
        )
    # With --device-map auto the logits come from the model's last device, not its first.
    keep = mask.reshape(-1).bool().to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])[keep]  # (R, V), R = Σ lens
    # Each row's global position (seeds `sampled` draws): the sequences' ranges, in batch order.
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # (R,)
    positions = torch.from_numpy(np.repeat(offsets[seqs], lens) + within).to(logits.device)
    rows_per_step = max(1, _ENCODE_ELEMENTS // teacher.vocab_size)
    encoded = [
        encode_rows(
            flat[r0 : r0 + rows_per_step], encoding, seed, positions[r0 : r0 + rows_per_step]
        )
        for r0 in range(0, len(flat), rows_per_step)
    ]
    return split_rows(cat_rows(encoded), lens.tolist())
