"""The fused KD loss: the value and gradient of ``α·forward_kl + (1−α)·cross_entropy``, computed
in one pass (parity with the plain losses, whose own parity with F.kl_div is in test_losses)."""

from __future__ import annotations

import pytest
import torch

import logitstore
from logitstore import losses


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _targets(b: int, t: int, v: int, k: int):  # type: ignore[no-untyped-def]
    """Top-k targets with the awkward rows a real store has: padding slots at id 0, a row
    with nothing stored, a row whose residual is 0; labels with -100; a partial mask."""
    top = torch.softmax(torch.randn(b, t, v) * 2, -1).topk(k, dim=-1)
    ids, probs = top.indices.to(torch.int32), top.values
    probs[0, 0, k // 2 :] = 0  # fewer than k candidates: padding slots ...
    ids[0, 0, k // 2 :] = 0  # ... point at token 0, which stays in the tail
    probs[1, 1, :] = 0  # nothing stored: the whole mass is residual
    ids[1, 1, :] = 0
    residual = (1 - probs.sum(-1)).clamp_min(0)
    probs[1, 2] /= probs[1, 2].sum()  # the stored ids hold all the mass
    residual[1, 2] = 0
    labels = torch.randint(0, v, (b, t))
    labels[0, 3] = -100
    mask = torch.ones(b, t)
    mask[1, t - 3 :] = 0
    return labels, ids, probs, residual, mask


def _plain(x, labels, ids, probs, residual, mask, alpha, temperature, reduction):  # type: ignore[no-untyped-def]
    kl = losses.forward_kl(
        x, ids, probs, residual, mask, temperature=temperature, reduction=reduction
    )
    return alpha * kl + (1 - alpha) * losses.cross_entropy(x, labels, mask, reduction=reduction)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_value_and_gradient_equal_the_plain_losses(
    reduction: losses.Reduction, temperature: float, dtype: torch.dtype, chunk_size: int | None
) -> None:
    b, t, v, k = 2, 9, 300, 8
    targets = _targets(b, t, v, k)
    logits = (torch.randn(b, t, v) * 3).to(dtype)
    x1 = logits.clone().requires_grad_(True)
    ref = _plain(x1, *targets, 0.3, temperature, reduction)
    ref.backward()
    x2 = logits.clone().requires_grad_(True)
    fused = losses.distillation_loss(
        x2, *targets, alpha=0.3, temperature=temperature, reduction=reduction,
        chunk_size=chunk_size,
    )  # fmt: skip
    fused.backward()
    assert x1.grad is not None and x2.grad is not None
    assert x2.grad.dtype == dtype
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5, check_dtype=False)
    # bfloat16 gradients are rounded once here and once there: one unit in the last place.
    tol = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(x2.grad, x1.grad, **tol)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_pure_terms_match_each_loss_alone(alpha: float) -> None:
    labels, ids, probs, residual, mask = _targets(2, 6, 50, 4)
    logits = torch.randn(2, 6, 50)
    alone = (
        losses.cross_entropy(logits, labels, mask)
        if alpha == 0.0
        else losses.forward_kl(logits, ids, probs, residual, mask)
    )
    fused = losses.distillation_loss(logits, labels, ids, probs, residual, mask, alpha=alpha)
    torch.testing.assert_close(fused, alone)


def test_finite_with_minus_inf_logits_and_a_full_vocabulary() -> None:
    v = 20
    labels, ids, probs, residual, _ = _targets(2, 4, v, 4)
    student = torch.randn(2, 4, v).to(torch.bfloat16)
    student[0, 1, ids[0, 1, 0]] = float("-inf")  # the student rules out the teacher's token
    full_ids = torch.arange(v).expand(2, 4, v)  # k = V: the tail is empty
    full_p = torch.softmax(torch.randn(2, 4, v), -1)
    for args in ((ids, probs, residual), (full_ids, full_p, torch.zeros(2, 4))):
        z = student.clone().requires_grad_(True)
        loss = losses.distillation_loss(z, labels, *args)
        loss.backward()
        assert torch.isfinite(loss)
        assert z.grad is not None and torch.isfinite(z.grad.float()).all()


def test_the_mix_of_codistillation_is_the_fused_loss() -> None:
    labels, ids, probs, residual, mask = _targets(2, 6, 40, 4)
    logits = torch.randn(2, 6, 40)
    mix = losses.codistillation_loss(logits, labels, ids, probs, residual, 0.4, mask)
    torch.testing.assert_close(
        mix, _plain(logits, labels, ids, probs, residual, mask, 0.4, 1.0, "token_mean")
    )


def test_without_grad_it_only_computes_the_value() -> None:
    targets = _targets(2, 4, 30, 4)
    x = torch.randn(2, 4, 30, requires_grad=True)
    with torch.no_grad():
        loss = losses.distillation_loss(x, *targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(x.detach(), *targets, 0.5, 1.0, "token_mean"))


def test_a_second_backward_is_refused_not_silently_wrong() -> None:
    x = torch.randn(2, 4, 30, requires_grad=True)
    loss = losses.distillation_loss(x, *_targets(2, 4, 30, 4))
    (2 * loss).backward(retain_graph=True)  # the gradient is scaled in place, once
    with pytest.raises(logitstore.LogitStoreError, match="already taken"):
        loss.backward()


def test_bad_arguments_are_refused_with_what_to_do() -> None:
    labels, ids, probs, residual, _ = _targets(2, 4, 30, 4)
    x = torch.randn(2, 4, 30)
    with pytest.raises(logitstore.LogitStoreError, match="reduction='none'"):
        losses.distillation_loss(x, labels, ids, probs, residual, reduction="none")
    with pytest.raises(logitstore.LogitStoreError, match="alpha"):
        losses.distillation_loss(x, labels, ids, probs, residual, alpha=2.0)
    with pytest.raises(logitstore.LogitStoreError, match="no candidates"):
        losses.distillation_loss(x, labels, ids[..., :0], probs[..., :0], residual)
    with pytest.raises(logitstore.LogitStoreError, match="student_vocab_size"):
        losses.distillation_loss(x[..., :10], labels.clamp_max(9), ids, probs, residual)
