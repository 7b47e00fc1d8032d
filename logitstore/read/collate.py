"""Samples into batches (:func:`collate`) and a teacher's rows narrowed to a student's
vocabulary (:func:`fold_to_vocab`): what :class:`logitstore.LogitDataset` hands a trainer."""

from __future__ import annotations

import numpy as np
import torch

from ..format.codec import Batch

__all__ = ["collate", "fold_to_vocab"]


def fold_to_vocab(batch: Batch, vocab_size: int, *, full: bool = False) -> Batch:
    """``batch`` with the teacher's mass on ids ``>= vocab_size`` moved into the residual.

    Candidates at those ids become padding (id 0, probability 0) and each row's residual
    gains exactly their probability (summed in float64, rounded once to float32), so
    probabilities plus residual keep their total. Ids ascend in every row (FORMAT.md §5.1):
    the dropped candidates are the last real ones, and padding stays a suffix. With
    ``full`` (a ``full`` store: column ``j`` is token ``j``) rows are cut to their first
    ``vocab_size`` columns instead. A batch without such ids is returned as it is.

    Example:
        >>> folded = fold_to_vocab(store.read(0, 512), 151_936)
    """
    ids, probs = batch.ids, batch.probs
    if full:
        if ids.shape[1] <= vocab_size:
            return batch
        dropped = probs[:, vocab_size:].sum(axis=1, dtype=np.float64)  # (n,)
        ids, probs = ids[:, :vocab_size], probs[:, :vocab_size]  # (n, vocab_size)
    else:
        if ids.size == 0 or ids.max() < vocab_size:
            return batch
        out = ids >= vocab_size  # (n, m)
        dropped = np.where(out, probs, 0).sum(axis=1, dtype=np.float64)  # (n,)
        ids = np.where(out, 0, ids).astype(ids.dtype)
        probs = np.where(out, np.float32(0), probs)
    residual = (batch.residual.astype(np.float64) + dropped).astype(np.float32)
    return batch._replace(ids=ids, probs=probs, residual=residual)


def collate(
    samples: list[dict[str, torch.Tensor]], *, pin_memory: bool = False
) -> dict[str, torch.Tensor]:
    """Stack samples into a batch, trimmed to the longest real window in it.

    Shapes: ``input_ids``, ``labels``, ``attention_mask``, ``loss_mask`` ``(B, T)``;
    ``ids`` ``(B, T, m)`` int32 (half the bytes of int64 to move; the losses accept it;
    int64 for a vocabulary past 2³¹),
    ``probs`` ``(B, T, m)``; ``residual`` ``(B, T)``.

    With ``pin_memory`` (a CUDA trainer reading with ``num_workers=0``) the batch is stacked
    straight into page-locked memory, ready for ``.to("cuda", non_blocking=True)``: one
    copy, where ``DataLoader(pin_memory=True)`` stacks and then copies again. Pass it as
    ``collate_fn=functools.partial(collate, pin_memory=True)``. (Worker processes cannot
    hand pinned memory over: with workers, use the DataLoader's own ``pin_memory``.)
    """
    masks = [s["attention_mask"] for s in samples]
    stacked = None
    if len({m.shape for m in masks}) == 1:  # windows of one length: one sum for the batch
        stacked = torch.stack(masks)  # (B, T)
        longest = int(stacked.sum(1).max())
        full = longest == masks[0].shape[0]
    else:
        longest, full = max(int(m.sum()) for m in masks), False
    out = {}
    for key in samples[0]:
        if key == "attention_mask" and full and stacked is not None and not pin_memory:
            out[key] = stacked
            continue
        parts = [s[key] for s in samples] if full else [s[key][:longest] for s in samples]
        if pin_memory:
            shape = (len(parts), *parts[0].shape)
            buf = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
            out[key] = torch.stack(parts, out=buf)
        else:
            out[key] = torch.stack(parts)
    return out
