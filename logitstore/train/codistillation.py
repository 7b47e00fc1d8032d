"""Co-distillation: a teacher and a student train together on the same batches.

At every step the teacher takes a step of ground-truth cross-entropy, and the student one of

    α(t) · KL(teacher ‖ student) + (1 − α(t)) · CE

against the teacher's logits from that same forward pass, detached: no gradient of the
student's loss reaches the teacher. ``α`` is a schedule from :mod:`logitstore.losses`
(:class:`~logitstore.losses.LinearWarmup` trusts an untrained teacher gradually).

A run checkpoints both models, both optimizers, any LR schedulers and the RNG state
atomically every ``checkpoint_every`` steps; calling :func:`codistill` again with the same
arguments resumes from the checkpoint, and because batches are a pure function of the step,
the resumed run's models equal an uninterrupted run's. Optionally the teacher's
distributions over a fixed set of sequences are recorded into stores as training goes, so
later students can distil from them without the teacher (``record``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import LogitStoreError
from ..format.metadata import Encoding
from ..write.capture import capture
from ..write.inputs import Sequences
from ..write.teacher import Teacher
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import ConstantSchedule, cross_entropy, logit_kl

__all__ = [
    "CodistillStep",
    "Recording",
    "codistill",
    "codistillation_step",
    "record_teacher",
    "window_batches",
]

Batch = dict[str, torch.Tensor]
_HALF = ConstantSchedule(0.5)


@dataclass(frozen=True)
class CodistillStep:
    """What one step did (losses before the step's updates)."""

    step: int  # 0-based index of the step
    alpha: float
    teacher_ce: float
    student_ce: float
    student_kd: float
    student_loss: float


@dataclass(frozen=True)
class Recording:
    """Record the teacher's distributions over ``sequences`` into a store every ``every``
    steps (and after the last step) as ``out_dir/teacher-step{N:06d}.zarr``, with
    ``encoding``. ``tokenizer`` (the teacher's) is kept in the stores."""

    sequences: Sequences
    out_dir: str | os.PathLike[str]
    encoding: Encoding
    every: int | None = None
    batch_size: int = 8
    tokenizer: Any = None
    name: str = "codistill-teacher"


def codistillation_step(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Batch,
    alpha: float,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    *,
    temperature: float = 1.0,
    max_grad_norm: float | None = 1.0,
    step: int = 0,
) -> CodistillStep:
    """One step of both models on ``batch`` (``input_ids``, ``attention_mask``, ``labels``
    ``(B, T)`` with ``labels[t]`` the token after ``t`` or -100; optional ``loss_mask``).

    The teacher's update uses only its own cross-entropy; its logits enter the student's
    loss detached, so the student's gradient never reaches the teacher.
    """
    if not 0.0 <= alpha <= 1.0:
        raise LogitStoreError(f"alpha must be in [0, 1], got {alpha}")
    t_dev, s_dev = _device(teacher), _device(student)
    keys = ("input_ids", "attention_mask", "labels", "loss_mask")
    on_t = {k: batch[k].to(t_dev) for k in keys if k in batch}
    on_s = {k: v.to(s_dev) for k, v in on_t.items()}
    teacher.train()
    student.train()
    t_logits = teacher(input_ids=on_t["input_ids"], attention_mask=on_t["attention_mask"]).logits
    t_ce = cross_entropy(t_logits, on_t["labels"], on_t.get("loss_mask"))
    _update(t_ce, "teacher", teacher, teacher_optimizer, max_grad_norm, step)
    s_logits = student(input_ids=on_s["input_ids"], attention_mask=on_s["attention_mask"]).logits
    labels, mask = on_s["labels"], on_s.get("loss_mask")
    kd_mask = labels >= 0 if mask is None else (labels >= 0) & (mask > 0)
    target = t_logits.detach().to(s_dev)  # (B, T, V)
    kd = logit_kl(s_logits, target, kd_mask, temperature=temperature)
    ce = cross_entropy(s_logits, labels, mask)
    loss = alpha * kd + (1 - alpha) * ce
    _update(loss, "student", student, student_optimizer, max_grad_norm, step)
    return CodistillStep(step, alpha, t_ce.item(), ce.item(), kd.item(), loss.item())


def _update(
    loss: torch.Tensor,
    who: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    step: int,
) -> None:
    """One optimizer step of ``model`` on ``loss``; a non-finite loss is refused before the
    update, so the weights (and the last checkpoint) stay usable."""
    if not torch.isfinite(loss):
        raise LogitStoreError(
            f"the {who}'s loss is {loss.item()} at step {step}: training diverged. Lower its "
            "learning rate, or clip gradients (max_grad_norm), and resume from the checkpoint"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def _device(model: torch.nn.Module) -> torch.device:
    params = list(model.parameters())
    return params[0].device if params else torch.device("cpu")


def _check_trainable(model: torch.nn.Module, who: str) -> None:
    half = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype in _HALF_DTYPES]
    if half:
        raise LogitStoreError(
            f"the {who} has {str(half[0][1]).removeprefix('torch.')} weights ({half[0][0]}, "
            "...): most optimizer updates vanish (or overflow) at 16 bits. Load it in float32 "
            "(from_pretrained(..., dtype=torch.float32)) and use autocast for speed"
        )


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def window_batches(
    sequences: Sequences, batch_size: int, seq_len: int, seed: int = 0
) -> Callable[[int], Batch]:
    """A batch function for :func:`codistill`: step ``t`` gets ``batch_size`` windows of at
    most ``seq_len`` tokens drawn from ``sequences`` by a generator seeded with
    ``(seed, t)`` — a pure function of the step, which is what makes resuming exact.

    Raises:
        LogitStoreError: ``seq_len`` < 2 or ``batch_size`` < 1.
    """
    if seq_len < 2 or batch_size < 1:
        raise LogitStoreError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    starts, ends = [], []
    for a, b in zip(sequences.offsets[:-1], sequences.offsets[1:], strict=True):
        w = np.arange(a, b - 1, seq_len - 1, dtype=np.int64)  # windows overlap by one token
        starts.append(w)
        ends.append(np.minimum(w + seq_len, b))
    start, end = np.concatenate(starts), np.concatenate(ends)
    tokens = torch.from_numpy(sequences.input_ids)

    def batch_at(step: int) -> Batch:
        pick = np.random.default_rng([seed, step]).integers(0, len(start), batch_size)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        attn = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
        for i, w in enumerate(pick):
            a, e = int(start[w]), int(end[w])
            n = e - a
            ids[i, :n] = tokens[a:e]
            attn[i, :n] = 1
            labels[i, : n - 1] = tokens[a + 1 : e]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    return batch_at


def codistill(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Batch],
    steps: int,
    *,
    alpha: Callable[[int], float] = _HALF,
    temperature: float = 1.0,
    max_grad_norm: float | None = 1.0,
    schedulers: Sequence[Any] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    record: Recording | None = None,
    stop_after: int | None = None,
    on_step: Callable[[CodistillStep], None] | None = None,
    progress: bool = True,
) -> list[CodistillStep]:
    """Train ``teacher`` and ``student`` together for ``steps`` steps (or resume a run).

    Args:
        batches: step → batch (see :func:`window_batches`); must be a pure function of the
            step for a resumed run to equal an uninterrupted one.
        alpha: schedule of the KD weight, step → α in [0, 1].
        schedulers: LR schedulers stepped after every step (checkpointed with the rest).
        checkpoint: a file; if it exists, the run resumes from it. Written atomically
            every ``checkpoint_every`` steps and after the last.
        record: stores of the teacher's distributions to write as training goes.
        stop_after: stop (after checkpointing) once this many steps are done: to end a run
            early and resume it later.
        on_step: called with each step's :class:`CodistillStep`.

    Returns:
        The steps run by this call (not those before a resume).

    Raises:
        LogitStoreError: a checkpoint from a run of another length, or an unreadable one.
    """
    if steps < 1 or checkpoint_every < 1:
        raise LogitStoreError(f"need steps >= 1 and checkpoint_every >= 1, got {steps}")
    _check_trainable(teacher, "teacher")
    _check_trainable(student, "student")
    ckpt = None if checkpoint is None else Path(checkpoint)
    done = 0
    if ckpt is not None and ckpt.exists():
        done = load_checkpoint(
            ckpt, steps, teacher, student, teacher_optimizer, student_optimizer, schedulers
        )
    last = steps if stop_after is None else min(steps, stop_after)
    ran: list[CodistillStep] = []
    bar = tqdm(total=steps, initial=done, unit="step", desc="codistill", disable=not progress)
    with bar:
        for step in range(done, last):
            result = codistillation_step(
                teacher,
                student,
                batches(step),
                float(alpha(step)),
                teacher_optimizer,
                student_optimizer,
                temperature=temperature,
                max_grad_norm=max_grad_norm,
                step=step,
            )
            for s in schedulers:
                s.step()
            ran.append(result)
            if on_step is not None:
                on_step(result)
            bar.update(1)
            bar.set_postfix(
                teacher=f"{result.teacher_ce:.3f}",
                student=f"{result.student_ce:.3f}",
                refresh=False,
            )
            count = step + 1
            if record is not None and (
                count == steps or (record.every is not None and count % record.every == 0)
            ):
                record_teacher(teacher, record, count)
            if ckpt is not None and (count % checkpoint_every == 0 or count == last):
                save_checkpoint(
                    ckpt,
                    count,
                    steps,
                    teacher,
                    student,
                    teacher_optimizer,
                    student_optimizer,
                    schedulers,
                )
    return ran


