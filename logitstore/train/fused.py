"""The KD loss at the price of cross-entropy: ``α · T² · forward KL + (1 − α) · CE`` in one pass.

:func:`distillation_loss` computes both terms from one log-softmax per chunk of positions and
writes the gradient with respect to the student's logits during the forward pass, the way a
fused cross-entropy kernel does. Nothing of size ``(B, T, V)`` is saved for backward but the
gradient itself (in the logits' dtype), and backward is one in-place scale of it. The float32
work happens ``chunk_size`` positions at a time, so the only full-size float32 tensor a
float32 student makes is that gradient (which autograd would have made anyway); a
``torch.bfloat16`` student makes none.

The gradient, with ``q = softmax(z)``, ``z = logits / T``, stored candidates ``S``, their
probabilities ``p``, residual ``r``, ``P = Σ_S p`` and the student's tail ``q_r = Σ_{j∉S} q_j``::

    ∂KL/∂z_j = (P + r) q_j − p_j            j ∈ S
    ∂KL/∂z_j = (P + r − r / q_r) q_j        j ∉ S
    ∂CE/∂x_j = softmax(x)_j − [j = label]

Terms the plain losses clamp (a student probability below 1e-30) contribute no gradient here
either, so :func:`distillation_loss` matches ``α · forward_kl + (1 − α) · cross_entropy`` in
value and gradient (``tests/test_losses.py`` checks both).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LogitStoreError
from .losses import _LOG_TINY, Reduction, _check_ids_fit

__all__ = ["distillation_loss"]

# float32 elements per chunk when chunk_size is None: 4 Mi elements = 16 MB, which keeps a
# chunk's passes (log-softmax, exp, tail sum, scale) close to the CPU's caches and bounds the
# working set on a GPU (V = 128k: 32 positions per chunk).
_CHUNK_ELEMENTS = 1 << 22


def _row_weights(mask: torch.Tensor, shape: torch.Size, reduction: Reduction) -> torch.Tensor:
    """Per-position weights ``(B, T)`` that turn a sum of row losses into ``reduction``."""
    m = (mask > 0).to(torch.float32).expand(shape)
    if reduction == "sum":
        return m
    if reduction == "token_mean":
        return m / m.sum().clamp_min(1)
    if reduction == "sequence_mean":
        per_seq = m.sum(-1, keepdim=True)  # (B, 1)
        return m / per_seq.clamp_min(1) / (per_seq > 0).sum().clamp_min(1)
    raise LogitStoreError(
        f"distillation_loss reduces to a scalar: reduction must be token_mean, sequence_mean "
        f"or sum, got {reduction!r}; for per-position losses use forward_kl and cross_entropy "
        "with reduction='none'"
    )


def _chunk_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    p: torch.Tensor,
    r: torch.Tensor,
    w_kl: torch.Tensor,
    w_ce: torch.Tensor,
    temperature: float,
    want_grad: bool,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """KL rows, CE rows ``(c,)`` and the weighted gradient ``(c, V)`` (float32) of one chunk.

    ``x (c, V)`` logits, ``y (c,)`` labels (clamped to ≥ 0), ``idx (c, m)`` stored ids, ``p``
    their probabilities, ``r (c,)`` the residual; ``w_kl`` already includes α · T² and the
    reduction, ``w_ce`` (1 − α) and the reduction. ``out``, where given, is the float32
    slice of the gradient buffer to compute in (no chunk temporary, no copy back).
    """
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 → float32, chunk-sized
    z = x32 if temperature == 1.0 else x32 / temperature
    p, r, w_kl, w_ce = (t.to(x32.dtype) for t in (p, r, w_kl, w_ce))  # float64 stays float64
    valid = p > 0  # (c, m): padding slots hold probability 0
    any_valid = valid.any(-1, keepdim=True)  # (c, 1)
    # Padding slots point at the row's first real id, so scattering into the stored ids
    # never touches a token outside S (the first real slot is the most probable one).
    # Their scattered values must then equal that slot's, so they copy it too (below).
    first_slot = valid.to(torch.uint8).argmax(-1, keepdim=True)  # (c, 1)
    idx = torch.where(valid, idx, torch.gather(idx, -1, first_slot))
    # (c, V): the one full-width float32 tensor of the chunk, in the gradient's slice if it can
    lq = torch.log_softmax(z, -1) if out is None else torch.log_softmax(z, -1, out=out)
    lq_s = torch.gather(lq, -1, idx)  # (c, m)
    ce_lq = lq if temperature == 1.0 else torch.log_softmax(x32, dim=-1)
    ce = -torch.gather(ce_lq, -1, y[:, None]).squeeze(-1)  # (c,)
    q = lq.exp_()  # in place: lq is q from here on
    q_s = lq_s.exp()  # (c, m)
    # The student's tail: zero the stored ids (rows with nothing stored keep theirs) and sum.
    q.scatter_(-1, idx, torch.where(any_valid, 0.0, q_s))
    q_r = q.sum(-1)  # (c,)
    log_qr = torch.log(q_r)
    # The floors of forward_kl: a clamped log-probability is a constant (no gradient).
    p_eff = torch.where(valid & (lq_s > _LOG_TINY), p, 0.0)
    r_eff = torch.where((r > 0) & (log_qr > _LOG_TINY), r, 0.0)
    kl = (
        torch.xlogy(p, p).sum(-1)
        - (torch.where(valid, p, 0.0) * lq_s.clamp_min(_LOG_TINY)).sum(-1)
        + torch.xlogy(r, r)
        - torch.where(r > 0, r * log_qr.clamp_min(_LOG_TINY), 0.0)
    )
    if not want_grad:
        return kl, ce, None
    a = w_kl / temperature  # d(loss)/dz per row, times dz/dx = 1/T; w_kl holds the T²
    mass = p_eff.sum(-1) + r_eff  # (c,)
    tail_ratio = torch.where(r_eff > 0, r_eff / q_r.clamp_min(1e-38), 0.0)
    grad = q  # reuse the chunk's buffer: (c, V)
    if temperature == 1.0:
        # One softmax serves both terms.
        grad.mul_((a * (mass - tail_ratio) + w_ce)[:, None])
        at_s = q_s * (a * mass + w_ce)[:, None] - a[:, None] * p_eff
    else:
        grad.mul_((a * (mass - tail_ratio))[:, None])
        at_s = a[:, None] * (q_s * mass[:, None] - p_eff)
    at_s = torch.where(valid, at_s, torch.gather(at_s, -1, first_slot))  # padding copies
    grad.scatter_(-1, idx, torch.where(any_valid, at_s, torch.gather(grad, -1, idx)))
    if temperature != 1.0:
        grad.add_(ce_lq.exp_().mul_(w_ce[:, None]))
    grad.scatter_add_(-1, y[:, None], -w_ce[:, None])
    return kl, ce, grad


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ids: torch.Tensor,
        probs: torch.Tensor,
        residual: torch.Tensor,
        w_kl: torch.Tensor,
        w_ce: torch.Tensor,
        temperature: float,
        step: int,
        want_grad: bool,
    ) -> torch.Tensor:
        n = logits.shape[0]
        grad = torch.empty_like(logits) if want_grad else None  # (n, V), the logits' dtype
        in_place = grad is not None and grad.dtype == torch.float32
        dtype = torch.promote_types(logits.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            kl, ce, g = _chunk_grad(
                logits[s:e],
                labels[s:e],
                ids[s:e],
                probs[s:e],
                residual[s:e],
                w_kl[s:e],
                w_ce[s:e],
                temperature,
                want_grad,
                grad[s:e] if in_place and grad is not None else None,
            )
            # Positions that do not count add exactly 0, even where their loss is not finite.
            total += torch.where(w_kl[s:e] > 0, w_kl[s:e] * kl, 0.0).sum()
            total += torch.where(w_ce[s:e] > 0, w_ce[s:e] * ce, 0.0).sum()
            if grad is not None and g is not None and not in_place:
                grad[s:e].copy_(g)  # float32 → the logits' dtype
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad = ctx.grad
        if grad is None:
            raise LogitStoreError(
                "distillation_loss's gradient was already taken (it is scaled in place to "
                "save a (B, T, V) copy): call the loss again instead of backward(retain_graph)"
            )
        ctx.grad = None
        if grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            grad.mul_(grad_out.to(grad.dtype))
        return (grad, *([None] * 9))


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    residual: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``alpha · forward_kl + (1 − alpha) · cross_entropy``, fused: one log-softmax, one pass.

    The same value and gradient as the two plain losses added up (each reduced over its own
    positions: KL where ``mask`` is set, CE where ``labels >= 0`` too), at about the cost of
    cross-entropy alone: see benchmarks/bench_loss.py.

    Args:
        student_logits: ``(B, T, V)``, any float dtype.
        labels: ``(B, T)`` hard labels, -100 where there is none.
        ids, probs, residual: the stored teacher targets, as a LogitDataset batch holds them.
        mask: ``(B, T)``, nonzero where a position counts (``batch["loss_mask"]``).
        alpha: weight of the KD term, in [0, 1].
        temperature: as in :func:`forward_kl` (KL at T, scaled by T²; CE at 1).
        reduction: ``token_mean``, ``sequence_mean`` or ``sum``.
        chunk_size: positions per chunk; ``None`` picks ~4M logits per chunk.

    Raises:
        LogitStoreError: alpha outside [0, 1], a tokens-only store (m = 0), stored ids the
            student's vocabulary lacks, or ``reduction='none'``.

    Example:
        >>> loss = distillation_loss(model(x).logits, b["labels"], b["ids"], b["probs"],
        ...                          b["residual"], b["loss_mask"], alpha=0.5)
    """
    if not 0.0 <= alpha <= 1.0:
        raise LogitStoreError(f"alpha must be in [0, 1], got {alpha}")
    if ids.shape[-1] == 0:
        raise LogitStoreError(
            "the teacher targets have no candidates (m = 0): a tokens-only store has no "
            "distributions to distil from; train on it with cross_entropy(logits, labels)"
        )
    if temperature <= 0:
        raise LogitStoreError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    _check_ids_fit(ids, vocab)
    shape = student_logits.shape[:-1]  # (B, T)
    m = torch.ones(shape, device=student_logits.device) if mask is None else mask
    w_kl = _row_weights(m, shape, reduction) * (alpha * temperature**2)  # (B, T)
    w_ce = _row_weights((labels >= 0) & (m > 0), shape, reduction) * (1.0 - alpha)
    n = shape.numel()
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    want_grad = student_logits.requires_grad and torch.is_grad_enabled()
    out: torch.Tensor = _FusedKD.apply(  # type: ignore[no-untyped-call]
        student_logits.reshape(n, vocab),  # (n, V)
        labels.reshape(n).clamp_min(0).long(),
        ids.reshape(n, -1).long(),  # (n, m)
        probs.reshape(n, -1).float(),
        residual.reshape(n).float(),
        w_kl.reshape(n).float(),
        w_ce.reshape(n).float(),
        float(temperature),
        step,
        want_grad,
    )
    return out
