"""Encode → store → decode round trips, within the tolerances of docs/FORMAT.md §7."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import logitstore
from logitstore import Encoding
from logitstore.format.codec import decode_ids, decode_values
from logitstore.format.metadata import SQRT_BINS
from logitstore.write.encode import encode_rows, quantize

VALUES = ["fp32", "fp16", "bf16", "u8", "u6", "u4"]


@st.composite
def logit_rows(draw: st.DrawFn) -> np.ndarray:
    rows = draw(st.integers(1, 40))
    vocab = draw(st.integers(2, 300))
    x = draw(arrays(np.float32, (rows, vocab), elements=st.floats(-30, 30, width=32)))
    # Some tokens are impossible (-inf), but every row keeps at least one finite logit.
    mask = draw(arrays(np.bool_, (rows, vocab)))
    mask[:, 0] = False
    x[mask & draw(st.booleans())] = -np.inf
    return x


def _store(logits: np.ndarray, enc: Encoding, tmp: str, **kw):  # type: ignore[no-untyped-def]
    rows, vocab = logits.shape
    seqs = logitstore.sequences_from_token_ids([np.zeros(rows + 1, dtype=np.int64)], None)
    ids = np.zeros(rows + 1, dtype=np.int64)
    t = torch.from_numpy(np.concatenate([logits, logits[:1]]))
    with logitstore.StoreWriter(
        tmp + "/s",
        encoding=enc,
        vocab_size=vocab,
        input_ids=ids,
        offsets=seqs.offsets,
        chunk_positions=8,
        shard_positions=16,
        **kw,
    ) as w:
        w.write(0, encode_rows(t, enc, 0, torch.arange(rows + 1)))
    store = logitstore.open(tmp + "/s")
    assert logitstore.verify(tmp + "/s").ok
    return store, store.read(0, rows)


def _exact(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), -1).numpy()


@settings(max_examples=40, deadline=None)
@given(logits=logit_rows(), k=st.integers(1, 64), values=st.sampled_from(VALUES))
def test_topk_roundtrip(logits: np.ndarray, k: int, values: str) -> None:
    rows, vocab = logits.shape
    k = min(k, vocab)
    p = _exact(logits)
    with tempfile.TemporaryDirectory() as tmp:
        store, got = _store(logits, Encoding("topk", values, k=k), tmp)
        raw = decode_values(np.asarray(store._arrays["values"][:rows]), values)
        _, pad = decode_ids(np.asarray(store._arrays["ids"][:rows]))
    top = -np.sort(-p, axis=1)[:, :k]  # (rows, k) the k largest probabilities
    stored_p = np.where(pad, 0, np.take_along_axis(p, got.ids, 1))
    # every stored id carries its own probability and together they are the k largest;
    # padding slots stand for impossible tokens, so they match the zeros among the top k
    np.testing.assert_allclose(np.sort(stored_p, 1), np.sort(top, 1), atol=1e-6)
    np.testing.assert_allclose(got.residual, 1 - top.sum(1), atol=2e-6)
    assert np.all(pad == np.sort(top == 0, 1))  # padding is a suffix, one slot per zero
    tol = {
        "fp32": 2e-6 * stored_p + 1e-9,
        "fp16": 2**-11 * stored_p + 2**-24,
        "bf16": 2**-8 * stored_p + 1e-38,
    }
    if values in SQRT_BINS:
        bins = SQRT_BINS[values]
        assert np.all(np.abs(np.sqrt(raw) - np.sqrt(stored_p)) <= 0.5 / bins + 1e-7)
        assert np.all((raw > 0) == (stored_p > 0))
    else:
        assert np.all(np.abs(raw - stored_p) <= tol[values])
    if values != "fp32":  # lossy values are rescaled to the stored residual
        np.testing.assert_allclose(got.probs.sum(1) + got.residual, 1, atol=1e-5)
    assert np.all(got.probs[pad] == 0) and np.all(got.ids[pad] == 0)


@settings(max_examples=25, deadline=None)
@given(logits=logit_rows(), values=st.sampled_from(VALUES))
@example(logits=np.zeros((1, 64), np.float32), values="u6")  # worst case of FORMAT.md §7's sum
@example(  # 293 small entries just under a bin edge: the rescale moves 0.085 onto the top one
    logits=np.array([[3.46875] + [-1.53125] * 293], np.float32), values="u6"
)
def test_full_roundtrip(logits: np.ndarray, values: str) -> None:
    p = _exact(logits)
    with tempfile.TemporaryDirectory() as tmp:
        store, got = _store(logits, Encoding("full", values), tmp)
        codes = store.read_stored(0, len(logits)).values
    np.testing.assert_allclose(got.probs.sum(1), 1, atol=1e-5)
    if values in SQRT_BINS:
        # FORMAT.md §5.2: each code's √-bin centre is within half a bin of √p, and the row is
        # those centres rescaled to sum to 1. (A bound on got − p itself does not hold: many
        # small entries near their bins' lower edges move a large share of mass together.)
        q = decode_values(codes, values).astype(np.float64)
        assert np.all(np.abs(np.sqrt(q) - np.sqrt(p)) <= 0.5 / SQRT_BINS[values] + 1e-6)
        np.testing.assert_allclose(got.probs, q / q.sum(1, keepdims=True), rtol=1e-5, atol=1e-9)
    else:
        atol = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 4e-3}[values]
        np.testing.assert_allclose(got.probs, p, atol=atol)


@settings(max_examples=25, deadline=None)
@given(logits=logit_rows(), n=st.integers(1, 300), seed=st.integers(0, 2**40))
def test_sampled_roundtrip(logits: np.ndarray, n: int, seed: int) -> None:
    rows = logits.shape[0]
    p = _exact(logits)
    with tempfile.TemporaryDirectory() as tmp:
        _, got = _store(logits, Encoding("sampled", "count", samples=n), tmp, seed=seed)
    counts = np.rint(got.probs * n).astype(np.int64)
    assert (counts.sum(1) == n).all()
    hit = counts > 0
    # only possible tokens are drawn; ids are unique and ascending within a row
    assert (np.take_along_axis(p, got.ids, 1)[hit] > 0).all()
    for r in range(rows):
        assert (np.diff(got.ids[r][hit[r]]) > 0).all()


@given(
    p=arrays(np.float32, 50, elements=st.floats(0, 1, width=32)),
    values=st.sampled_from(sorted(SQRT_BINS)),
)
def test_sqrt_code_bounds(p: np.ndarray, values: str) -> None:
    bins = SQRT_BINS[values]
    codes = quantize(torch.from_numpy(p), values).numpy()
    q = decode_values(codes, values)
    assert np.all((codes == 0) == (p == 0)) and codes.max(initial=0) <= bins
    assert np.all(np.abs(np.sqrt(q) - np.sqrt(p)) <= 0.5 / bins + 1e-7)
