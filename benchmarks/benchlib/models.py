"""The one builder of the benchmarks' GPT-2 models (teachers, students, forward-pass
references), from a config only: no download, no network."""

from __future__ import annotations

from typing import Any

import torch


def gpt2(
    vocab_size: int,
    *,
    n_positions: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    eos_id: int = 0,
    dropout: float = 0.0,
    seed: int | None = None,
) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` in train mode.

    Args:
        eos_id: the model's bos and eos token (GPT2Config's 50256 lies outside a small
            vocabulary).
        dropout: residual, embedding and attention dropout alike. 0 by default: dropout only
            slows models this small that see each token about once.
        seed: ``torch.manual_seed(seed)`` just before the weights are drawn; ``None`` draws
            from the global generator as it stands.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(config)
