"""What each peer tool trains its student towards, given the same top-k rows: the training
target as a distribution that :func:`logitstore.losses.forward_kl` takes, so a student trained
"as axolotl would" runs through the same loop as ours::

    from benchlib.peer_targets import PEER_TARGETS

    ids, probs, residual = PEER_TARGETS["renormalised top-k"](b["ids"], b["probs"], b["residual"])
    loss = losses.forward_kl(logits, ids, probs, residual, b["loss_mask"])

Every function takes ``ids`` and ``probs`` ``(..., m)`` (a top-k batch as the Dataset
collates it: ids in any order, probability 0 in padding slots) and ``residual`` ``(...)``
(the exact mass outside ``ids``), and returns ``(ids, probs, residual)`` of the same shapes:
``forward_kl`` puts the residual in one extra bucket, so a residual of 0 means "train
towards the named ids only". The mapping onto the peers' losses:

- axolotl 0.21.0 (``src/axolotl/integrations/kd/chat_template.py``,
  ``ChatTemplateStrategyWithKDv2.transform_logprobs``: ``teacher_probs_t1 /
  teacher_probs_t1_sum``, then log) renormalises the top-k to sum to 1, and its losses
  (``kernels/liger.py``, ``topk_logprob/forward_kl.py``) take the student's log-softmax over
  the whole vocabulary gathered at those ids: minimising ``-Σ p̂ log q`` pulls the student
  onto the top-k with nothing left for the tail — :func:`renormalised_topk`.
- DistillKit at a61c2e7 (``distillkit/lossfuncs/common.py`` ``get_target_logprobs``; the
  default ``missing_probability_handling: zero``, ``configuration.py``) subtracts the
  top-k's logsumexp: the same renormalised top-k. Its ``symmetric_uniform`` option keeps
  ``1 − Σ exp(values)`` as a (k+1)-th bucket in teacher and student alike:
  :func:`derived_residual` (the leftover of the stored, rounded values, not the exact one).
- Megatron-LM's offline KD (NVIDIA/Megatron-LM ``megatron/training/distillation/
  cached_logits_loss.py``: ``CachedLogitsKDLoss`` calls ``topk_kl_div(...,
  add_ghost_token=True)``, which appends ``1 − Σ exp(fp16 log-probs)``, clamped to ≥ 1e-8,
  as a "ghost token" to teacher and student alike): :func:`derived_residual` of the fp16
  values. Without the ghost token its partial KL ``Σ_top-k p (log p − log q)`` is minimised
  by the renormalised top-k.
- Stored values rounded to a float type before the tool sees them (fp16 log-probabilities in
  naive int32+fp16 layouts, DistillKit's bf16 exact head): :func:`rounded_logprobs`, composed
  with either of the above.

The functions are torch-only and do not touch their inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "PEER_TARGETS",
    "Target",
    "derived_residual",
    "exact_residual",
    "renormalised_topk",
    "rounded_logprobs",
    "truncated",
]

#: ``(ids, probs, residual)``: the arguments ``forward_kl`` takes after the batch.
Target = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def exact_residual(ids: torch.Tensor, probs: torch.Tensor, residual: torch.Tensor) -> Target:
    """logitstore's own target: the stored top-k plus the exact residual as one bucket."""
    return ids, probs, residual


def renormalised_topk(ids: torch.Tensor, probs: torch.Tensor, residual: torch.Tensor) -> Target:
    """axolotl's target, and DistillKit's with its default ``missing_probability_handling:
    zero``: the top-k divided by its sum, no residual. A row whose stored mass is 0 (a
    padding position) stays 0."""
    total = probs.sum(-1, keepdim=True)  # (..., 1)
    out = torch.where(total > 0, probs / total.clamp_min(1e-30), probs)
    return ids, out, torch.zeros_like(residual)


def derived_residual(ids: torch.Tensor, probs: torch.Tensor, residual: torch.Tensor) -> Target:
    """Megatron-LM's offline KD (its ghost token), DistillKit with
    ``missing_probability_handling: symmetric_uniform``, and any tool that
    keeps ``1 − Σ top-k`` of the values it was given: the residual recomputed from the
    (possibly rounded) stored probabilities, clamped to [0, 1], instead of the exact one."""
    derived = (1.0 - probs.sum(-1)).clamp(0.0, 1.0)  # (...)
    return ids, probs, derived.to(residual.dtype)


def rounded_logprobs(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``probs -> exp(round_dtype(log probs))``: what a reader gets back from
    log-probabilities stored as ``dtype`` (``torch.float16``, ``torch.bfloat16``). Zero
    probabilities stay 0."""

    def rnd(probs: torch.Tensor) -> torch.Tensor:
        logp = torch.log(probs.clamp_min(1e-30)).to(dtype).to(probs.dtype)
        return torch.where(probs > 0, logp.exp(), torch.zeros_like(probs))

    return rnd


def truncated(ids: torch.Tensor, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely of each row's candidates ``(..., m)`` → ``(..., k)``, most likely
    first (how the peers' writers keep a top-k): for training a store's top-64 as a top-32."""
    p, order = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (..., k)
    return ids.gather(-1, order), p


#: The training targets of the student study: label → function.
PEER_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Target]] = {
    "exact residual (logitstore)": exact_residual,
    "renormalised top-k (axolotl; DistillKit default)": renormalised_topk,
    "derived residual (Megatron ghost token; DistillKit symmetric_uniform)": derived_residual,
}
