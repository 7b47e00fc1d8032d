"""KD losses: parity with torch.nn.functional and with an independent NumPy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstore
from logitstore import losses


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same numbers whatever runs before it (or alone)."""
    torch.manual_seed(0)


def _topk_targets(teacher_logits: torch.Tensor, k: int):  # type: ignore[no-untyped-def]
    p = torch.softmax(teacher_logits.double(), -1)
    top = torch.topk(p, k, dim=-1)
    ids, probs = top.indices, top.values
    residual = 1 - probs.sum(-1)
    return ids, probs, residual.clamp_min(0)


def _numpy_bucketed_kl(p_full: np.ndarray, ids: np.ndarray, student: np.ndarray) -> np.ndarray:
    """KL over the stored ids + one bucket, written independently with NumPy loops."""
    out = np.zeros(ids.shape[:-1])
    for idx in np.ndindex(ids.shape[:-1]):
        z = student[idx] - student[idx].max()
        q = np.exp(z) / np.exp(z).sum()
        s = ids[idx]
        p_s, q_s = p_full[idx][s], q[s]
        r, q_r = 1 - p_s.sum(), 1 - q_s.sum()
        out[idx] = np.sum(p_s * np.log(p_s / q_s)) + (r * np.log(r / q_r) if r > 0 else 0)
    return out


def test_full_distribution_equals_kl_div() -> None:
    b, t, v = 2, 5, 50
    teacher, student = torch.randn(b, t, v) * 3, torch.randn(b, t, v) * 2
    p = torch.softmax(teacher, -1)
    ids = torch.arange(v).expand(b, t, v)
    ours = losses.forward_kl(student, ids, p, torch.zeros(b, t), reduction="sum")
    ref = F.kl_div(torch.log_softmax(student, -1), p, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bucketed_kl_matches_numpy_formula() -> None:
    b, t, v, k = 2, 4, 40, 6
    teacher, student = torch.randn(b, t, v) * 3, torch.randn(b, t, v)
    ids, probs, residual = _topk_targets(teacher, k)
    ours = losses.forward_kl(student, ids, probs.float(), residual.float(), reduction="none")
    ref = _numpy_bucketed_kl(
        torch.softmax(teacher.double(), -1).numpy(), ids.numpy(), student.double().numpy()
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64() -> None:
    b, t, v, k = 1, 3, 7, 3
    ids, probs, residual = _topk_targets(torch.randn(b, t, v) * 2, k)
    student = torch.randn(b, t, v, dtype=torch.float64, requires_grad=True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return losses.forward_kl(z, ids, probs, residual, chunk_size=2)

    def g(z: torch.Tensor) -> torch.Tensor:
        return losses.reverse_kl(z, ids, probs, residual, chunk_size=None)

    assert torch.autograd.gradcheck(f, (student,))
    assert torch.autograd.gradcheck(g, (student,))


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.reverse_kl])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum", "none"])
def test_chunked_equals_unchunked(fn, reduction) -> None:  # type: ignore[no-untyped-def]
    b, t, v, k = 3, 7, 30, 5
    ids, probs, residual = _topk_targets(torch.randn(b, t, v) * 3, k)
    mask = torch.rand(b, t) > 0.3
    za = torch.randn(b, t, v, requires_grad=True)
    zb = za.detach().clone().requires_grad_(True)
    a = fn(za, ids, probs.float(), residual.float(), mask, reduction=reduction, chunk_size=4)
    c = fn(zb, ids, probs.float(), residual.float(), mask, reduction=reduction, chunk_size=None)
    torch.testing.assert_close(a, c)
    a.sum().backward()
    c.sum().backward()
    torch.testing.assert_close(za.grad, zb.grad)


def test_padding_slots_pointing_at_token_zero_do_not_change_the_loss() -> None:
    v = 10
    student = torch.randn(1, 1, v)
    p = torch.tensor([0.5, 0.3])
    a = losses.forward_kl(student, torch.tensor([[[0, 4]]]), p[None, None], torch.tensor([[0.2]]))
    b = losses.forward_kl(
        student,
        torch.tensor([[[0, 4, 0, 0]]]),
        torch.tensor([[[0.5, 0.3, 0.0, 0.0]]]),
        torch.tensor([[0.2]]),
    )
    torch.testing.assert_close(a, b)


def test_numerically_safe_with_bf16_minus_inf_logits_and_empty_tails() -> None:
    v, k = 20, 4
    ids, probs, residual = _topk_targets(torch.randn(2, 3, v) * 3, k)
    student = torch.randn(2, 3, v).to(torch.bfloat16)
    student[0, 0, ids[0, 0, 0]] = float("-inf")  # the student rules out the teacher's token
    student[1, 1, :] = 0.0
    full_ids = torch.arange(v).expand(2, 3, v)  # k = V: the tail is empty
    full_p = torch.softmax(torch.randn(2, 3, v), -1)
    for args in ((ids, probs.float(), residual.float()), (full_ids, full_p, torch.zeros(2, 3))):
        for fn in (losses.forward_kl, losses.reverse_kl):
            z = student.clone().requires_grad_(True)
            loss = fn(z, *args)
            loss.backward()
            assert torch.isfinite(loss), fn
            assert z.grad is not None and torch.isfinite(z.grad.float()).all(), fn


def test_temperature_scales_like_hinton() -> None:
    teacher, student = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    p = torch.softmax(teacher / 2, -1)
    ids = torch.arange(12).expand(2, 3, 12)
    ours = losses.forward_kl(student, ids, p, torch.zeros(2, 3), temperature=2.0, reduction="sum")
    ref = F.kl_div(torch.log_softmax(student / 2, -1), p, reduction="sum") * 4
    torch.testing.assert_close(ours, ref)


def test_reverse_kl_is_kl_of_student_to_teacher_on_full_support() -> None:
    teacher, student = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    p = torch.softmax(teacher, -1)
    ids = torch.arange(9).expand(2, 4, 9)
    ours = losses.reverse_kl(student, ids, p, torch.zeros(2, 4), reduction="sum")
    q = torch.softmax(student, -1)
    ref = (q * (q.log() - p.log())).sum()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sampled_cross_entropy_is_unbiased() -> None:
    # E[Σ (count/n)(-log q)] = -Σ p log q: average many independent sampled targets.
    v, n, draws = 8, 16, 4000
    p = torch.softmax(torch.randn(v) * 2, -1)
    student = torch.randn(1, 1, v)
    samples = torch.multinomial(
        p.expand(draws, v), n, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.zeros(draws, v).scatter_add_(1, samples, torch.ones(draws, n))
    ids = torch.arange(v).expand(1, draws, v)
    est = losses.forward_kl(
        student.expand(1, draws, v), ids, counts[None] / n, torch.zeros(1, draws), reduction="none"
    )[0]
    entropy_part = torch.xlogy(counts / n, counts / n).sum(-1)
    ce_est = (est - entropy_part).mean()
    ce_true = -(p * torch.log_softmax(student[0, 0], -1)).sum()
    stderr = (est - entropy_part).std() / draws**0.5
    assert abs(float(ce_est - ce_true)) < 4 * float(stderr)


def test_cross_entropy_and_teacher_argmax() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, -1] = -100
    ours = losses.cross_entropy(logits, labels)
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, ref)
    ids = torch.tensor([[[3, 7, 9]]])
    probs = torch.tensor([[[0.2, 0.5, 0.1]]])
    assert losses.teacher_argmax(ids, probs).tolist() == [[7]]