def record_teacher(teacher: torch.nn.Module, record: Recording, step: int) -> Path:
    """Write the teacher's distributions over ``record.sequences`` at ``step`` into
    ``record.out_dir/teacher-step{step:06d}.zarr`` (resuming an interrupted one)."""
    device = _device(teacher)

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits

    vocab = int(teacher.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    wrapped = Teacher(
        fn=fn,
        vocab_size=vocab,
        device=device,
        name=record.name,
        tokenizer=record.tokenizer,
        extra={"step": step, "weights_digest": _state_digest(teacher)},
    )
    out = Path(record.out_dir) / f"teacher-step{step:06d}.zarr"
    existing = _complete_digest(out)
    if existing == wrapped.extra["weights_digest"]:
        return out  # recorded before a crash, by the same weights: a resumed run replays them
    was_training = teacher.training
    teacher.eval()
    try:
        capture(
            wrapped,
            record.sequences,
            out,
            record.encoding,
            batch_size=record.batch_size,
            progress=False,
            # A complete store of other weights is from an earlier run of this directory.
            overwrite=existing is not None,
        )
        return out
    finally:
        teacher.train(was_training)


def _complete_digest(out: Path) -> str | None:
    """The teacher weights digest of a complete store at ``out``, else None."""
    from ..format.storage import open_group, read_metadata

    if not (out / "zarr.json").exists():
        return None
    try:
        md = read_metadata(open_group(out))
    except LogitStoreError:
        return None
    return str(md.teacher.get("weights_digest")) if md.state == "complete" else None


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
