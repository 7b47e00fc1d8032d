"""Pre-training and evaluating the benchmark teacher: random windows of the token stream,
AdamW with warm-up and cosine decay, bf16 autocast where it is measured to be faster, and
held-out loss, entropy and top-k mass of the trained distributions."""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchlib.report import log

if TYPE_CHECKING:
    from benchlib.teacher import TeacherSettings

EVAL_TEMPERATURES = (1.0, 0.7, 0.5)
EVAL_TOP_K = 64
LOG_EVERY_S = 20.0


def sample_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> Any:
    """``batch`` random windows of ``length`` tokens from the stream (seeded generator)."""
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=gen)
    return tokens[starts[:, None] + torch.arange(length)]  # (batch, length)


def autocast_ctx(use_bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU, or a no-op."""
    if use_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_time(model: Any, batch: torch.Tensor, use_bf16: bool) -> float:
    """Seconds of one forward+backward (gradients discarded, weights untouched)."""
    start = time.perf_counter()
    with autocast_ctx(use_bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def choose_autocast(settings: TeacherSettings, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Decide on bf16 autocast; in ``auto`` mode time both and keep the faster.

    bf16 is only faster on CPUs with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere it
    emulates and is slower, so measure instead of guessing. A separate generator keeps the
    measurement from perturbing the training data order.
    """
    if settings.autocast != "auto":
        return {"bf16": settings.autocast == "bf16", "measured": None}
    gen = torch.Generator().manual_seed(settings.seed + 1)
    batch = sample_windows(tokens, settings.batch_size, settings.n_positions, gen)
    for use_bf16 in (False, True):  # warm up kernels and the allocator for both paths
        train_step_time(model, batch, use_bf16)
    # Interleave the two and keep each one's minimum: on a shared 2-core machine, other
    # processes stall torch's threads for whole steps, and the minimum is the least noisy.
    fp32_s = bf16_s = math.inf
    for _ in range(4):
        fp32_s = min(fp32_s, train_step_time(model, batch, use_bf16=False))
        bf16_s = min(bf16_s, train_step_time(model, batch, use_bf16=True))
    log(
        "teacher",
        f"forward+backward per step: fp32 {fp32_s * 1e3:.0f} ms, bf16 {bf16_s * 1e3:.0f} ms",
    )
    return {"bf16": bf16_s < fp32_s, "measured": {"fp32_s": fp32_s, "bf16_s": bf16_s}}


def lr_at(settings: TeacherSettings, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` over ``progress`` in [0, 1].

    Progress is driven by whichever budget (steps or wall time) runs out first, so a
    time-budgeted run still ends its schedule at the low learning rate.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: Any, settings: TeacherSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def train_model(
    model: Any, tokens: torch.Tensor, settings: TeacherSettings, use_bf16: bool
) -> dict[str, Any]:
    """Train until the step or time budget is spent; returns training statistics."""
    optimizer = make_optimizer(model, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    budget_s, max_steps = settings.time_budget_s, settings.steps
    model.train()
    step, tokens_seen, ema_loss = 0, 0, float("nan")
    start = last_log = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(
            step / max_steps if max_steps else 0.0, elapsed / budget_s if budget_s else 0.0
        )
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, step, progress)
        batch = sample_windows(tokens, settings.batch_size, settings.n_positions, gen)
        with autocast_ctx(use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        value = loss.item()
        ema_loss = value if math.isnan(ema_loss) else 0.95 * ema_loss + 0.05 * value
        now = time.perf_counter()
        if now - last_log >= LOG_EVERY_S:
            last_log = now
            rate = tokens_seen / (now - start)
            lr = optimizer.param_groups[0]["lr"]
            log("teacher", f"step {step}  {rate:,.0f} tok/s  loss {ema_loss:.3f}  lr {lr:.2e}")
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": seconds,
        "tokens_per_second": tokens_seen / seconds if seconds else 0.0,
        "final_train_loss_ema": ema_loss,
    }


def eval_windows(tokens: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows spread evenly over the held-out stream.

    Fixed positions (no randomness) so that evaluations of different teachers compare.
    """
    available = len(tokens) // length
    if available == 0:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window")
    picks = np.linspace(0, available - 1, num=min(count, available)).round().astype(np.int64)
    return torch.stack([tokens[i * length : (i + 1) * length] for i in picks])  # (W, length)


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """Held-out loss plus entropy and top-k mass of the predictive distributions.

    Runs in fp32 without autocast: these numbers characterise the saved teacher, and bf16
    rounding would blur the entropies being measured.
    """
    nll_sum, count = 0.0, 0
    entropy_sum = dict.fromkeys(EVAL_TEMPERATURES, 0.0)
    topk_sum = dict.fromkeys(EVAL_TEMPERATURES, 0.0)
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits.float()[:, :-1]  # (B, T-1, V)
        targets = batch[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(-1, targets[..., None]).sum().item()
        count += targets.numel()
        for temp in EVAL_TEMPERATURES:
            logp_t = torch.log_softmax(logits / temp, dim=-1)
            probs = logp_t.exp()
            entropy_sum[temp] += -(probs * logp_t).sum().item()
            topk_sum[temp] += probs.topk(EVAL_TOP_K, dim=-1).values.sum().item()
    return {
        "held_out_loss": nll_sum / count,
        "held_out_tokens": count,
        "entropy": {str(t): entropy_sum[t] / count for t in EVAL_TEMPERATURES},
        f"top{EVAL_TOP_K}_mass": {str(t): topk_sum[t] / count for t in EVAL_TEMPERATURES},
    }
