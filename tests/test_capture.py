"""The writer against the live teacher: what is stored is what the teacher computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding


def _teacher_probs(teacher: logitstore.Teacher, ids: np.ndarray, temperature: float = 1.0):
    """Probabilities of the teacher run on one sequence alone, as float64 ``(T, V)``."""
    with torch.no_grad():
        x = torch.from_numpy(ids)[None]
        logits = teacher.fn(x, torch.ones_like(x))[0].to(torch.float32) / temperature
    return torch.softmax(logits.double(), -1).numpy()


@pytest.fixture()
def sequences(teacher, data_file: Path) -> logitstore.Sequences:
    docs = logitstore.read_documents([data_file])
    return logitstore.tokenize(docs, teacher.tokenizer, seq_len=40)


def test_full_fp32_equals_teacher_softmax_per_sequence(teacher, sequences, tmp_path: Path) -> None:
    # Batches of 4 right-padded sequences; each sequence is recomputed alone for comparison,
    # so a leak between sequences (or from padding) would show up as a difference.
    out = logitstore.capture(
        teacher, sequences, tmp_path / "s", Encoding("full", "fp32"), batch_size=4, progress=False
    )
    store = logitstore.open(out)
    assert store.num_sequences == len(sequences) > 4
    for i in range(store.num_sequences):
        batch = store.sequence(i)
        expected = _teacher_probs(teacher, batch.input_ids)
        np.testing.assert_allclose(batch.probs, expected, rtol=2e-5, atol=1e-7)
        assert (batch.residual == 0).all()
        assert (batch.ids == np.arange(store.vocab_size)).all()


def test_topk_ids_are_torch_topk_and_residual_is_exact_tail(teacher, sequences, tmp_path) -> None:
    k = 8
    out = logitstore.capture(
        teacher, sequences, tmp_path / "s", Encoding("topk", "fp32", k=k), progress=False
    )
    store = logitstore.open(out)
    got = store.read(0, len(store))
    for i in range(store.num_sequences):
        s0, s1 = store.offsets[i], store.offsets[i + 1]
        p = _teacher_probs(teacher, got.input_ids[s0:s1])  # (T, V) float64
        top = torch.topk(torch.from_numpy(p), k).indices.numpy()
        assert (np.sort(got.ids[s0:s1], axis=1) == np.sort(top, axis=1)).all()
        # ids are stored ascending (FORMAT.md §5.1)
        assert (np.diff(got.ids[s0:s1], axis=1) > 0).all()
        np.testing.assert_allclose(
            got.probs[s0:s1], np.take_along_axis(p, got.ids[s0:s1], 1), rtol=2e-5, atol=1e-8
        )
        tail = p.sum(1) - np.take_along_axis(p, top, 1).sum(1)
        np.testing.assert_allclose(got.residual[s0:s1], tail, rtol=1e-4, atol=1e-7)


def test_temperature_is_applied_before_the_softmax(teacher, sequences, tmp_path) -> None:
    out = logitstore.capture(
        teacher,
        sequences,
        tmp_path / "s",
        Encoding("full", "fp32", temperature=2.0),
        progress=False,
    )
    store = logitstore.open(out)
    batch = store.sequence(0)
    np.testing.assert_allclose(
        batch.probs, _teacher_probs(teacher, batch.input_ids, 2.0), rtol=2e-5, atol=1e-7
    )
    assert store.metadata.encoding.temperature == 2.0


def test_sampled_counts_are_an_unbiased_estimate(tmp_path: Path) -> None:
    # One known distribution at every position: the mean of counts/n over many positions
    # must match p within sampling error (fixed seed, so the test is deterministic).
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
    vocab = len(p)
    logits = p.log()

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits.expand(*ids.shape, vocab)

    teacher = logitstore.Teacher(fn=fn, vocab_size=vocab, device=torch.device("cpu"))
    n, positions = 16, 20_000
    seqs = logitstore.sequences_from_token_ids([np.zeros(positions, dtype=np.int64)], 500)
    out = logitstore.capture(
        teacher,
        seqs,
        tmp_path / "s",
        Encoding("sampled", "count", samples=n),
        seed=7,
        progress=False,
    )
    batch = logitstore.open(out).read(0, positions)
    est = np.zeros((positions, vocab))
    np.add.at(est, (np.arange(positions)[:, None], batch.ids), batch.probs)
    assert np.allclose(est.sum(1), 1.0)
    mean = est.mean(0)
    stderr = np.sqrt(p.numpy() * (1 - p.numpy()) / (n * positions))
    z = (mean - p.numpy()) / stderr
    assert np.abs(z).max() < 4.5, z
    # and draws really are random: positions differ from one another
    assert len({tuple(r) for r in est[:100]}) > 50


def test_sampled_draws_are_a_function_of_seed_and_position(teacher, sequences, tmp_path) -> None:
    enc = Encoding("sampled", "count", samples=32)
    a = logitstore.capture(
        teacher, sequences, tmp_path / "a", enc, batch_size=1, seed=3, progress=False
    )
    b = logitstore.capture(
        teacher, sequences, tmp_path / "b", enc, batch_size=5, seed=3, progress=False
    )
    c = logitstore.capture(
        teacher, sequences, tmp_path / "c", enc, batch_size=5, seed=4, progress=False
    )
    ra, rb, rc = (logitstore.open(x).read(0, len(sequences.input_ids)) for x in (a, b, c))
    assert (ra.ids == rb.ids).all() and (ra.probs == rb.probs).all()
    assert not (ra.ids == rc.ids).all()


@pytest.mark.parametrize("values", ["fp16", "bf16", "u8", "u5"])
def test_lossy_values_decode_close_to_the_teacher(teacher, sequences, tmp_path, values) -> None:
    out = logitstore.capture(
        teacher, sequences, tmp_path / "s", Encoding("topk", values, k=16), progress=False
    )
    store = logitstore.open(out)
    batch = store.read(0, len(store))
    exact = logitstore.open(
        logitstore.capture(
            teacher, sequences, tmp_path / "x", Encoding("topk", "fp32", k=16), progress=False
        )
    ).read(0, len(store))
    assert (batch.ids == exact.ids).all()
    # rows are rescaled to 1 - residual (FORMAT.md §5.2)
    np.testing.assert_allclose(batch.probs.sum(1) + batch.residual, 1.0, atol=1e-5)
    kl = np.sum(exact.probs * (np.log(exact.probs) - np.log(batch.probs)), axis=1)
    assert kl.mean() < {"fp16": 1e-6, "bf16": 1e-4, "u8": 1e-3, "u5": 0.05}[values]
    assert logitstore.verify(out).ok
