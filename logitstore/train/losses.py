"""Distillation losses over student logits and stored teacher targets.

Every loss takes student logits ``(B, T, V)`` (any float dtype) and the teacher's stored
candidates ``ids (B, T, m)``, ``probs (B, T, m)`` and ``residual (B, T)`` as a
:class:`logitstore.LogitDataset` batch provides them, plus an optional ``mask (B, T)`` of the
positions that count. Work is done in float32 over chunks of positions; each chunk is
recomputed in the backward pass (activation checkpointing), so at most one float32
``(chunk, V)`` tensor is alive at a time, whatever the sequence length.

Forward KL with the residual bucket (the default KD loss)::

    KL = Σ_i p_i log(p_i / q_i) + r log(r / q_r),   q_r = 1 − Σ_i q_i

where ``i`` runs over the stored ids, ``q = softmax(student / T)`` and ``r`` is the stored
residual. With a ``full`` store ``r = 0`` and this is exactly ``F.kl_div``; with a
``sampled`` store ``p_i = count / n`` and the cross-entropy part is an unbiased estimate of
the full cross-entropy (Anshumann et al., ACL 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import LogitStoreError

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearWarmup",
    "Reduction",
    "alpha_schedule",
    "codistillation_loss",
    "cross_entropy",
    "distillation_loss",
    "forward_kl",
    "logit_kl",
    "reverse_kl",
    "teacher_argmax",
]

Reduction = Literal["token_mean", "sequence_mean", "sum", "none"]
_NEG_INF = float("-inf")
# Probabilities are floored here before their log is taken (log(1e-30) ≈ -69 nats).
_TINY = 1e-30
_LOG_TINY = math.log(_TINY)


def _student_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q at the stored ids ``(n, m)`` and log q_r of everything else ``(n,)``, both
    floored at log(1e-30) so that -inf logits and empty tails give finite losses and
    gradients (a student that gives a teacher token probability < 1e-30 is charged as if
    it gave 1e-30)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → float32
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    ids = ids.long()  # gather and scatter index with int64; datasets may hand over int32
    log_q = (torch.gather(z, -1, ids) - lse).clamp_min(_LOG_TINY)  # (n, m)
    # The tail: every token that is not a real candidate (padding slots point at id 0 and
    # must not remove token 0 from the tail, hence a count, not a scatter of -inf).
    stored = torch.zeros_like(z).scatter_add_(-1, ids, valid.to(z.dtype)) > 0  # (n, V)
    empty = stored.all(dim=-1, keepdim=True)  # (n, 1): every token is a candidate
    # logsumexp over nothing has a NaN gradient: give empty rows a dummy tail, masked below.
    tail = torch.logsumexp(z.masked_fill(stored & ~empty, _NEG_INF), dim=-1)  # (n,)
    log_qr = torch.where(empty.squeeze(-1), _LOG_TINY, (tail - lse.squeeze(-1)))
    return log_q, log_qr.clamp_min(_LOG_TINY)


def _forward_kl_rows(
    logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    valid = probs > 0
    log_q, log_qr = _student_logprobs(logits, ids, valid, temperature)
    p, r = probs.to(log_q.dtype), residual.to(log_q.dtype)
    # xlogy: 0·log 0 = 0, so padding and an empty tail contribute nothing.
    kl = torch.xlogy(p, p).sum(-1) - torch.where(valid, p * log_q, 0).sum(-1)
    return kl + torch.xlogy(r, r) - torch.where(r > 0, r * log_qr, 0)  # (n,)


def _reverse_kl_rows(
    logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    valid = probs > 0
    log_q, log_qr = _student_logprobs(logits, ids, valid, temperature)
    q, q_r = log_q.exp(), log_qr.exp()
    log_p = torch.log(probs.to(log_q.dtype).clamp_min(_TINY))
    log_r = torch.log(residual.to(log_q.dtype).clamp_min(_TINY))
    kl = torch.where(valid, q * (log_q - log_p), 0).sum(-1)
    return kl + q_r * (log_qr - log_r)  # (n,)


def _check_ids_fit(ids: torch.Tensor, vocab: int) -> None:
    """Refuse stored ids the student's logits ``(…, vocab)`` have no entry for.

    Without this, gather fails with an index error on a CPU, and on a GPU with a device-side
    assert that poisons the CUDA context. It costs one host sync per call (the max of ids).
    """
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocab:
        raise LogitStoreError(
            f"the teacher's stored token ids reach {top}, but the student's logits have only "
            f"{vocab} entries. A teacher whose output layer is padded past its tokenizer "
            "(Qwen 2.5 7B: 152,064 outputs; Qwen 2.5 0.5B: 151,936) predicts ids such a "
            f"student lacks: build the data with LogitDataset(..., student_vocab_size={vocab}) "
            "to fold their mass into the residual, or use a student with the teacher's "
            "vocabulary"
        )


def _chunked(
    rows: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    tensors: tuple[torch.Tensor, ...],
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """Per-position losses ``(B, T)``, computed ``chunk_size`` positions at a time."""
    if tensors[0].shape[-1] == 0:
        raise LogitStoreError(
            "the teacher targets have no candidates (m = 0): a tokens-only store (hard labels "
            "from `logitstore generate`) has no distributions to distil from; train on it with "
            "cross_entropy(logits, batch['labels'])"
        )
    _check_ids_fit(tensors[0], logits.shape[-1])
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (n, V)
    parts = [t.reshape(flat.shape[0], *t.shape[len(shape) :]) for t in tensors]
    n = flat.shape[0]
    step = n if not chunk_size or chunk_size >= n else chunk_size
    out = []
    for s in range(0, n, step):
        args = (flat[s : s + step], *(t[s : s + step] for t in parts))
        if flat.requires_grad and step < n:
            out.append(checkpoint(rows, *args, temperature, use_reentrant=False))
        else:
            out.append(rows(*args, temperature))
    return torch.cat(out).reshape(shape)


def _reduce(losses: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """``losses (B, T)`` → a scalar (or ``(B, T)`` for ``none``), counting only ``mask``."""
    m = torch.ones_like(losses) if mask is None else (mask > 0).to(losses.dtype)  # 0/1 only
    losses = torch.where(m > 0, losses, 0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "token_mean":
        return losses.sum() / m.sum().clamp_min(1)
    if reduction == "sequence_mean":
        per_seq = losses.sum(-1) / m.sum(-1).clamp_min(1)  # (B,)
        return per_seq.sum() / (m.sum(-1) > 0).sum().clamp_min(1)
    raise LogitStoreError(f"unknown reduction {reduction!r}: expected {Reduction}")


def forward_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """KL(teacher ‖ student) over the stored ids plus the residual as one extra bucket.

    Args:
        student_logits: ``(B, T, V)``.
        ids, probs: ``(B, T, m)`` stored candidates (``probs`` 0 in padding slots).
        residual: ``(B, T)`` teacher mass outside ``ids`` (zeros for sampled/full stores).
        mask: ``(B, T)``, nonzero where the position counts.
        temperature: divides the student's logits; the result is multiplied by T² (Hinton
            et al., 2015) so gradients keep their scale. The teacher side was fixed when the
            store was written (its metadata's temperature).
        reduction: ``token_mean``, ``sequence_mean``, ``sum`` or ``none``.
        chunk_size: positions per chunk (``None``: all at once).

    Example:
        >>> loss = forward_kl(model(x).logits, b["ids"], b["probs"], b["residual"], b["loss_mask"])
    """
    rows = _chunked(
        _forward_kl_rows, student_logits, (ids, probs, residual), temperature, chunk_size
    )
    return _reduce(rows, mask, reduction) * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """KL(student ‖ teacher) over the stored ids plus the residual bucket (mode-seeking).

    Where the teacher stored probability 0 (a padding slot never counts; an empty residual
    does) the student is charged ``log(1e-30)``, so it learns to put no mass there. Do not
    use it with ``sampled`` stores: their residual is 0 by construction (not a statement that
    the tail is impossible), so every unsampled token would be penalised.
    """
    rows = _chunked(
        _reverse_kl_rows, student_logits, (ids, probs, residual), temperature, chunk_size
    )
    return _reduce(rows, mask, reduction) * temperature**2


def logit_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
) -> torch.Tensor:
    """KL(teacher ‖ student) over the whole vocabulary, from both models' logits ``(B, T, V)``:
    online distillation, where the teacher runs beside the student (co-distillation).

    ``teacher_logits`` is detached here: no gradient of this loss reaches the teacher. Both
    sides are divided by ``temperature``; the result is multiplied by T².
    """
    z_s = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    z_t = teacher_logits.detach().to(torch.float32)
    log_q = torch.log_softmax(z_s / temperature, dim=-1)
    log_p = torch.log_softmax(z_t / temperature, dim=-1)
    p = log_p.exp()
    rows = torch.where(p > 0, p * (log_p - log_q), 0).sum(-1)  # (B, T); 0·log 0 = 0
    return _reduce(rows, mask, reduction) * temperature**2


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "token_mean",
) -> torch.Tensor:
    """Hard-label cross-entropy; ``labels (B, T)`` with -100 where there is no target."""
    valid = labels >= 0
    if mask is not None:
        valid = valid & (mask > 0)
    ce = F.cross_entropy(
        student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)).flatten(0, -2),
        labels.clamp_min(0).flatten(),
        reduction="none",
    ).reshape(labels.shape)
    return _reduce(ce, valid, reduction)


def teacher_argmax(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The teacher's most likely stored token at each position ``(B, T)`` (hard labels)."""
    return torch.gather(ids.long(), -1, probs.argmax(-1, keepdim=True)).squeeze(-1)


def codistillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None = None,
    **kl_kwargs: object,
) -> torch.Tensor:
    """``alpha · forward_kl + (1 − alpha) · cross_entropy`` — the co-distillation mix.

    With the default token-mean reduction this is :func:`distillation_loss` (fused: one
    log-softmax, the gradient written in the forward pass)."""
    if not 0.0 <= alpha <= 1.0:
        raise LogitStoreError(f"alpha must be in [0, 1], got {alpha}")
    if kl_kwargs.get("reduction", "token_mean") == "token_mean":
        return distillation_loss(
            student_logits,
            labels,
            ids,
            probs,
            residual,
            mask,
            alpha=alpha,
            **kl_kwargs,  # type: ignore[arg-type]
        )
    kd = forward_kl(student_logits, ids, probs, residual, mask, **kl_kwargs)  # type: ignore[arg-type]
    ce = cross_entropy(student_logits, labels, mask)
    return alpha * kd + (1 - alpha) * ce


