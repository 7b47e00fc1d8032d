"""Fidelity of a store against its teacher's exact distributions (tradeoff.py's sweep).

Tail treatment for KL(teacher ‖ decoded) over the whole vocabulary: a top-k store's residual is
spread evenly over the tokens it does not name; a sampled store is smoothed with 1e-6 of mass
spread evenly (counts/n has zeros where p has not). The bucketed KL is what `forward_kl`
optimises: the stored ids plus one bucket for everything else (top-k and full only).
"""

from __future__ import annotations

import numpy as np
import torch

import logitstore


def order0_bytes(store: logitstore.LogitStore) -> float:
    """Order-0 empirical entropy of the stored fields, bytes per position: the floor of a
    coder that codes each stored number on its own (context coders can go below it)."""
    rows = store.read_stored(0, len(store))
    total = 0.0
    for a in (rows.gaps, rows.values, rows.residual):
        if a is None:
            continue
        symbols = a.view(np.uint8) if a.dtype == np.float32 else a  # residual: its bytes
        _, counts = np.unique(symbols, return_counts=True)
        p = counts / counts.sum()
        total += float(-(counts * np.log2(p)).sum()) / 8
    return total / len(store)


def fidelity(
    store: logitstore.LogitStore, logits: torch.Tensor, temperature: float
) -> dict[str, float]:
    """KL to the exact distribution (whole vocabulary, stated tail), bucketed KL, top-1
    agreement and the mean residual, over every position."""
    n, vocab = logits.shape
    kl_full, kl_bucket, top1, residual, stored = [], [], [], [], []
    kind = store.encoding.kind
    for a in range(0, n, 1024):
        b = min(a + 1024, n)
        batch = store.read(a, b)
        p = torch.softmax(logits[a:b].double() / temperature, -1)  # (c, V)
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids))
        probs = torch.from_numpy(batch.probs).double()
        real = probs > 0
        q = torch.zeros_like(p).scatter_add_(-1, ids, probs)  # (c, V) stored mass
        named = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, ids, real)
        if kind == "sampled":
            q = q * (1 - 1e-6) + 1e-6 / vocab
        else:
            rest = (~named).sum(-1, keepdim=True).clamp_min(1)
            q = torch.where(named, q, torch.from_numpy(batch.residual).double()[:, None] / rest)
        kl = torch.where(p > 0, p * (p.log() - q.clamp_min(1e-300).log()), 0).sum(-1)
        kl_full.append(kl)
        if kind != "sampled":
            p_named = torch.where(named, p, 0)
            r = (1 - p_named.sum(-1)).clamp_min(0)
            r_hat = torch.from_numpy(batch.residual).double()
            bucket = torch.where(named & (p > 0), p * (p.log() - q.clamp_min(1e-300).log()), 0)
            tail = torch.where(r > 0, r * (r.log() - r_hat.clamp_min(1e-300).log()), 0)
            kl_bucket.append(bucket.sum(-1) + tail)
            residual.append(r)
        top1.append((q.argmax(-1) == p.argmax(-1)).double())
        stored.append(real.sum(-1).double())
    cat = lambda xs: float(torch.cat(xs).mean()) if xs else float("nan")  # noqa: E731
    return {
        "kl": cat(kl_full),
        "bucketed_kl": cat(kl_bucket),
        "top1_agreement": cat(top1),
        "residual_mass": cat(residual),
        "entries_per_position": cat(stored),
    }
