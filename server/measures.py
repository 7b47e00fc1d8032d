"""What the store browser shows, computed from decoded rows (NumPy only, no torch): per-position
measures, a position's candidate list, the KL between two stores, histograms over a sample,
and tokens as text decoded with the store's own tokenizer.

Every function here reads in row chunks of at most :data:`CHUNK_ELEMENTS` candidates, so a
request's memory is bounded whatever the encoding (a ``full`` store of a 262k vocabulary
decodes 16 positions at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

import logitstore

__all__ = [
    "CHUNK_ELEMENTS",
    "EPS",
    "TEXT_MAX",
    "TokenText",
    "candidate_list",
    "kl_between",
    "measures",
    "row_chunks",
    "sample_histograms",
]

#: most candidate entries (rows × width) decoded at once
CHUNK_ELEMENTS = 1 << 22
#: KL takes the second store's zeros as this: a token one store gives mass and the other
#: none would otherwise make the KL infinite (sampled stores hold zeros)
EPS = 1e-8
#: a token's text is cut to this many characters (a hostile tokenizer may hold huge tokens)
TEXT_MAX = 200


def row_chunks(store: logitstore.StoreBase, start: int, stop: int) -> Iterable[tuple[int, int]]:
    """``[start, stop)`` cut into ranges of at most :data:`CHUNK_ELEMENTS` candidates."""
    enc = store.encoding
    width = store.vocab_size if enc.kind == "full" else (enc.k or enc.samples or 1)
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


class TokenText:
    """Token id → its text, decoded one token at a time with the store's tokenizer (special
    tokens included) and cached; ``<id>`` when the store holds no tokenizer."""

    def __init__(self, store: logitstore.StoreBase) -> None:
        self.tokenizer = store.tokenizer()
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Iterable[int]) -> list[str]:
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            if self.tokenizer is None:
                texts = [f"<{i}>" for i in missing]
            else:
                texts = self.tokenizer.decode_batch([[i] for i in missing], False)
            for i, text in zip(missing, texts, strict=True):
                self._cache[i] = text if len(text) <= TEXT_MAX else text[:TEXT_MAX] + "…"
        return [self._cache[i] for i in ids]


def _entropy(probs: np.ndarray, residual: np.ndarray) -> np.ndarray:
    # (n, m), (n,) -> (n,): the residual counts as one more bucket, as in the KD losses.
    p = np.where(probs > 0, probs, 1).astype(np.float64)
    h = -(probs * np.log(p)).sum(axis=1)
    r = np.where(residual > 0, residual, 1).astype(np.float64)
    out: np.ndarray = h - residual * np.log(r)
    return out


def _next_prob(batch: logitstore.Batch, nxt: np.ndarray, full: bool) -> tuple[np.ndarray, ...]:
    # p(next token) (n,) and whether it is among the stored candidates (n,)
    n = len(nxt)
    if full:
        return batch.probs[np.arange(n), nxt].astype(np.float64), np.ones(n, dtype=bool)
    hit = (batch.ids == nxt[:, None]) & (batch.probs > 0)  # (n, m)
    return (batch.probs * hit).sum(axis=1, dtype=np.float64), hit.any(axis=1)


def measures(store: logitstore.StoreBase, start: int, stop: int) -> dict[str, Any]:
    """Per position of ``[start, stop)``: token id, loss mask, the next token of the same
    sequence (``-1`` at a sequence's end), and, for stores with candidates, entropy (nats,
    residual as one bucket), top-1 probability, residual and the surprisal ``-log p(next)``.

    Where the next token is not among the stored candidates, ``next_stored`` is false and the
    surprisal is the lower bound ``-log residual`` (the next token has at most that mass), or
    ``None`` for encodings without a residual.
    """
    stop_read = min(stop + 1, len(store))
    ids, mask = store.read_tokens(start, stop_read)
    seq_end = store.offsets[np.searchsorted(store.offsets, np.arange(start, stop), "right")]
    has_next = np.arange(start, stop) + 1 < seq_end  # (n,)
    nxt = np.where(has_next, np.append(ids[1:], 0)[: stop - start], -1)
    out: dict[str, Any] = {
        "input_ids": ids[: stop - start].tolist(),
        "loss_mask": mask[: stop - start].astype(int).tolist(),
        "next_ids": nxt.tolist(),
    }
    if store.encoding.kind == "none":
        return out
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("entropy", "top1", "residual", "surprisal", "next_stored")
    }
    full = store.encoding.kind == "full"
    for a, b in row_chunks(store, start, stop):
        batch = store.read(a, b)
        cols["entropy"].append(_entropy(batch.probs, batch.residual))
        cols["top1"].append(batch.probs.max(axis=1, initial=0.0))
        cols["residual"].append(batch.residual)
        p, stored = _next_prob(batch, np.maximum(nxt[a - start : b - start], 0), full)
        # not stored: at most the residual's mass (top-k); unknown for the other encodings
        bound = np.where(stored, p, np.where(batch.residual > 0, batch.residual, np.nan))
        s = -np.log(np.maximum(bound, 1e-30))
        cols["surprisal"].append(np.where(has_next[a - start : b - start], s, np.nan))
        cols["next_stored"].append(stored)
    for key, parts in cols.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        if key == "next_stored":
            out[key] = values.astype(bool).tolist()
        else:
            out[key] = [None if math.isnan(v) else round(v, 6) for v in values.tolist()]
    return out


def candidate_list(
    store: logitstore.StoreBase, position: int, text: TokenText, limit: int
) -> dict[str, Any]:
    """The candidates of one position, most likely first, at most ``limit`` of them;
    ``rest`` is the stored mass beyond them, ``residual`` the mass outside the store."""
    batch = store.read(position, position + 1)
    probs, ids = batch.probs[0], batch.ids[0]
    order = np.argsort(-probs, kind="stable")
    order = order[probs[order] > 0]
    shown = order[:limit]
    top_ids = [int(i) for i in ids[shown]]
    return {
        "candidates": [
            {"id": i, "text": t, "p": float(probs[j])}
            for i, t, j in zip(top_ids, text(top_ids), shown, strict=True)
        ],
        "stored": len(order),
        "rest": float(probs[order[limit:]].sum(dtype=np.float64)),
        "residual": float(batch.residual[0]),
    }


def _dense(batch: logitstore.Batch, vocab: int, full: bool) -> np.ndarray:
    # (n, m) candidates → (n, V) distributions; each row's residual is spread evenly over the
    # tokens it did not store (a top-k store says nothing more about them).
    n = len(batch.residual)
    if full:
        return batch.probs.astype(np.float64)
    col = np.arange(batch.ids.shape[1])
    real = ~((batch.ids == 0) & (batch.probs == 0) & (col > 0))  # (n, m): not padding
    base = batch.residual / np.maximum(vocab - real.sum(axis=1), 1)  # (n,)
    dense = np.repeat(base[:, None].astype(np.float64), vocab + 1, axis=1)  # (n, V + 1)
    target = np.where(real, batch.ids, vocab)  # padding lands in the spare column
    np.put_along_axis(dense, target, np.where(real, batch.probs, 0), axis=1)
    return dense[:, :vocab] if n else np.zeros((0, vocab))


def _real(batch: logitstore.Batch) -> np.ndarray:
    # (n, m): which candidate slots hold a stored token (padding decodes to id 0, p 0)
    col = np.arange(batch.ids.shape[1])
    out: np.ndarray = ~((batch.ids == 0) & (batch.probs == 0) & (col > 0))
    return out


def _kl_sparse(a: logitstore.Batch, b: logitstore.Batch, vocab: int) -> np.ndarray:
    # The same sum as over _dense rows, without building them: the tokens a stores, the
    # tokens only b stores, and all the others (each side at its residual's even share).
    ra, rb = _real(a), _real(b)  # (n, ma), (n, mb)
    same = (a.ids[:, :, None] == b.ids[:, None, :]) & ra[:, :, None] & rb[:, None, :]
    base_a = (a.residual / np.maximum(vocab - ra.sum(1), 1)).astype(np.float64)  # (n,)
    base_b = (b.residual / np.maximum(vocab - rb.sum(1), 1)).astype(np.float64)  # (n,)
    pa = np.where(ra, a.probs, 0).astype(np.float64)  # (n, ma)
    pb = np.where(rb, b.probs, 0).astype(np.float64)  # (n, mb)
    in_b = same.any(axis=2)  # (n, ma)
    qa = np.where(in_b, (same * pb[:, None, :]).sum(axis=2), base_b[:, None])  # (n, ma)

    def term(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.where(
            p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.where(q > 0, q, EPS))), 0
        )

    kl = term(pa, qa).sum(axis=1)
    only_b = rb & ~same.any(axis=1)  # (n, mb): stored by b alone
    kl += np.where(only_b, term(base_a[:, None], pb), 0).sum(axis=1)
    others = vocab - ra.sum(1) - only_b.sum(1)  # (n,): stored by neither
    out: np.ndarray = kl + others * term(base_a, base_b)
    return out


def kl_between(
    a: logitstore.StoreBase, b: logitstore.StoreBase, start: int, stop: int
) -> list[float]:
    """KL(a ‖ b) in nats at each position of ``[start, stop)``, over the whole vocabulary:
    each store's residual spread evenly over the tokens it did not store, ``b``'s zeros
    taken as :data:`EPS`."""
    vocab = a.vocab_size
    dense = "full" in (a.encoding.kind, b.encoding.kind)
    width = (
        vocab + 1
        if dense
        else (a.encoding.k or a.encoding.samples or 1) * (b.encoding.k or b.encoding.samples or 1)
    )
    step = max(1, CHUNK_ELEMENTS // width)
    out: list[float] = []
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        ba, bb = a.read(lo, hi), b.read(lo, hi)
        if dense:
            p = _dense(ba, vocab, a.encoding.kind == "full")  # (n, V)
            q = _dense(bb, vocab, b.encoding.kind == "full")  # (n, V)
            logp = np.log(np.where(p > 0, p, 1))
            kl = (p * (logp - np.log(np.where(q > 0, q, EPS)))).sum(axis=1)
        else:
            kl = _kl_sparse(ba, bb, vocab)
        out.extend(round(max(v, 0.0), 6) for v in kl.tolist())
    return out


def _histogram(values: np.ndarray, hi: float, bins: int = 20) -> dict[str, Any]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, hi))
    return {
        "edges": [round(e, 6) for e in edges.tolist()],
        "counts": counts.tolist(),
        "mean": float(values.mean()) if len(values) else None,
    }


def sample_histograms(
    store: logitstore.StoreBase, blocks: int = 16, block: int = 256
) -> dict[str, Any]:
    """Histograms of entropy, residual and top-1 probability over ``blocks`` evenly spaced
    runs of ``block`` positions (every position of a smaller store; the same sample every
    time)."""
    n = len(store)
    if n <= blocks * block:  # small: every position once
        runs = [(0, n)] if n else []
    else:  # evenly spaced runs that never overlap
        runs = [(int(s), int(s) + block) for s in np.linspace(0, n - block, blocks)]
    ent, res, top = [], [], []
    if store.encoding.kind != "none":
        for a, b in runs:
            for lo, hi in row_chunks(store, a, b):
                batch = store.read(lo, hi)
                ent.append(_entropy(batch.probs, batch.residual))
                res.append(batch.residual)
                top.append(batch.probs.max(axis=1, initial=0.0))
    cat = [np.concatenate(x) if x else np.zeros(0) for x in (ent, res, top)]
    e_hi = max(1.0, math.ceil(float(cat[0].max()))) if len(cat[0]) else 1.0
    return {
        "positions": len(cat[0]),
        "entropy": _histogram(cat[0], e_hi),
        "residual": _histogram(cat[1], 1.0),
        "top1": _histogram(cat[2], 1.0),
    }