@dataclass(frozen=True)
class ConstantSchedule:
    """α(step) = ``alpha``."""

    alpha: float

    def __call__(self, step: int) -> float:
        return self.alpha


@dataclass(frozen=True)
class LinearWarmup:
    """α rises linearly from ``start`` to ``end`` over ``steps``, then stays at ``end``: the
    teacher's labels are noisy early in co-distillation, so they are trusted gradually."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / max(self.steps, 1), 1.0)
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class CosineSchedule:
    """α follows half a cosine from ``start`` to ``end`` over ``steps``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / max(self.steps, 1), 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))


#: The α schedules by name: how α reaches its final value over a run.
SCHEDULES = ("constant", "linear", "cosine")


def alpha_schedule(kind: str, alpha: float, steps: int) -> Callable[[int], float]:
    """α(step) by name: ``constant`` (α throughout), or ``linear``/``cosine`` ramps from 0 to
    α over ``steps`` (what a command line's ``--schedule`` takes).

    Raises:
        LogitStoreError: an unknown ``kind``.
    """
    if kind == "constant":
        return ConstantSchedule(alpha)
    if kind == "linear":
        return LinearWarmup(0.0, alpha, steps)
    if kind == "cosine":
        return CosineSchedule(0.0, alpha, steps)
    raise LogitStoreError(f"unknown schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")


# Last, because the fused loss builds on the helpers above (and is re-exported from here).
from .fused import distillation_loss  # noqa: E402
