"""Encoding teacher distributions into stored rows, in torch, on the teacher's device.

Log-softmax, temperature, top-k or sampling, and quantisation all run where the logits are,
so only the compact rows cross to the host. Encoding is deterministic: the same logits (and,
for ``sampled``, the same seed and positions) give the same bytes (docs/FORMAT.md §5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import LogitStoreError
from ..format.metadata import SQRT_BINS, Encoding

__all__ = ["EncodedRows", "cat_rows", "encode_rows", "quantize", "split_rows", "uniforms"]

_M32 = 0xFFFFFFFF


class EncodedRows(NamedTuple):
    """One batch of encoded rows, as stored. Shapes for ``R`` rows and width ``m``."""

    gaps: torch.Tensor | None  # (R, m) sorted-id gaps (int16 bits of uint16, or int32); full: None
    values: torch.Tensor  # (R, m) in the store's value dtype (int16 bits for uint16 kinds)
    residual: torch.Tensor | None  # (R,) float32 mass outside the stored ids; topk only
    bad: torch.Tensor  # (R,) bool: the logits of this row were not finite


def cat_rows(parts: list[EncodedRows]) -> EncodedRows:
    """The rows of several pieces, one after another, as one piece ``(ΣR, m)``."""
    if len(parts) == 1:
        return parts[0]

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

    return EncodedRows(
        cat([p.gaps for p in parts]),
        torch.cat([p.values for p in parts]),
        cat([p.residual for p in parts]),
        torch.cat([p.bad for p in parts]),
    )


def split_rows(rows: EncodedRows, sizes: list[int]) -> list[EncodedRows]:
    """``rows`` cut into consecutive pieces of ``sizes`` rows each (views, not copies)."""

    def cut(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * len(sizes) if t is None else list(torch.split(t, sizes))

    return [
        EncodedRows(g, v, r, b)
        for g, v, r, b in zip(
            cut(rows.gaps),
            torch.split(rows.values, sizes),
            cut(rows.residual),
            torch.split(rows.bad, sizes),
            strict=True,
        )
    ]


def quantize(p: torch.Tensor, values: str) -> torch.Tensor:
    """Store probabilities ``p`` (float32, any shape) as the value kind ``values``."""
    if values == "fp32":
        return p
    if values == "fp16":
        return p.to(torch.float16)
    if values == "bf16":
        return p.to(torch.bfloat16).view(torch.int16)
    bins = SQRT_BINS.get(values)
    if bins is not None:
        codes = torch.floor(torch.sqrt(p) * bins).clamp_(max=bins - 1) + 1
        return torch.where(p > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    raise LogitStoreError(f"cannot quantize to {values!r}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (xorshift-multiply), in int64 so every product stays below 2**63.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniforms(seed: int, positions: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic uniforms in [0, 1) of shape ``(R, n)``, a function of (seed, position, draw).

    The same (seed, position) gives the same draws on any batch split, so a resumed
    writer reproduces the bytes of an uninterrupted one (FORMAT.md §5.3).
    """
    pos = positions.to(torch.int64)[:, None]  # (R, 1)
    draw = torch.arange(n, device=positions.device, dtype=torch.int64)[None, :]  # (1, n)
    h = _mix32(torch.full_like(pos, seed & _M32))
    h = _mix32(h ^ (pos & _M32))
    h = _mix32(h ^ ((pos >> 32) & _M32))
    h = _mix32(h ^ ((draw * 0x9E3779B1) & _M32))  # (R, n)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _as_u16_bits(x: torch.Tensor) -> torch.Tensor:
    # Values in [0, 65535] as int16 with the same 16 bits (the host views them as uint16),
    # so only two bytes per entry cross to the host.
    return torch.where(x > 32767, x - 65536, x).to(torch.int16)


def _gaps(sorted_ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    # (R, m) ascending ids, valid first → first id, then differences; padding → 0.
    gaps = torch.empty_like(sorted_ids)
    gaps[:, :1] = sorted_ids[:, :1]
    gaps[:, 1:] = sorted_ids[:, 1:] - sorted_ids[:, :-1]
    gaps = torch.where(valid, gaps, torch.zeros_like(gaps))
    return _as_u16_bits(gaps) if vocab <= 65536 else gaps.to(torch.int32)


def encode_rows(
    logits: torch.Tensor, encoding: Encoding, seed: int, positions: torch.Tensor
) -> EncodedRows:
    """Encode ``logits`` ``(R, V)`` (any float dtype, any device) for ``R`` store positions.

    ``positions`` ``(R,)`` are the rows' global positions (used to seed sampling).
    """
    x = logits.to(torch.float32)
    if encoding.temperature != 1.0:
        x = x / encoding.temperature
    bad = ~torch.isfinite(x.amax(dim=-1))  # (R,) NaN or +inf anywhere, or all -inf
    logp = torch.log_softmax(x, dim=-1)  # (R, V)
    del x
    vocab = logp.shape[-1]

    if encoding.kind == "full":
        return EncodedRows(None, quantize(logp.exp(), encoding.values), None, bad)

    if encoding.kind == "topk":
        assert encoding.k is not None
        top_logp, top_ids = torch.topk(logp, encoding.k, dim=-1)  # (R, k), most likely first
        # Exact tail mass from the unquantised distribution: the tail's own sum, not
        # 1 - Σ top-k (which cancels to noise when the tail is small).
        residual = logp.exp().scatter_(-1, top_ids, 0.0).sum(dim=-1)  # (R,)
        valid = top_logp > float("-inf")  # (R, k); impossible tokens become padding
        key = torch.where(valid, top_ids, top_ids + vocab)
        order = torch.argsort(key, dim=-1)
        ids = torch.gather(top_ids, 1, order)
        valid = torch.gather(valid, 1, order)
        p = torch.gather(top_logp, 1, order).exp()
        p = torch.where(valid, p, torch.zeros_like(p))
        gaps = _gaps(ids.to(torch.int32), valid, vocab)
        return EncodedRows(gaps, quantize(p, encoding.values), residual.to(torch.float32), bad)

    # sampled: inverse-CDF draws with hashed uniforms, then unique ids and their counts.
    assert encoding.samples is not None
    n = encoding.samples
    cdf = torch.cumsum(logp.exp(), dim=-1)  # (R, V)
    target = uniforms(seed, positions, n) * cdf[:, -1:]  # (R, n), strictly below the total
    draws = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # (R, n)
    del cdf
    draws, _ = torch.sort(draws, dim=-1)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.cumsum(new.to(torch.int64), dim=-1) - 1  # (R, n) slot of each draw
    width = encoding.width(vocab)
    rows = draws.shape[0]
    counts = torch.zeros(rows, n, dtype=torch.int32, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    ids = torch.zeros(rows, n, dtype=torch.int64, device=draws.device)
    ids.scatter_(1, slot, draws)
    counts, ids = counts[:, :width], ids[:, :width]  # (R, m)
    gaps = _gaps(ids.to(torch.int32), counts > 0, vocab)
    stored = counts.to(torch.uint8) if n <= 255 else _as_u16_bits(counts)
    return EncodedRows(gaps, stored, None, bad)
