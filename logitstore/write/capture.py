"""Running a teacher once over the input and writing its distributions into a store.

The teacher runs batched forward passes on its device; log-softmax, temperature, top-k or
sampling and quantisation run there too (:func:`logitstore.write.encode.encode_rows`). Host
transfer, compression and commits happen on the :class:`StoreWriter`'s threads, overlapped
with the next forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import TeacherError
from ..format.metadata import Encoding
from ..format.provenance import tokenizer_identity
from .checks import check_sequences
from .encode import encode_rows
from .inputs import Sequences
from .teacher import Teacher
from .writer import StoreWriter

__all__ = ["capture"]

# Rows of (rows, vocab) float32 encoded at once: bounds the encoder's working memory.
_ENCODE_ELEMENTS = 1 << 25


def capture(
    teacher: Teacher,
    sequences: Sequences,
    out: str | os.PathLike[str],
    encoding: Encoding,
    *,
    batch_size: int = 8,
    seed: int = 0,
    seq_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_positions: int | None = None,
    shard_positions: int | None = None,
    loss_mask: np.ndarray | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Run ``teacher`` over ``sequences`` and write (or resume) the store at ``out``.

    Batch ``b`` always holds sequences ``[b * batch_size, (b + 1) * batch_size)``, so a
    resumed run recomputes exactly the batches an uninterrupted one did. ``loss_mask`` and
    ``generation`` are stored as :class:`StoreWriter` describes; an encoding of kind
    ``none`` stores the tokens without running the teacher.

    Raises:
        InputError, TeacherError, StoreExistsError, ResumeMismatchError: checked before the
            first forward pass.

    Example:
        >>> t = load_teacher("gpt2")
        >>> capture(t, tokenize(read_documents(["a.txt"]), t.tokenizer, 1024), "a.zarr",
        ...         Encoding("topk", "u8", k=64))
    """
    if batch_size < 1:
        raise TeacherError(f"--batch-size must be at least 1, got {batch_size}")
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
    writer = StoreWriter(
        out,
        encoding=encoding,
        vocab_size=teacher.vocab_size,
        input_ids=sequences.input_ids,
        offsets=sequences.offsets,
        seq_len=seq_len,
        seed=seed,
        teacher=teacher.provenance(),
        tokenizer=tok_ident,
        tokenizer_json=tok_json,
        chunk_positions=chunk_positions,
        shard_positions=shard_positions,
        overwrite=overwrite,
        loss_mask=loss_mask,
        generation=generation,
    )
    if encoding.kind == "none":  # tokens only: everything was written at creation
        with writer:
            pass
        return Path(out)
    offsets = sequences.offsets
    total = int(offsets[-1])
    bar = tqdm(
        total=total,
        initial=writer.resume_position,
        unit="pos",
        unit_scale=True,
        desc=f"write {Path(out).name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    ids_all = torch.from_numpy(sequences.input_ids)
    with writer, bar, torch.inference_mode():
        for b0 in range(0, len(sequences), batch_size):
            b1 = min(b0 + batch_size, len(sequences))
            p0, p1 = int(offsets[b0]), int(offsets[b1])
            if p1 <= writer.resume_position:
                continue
            lens = lengths[b0:b1]
            width = int(lens.max())
            batch = torch.zeros(b1 - b0, width, dtype=torch.long)  # (B, T) right-padded
            mask = torch.zeros(b1 - b0, width, dtype=torch.long)  # (B, T)
            for i, (s, n) in enumerate(zip(offsets[b0:b1], lens, strict=True)):
                batch[i, :n] = ids_all[s : s + n]
                mask[i, :n] = 1
            batch, mask = batch.to(teacher.device), mask.to(teacher.device)
            logits = teacher.fn(batch, mask)  # (B, T, V)
            if logits.shape[:2] != batch.shape or logits.shape[-1] != teacher.vocab_size:
                raise TeacherError(
                    f"the teacher returned logits of shape {tuple(logits.shape)}; expected "
                    f"({b1 - b0}, {width}, {teacher.vocab_size})"
                )
            flat = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1).bool()]  # (R, V)
            rows_per_step = max(1, _ENCODE_ELEMENTS // teacher.vocab_size)
            for r0 in range(0, p1 - p0, rows_per_step):
                r1 = min(r0 + rows_per_step, p1 - p0)
                positions = torch.arange(p0 + r0, p0 + r1, device=teacher.device)
                writer.write(p0 + r0, encode_rows(flat[r0:r1], encoding, seed, positions))
            bar.update(p1 - max(p0, bar.n))
    return Path(out)
