"""Provenance in the metadata: the tokenizer's identity (FORMAT.md §3 ``tokenizer``) and how a
generated completion ended (read from the ``generation`` key)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["finish_reason", "tokenizer_identity"]


def tokenizer_identity(tokenizer: Any) -> tuple[dict[str, Any], bytes | None]:
    """A tokenizer's identity (a SHA-256 of its vocabulary) and its ``tokenizer.json``."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    ident = {
        "name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "vocab_hash": "sha256:" + digest,
        "size": len(vocab),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str().encode() if backend is not None else None
    return ident, raw


def finish_reason(completion: Sequence[int], generation: dict[str, Any]) -> str:
    """Why a stored completion ended: ``eos`` (an end-of-text token, kept as its last
    token), ``stop`` (a stop string: the only other way to end before ``max_new_tokens``)
    or ``length``."""
    if completion and completion[-1] in (generation.get("eos_token_ids") or []):
        return "eos"
    if len(completion) < int(generation["max_new_tokens"]):
        return "stop"
    return "length"