def test_codistillation_mix_and_schedules() -> None:
    logits, labels = torch.randn(1, 4, 6), torch.randint(0, 6, (1, 4))
    ids, probs, residual = _topk_targets(torch.randn(1, 4, 6), 3)
    probs, residual = probs.float(), residual.float()
    kd = losses.forward_kl(logits, ids, probs, residual)
    ce = losses.cross_entropy(logits, labels)
    mix = losses.codistillation_loss(logits, labels, ids, probs, residual, alpha=0.25)
    torch.testing.assert_close(mix, 0.25 * kd + 0.75 * ce)
    with pytest.raises(logitstore.LogitStoreError, match="alpha"):
        losses.codistillation_loss(logits, labels, ids, probs, residual, alpha=1.5)
    warm = losses.LinearWarmup(0.0, 0.8, steps=100)
    assert warm(0) == 0.0 and warm(50) == pytest.approx(0.4) and warm(1000) == 0.8
    cos = losses.CosineSchedule(0.0, 1.0, steps=10)
    assert cos(0) == pytest.approx(0.0) and cos(5) == pytest.approx(0.5) and cos(99) == 1.0
    assert losses.ConstantSchedule(0.3)(12345) == 0.3


def test_distilling_from_a_tokens_only_store_is_refused() -> None:
    logits = torch.randn(2, 3, 10, requires_grad=True)
    empty = (torch.zeros(2, 3, 0, dtype=torch.long), torch.zeros(2, 3, 0), torch.zeros(2, 3))
    for loss in (losses.forward_kl, losses.reverse_kl):
        with pytest.raises(logitstore.LogitStoreError, match="tokens-only store"):
            loss(logits, *empty)


def test_schedules_by_name() -> None:
    ramps = {k: losses.alpha_schedule(k, 0.8, 10) for k in losses.SCHEDULES}
    assert [ramps["constant"](s) for s in (0, 10)] == [0.8, 0.8]
    for kind in ("linear", "cosine"):
        assert ramps[kind](0) == 0.0 and ramps[kind](10) == pytest.approx(0.8)
        assert 0.0 < ramps[kind](5) < 0.8
    with pytest.raises(logitstore.LogitStoreError, match="unknown schedule 'step'"):
        losses.alpha_schedule("step", 0.5, 10)
