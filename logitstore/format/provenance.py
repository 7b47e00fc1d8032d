"""Provenance in the metadata: the tokenizer's identity (FORMAT.md §3 ``tokenizer``), the
digest of a generated store's prompts, and how a generated completion ended (read from the
``generation`` key)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "chat_template_text",
    "finish_reason",
    "identity_digest",
    "identity_settings",
    "prompt_string",
    "prompts_digest",
    "tokenizer_identity",
]


def chat_template_text(tokenizer: Any) -> str | None:
    """The Jinja text of ``tokenizer``'s chat template, or ``None`` when it has none.

    A tokenizer with several named templates (a dict) renders conversations with its
    ``"default"`` one, as Hugging Face's ``apply_chat_template`` does without ``tools``.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def tokenizer_identity(tokenizer: Any) -> tuple[dict[str, Any], bytes | None]:
    """A tokenizer's identity (a SHA-256 of its vocabulary, and of its chat template when it
    has one) and its ``tokenizer.json``."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    ident = {
        "name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "vocab_hash": "sha256:" + digest,
        "size": len(vocab),
    }
    template = chat_template_text(tokenizer)
    if template is not None:  # informative: absent for tokenizers without one (bytes as before)
        ident["chat_template_hash"] = "sha256:" + hashlib.sha256(template.encode()).hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str().encode() if backend is not None else None
    return ident, raw


def prompt_string(prompt: str | Sequence[dict[str, Any]]) -> str:
    """The string a prompt contributes to ``generation.prompts.sha256``: a text prompt
    itself; a conversation (a list of messages) its JSON text, ``json.dumps(messages,
    ensure_ascii=False)`` (its rendering depends on the chat template, which the tokenizer's
    ``chat_template_hash`` records)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(list(prompt), ensure_ascii=False)


def prompts_digest(prompts: Sequence[str | Sequence[dict[str, Any]]]) -> str:
    """``generation.prompts.sha256``: the SHA-256 (hex) of the JSON list of prompt strings
    (:func:`prompt_string`)."""
    strings = [prompt_string(p) for p in prompts]
    return hashlib.sha256(json.dumps(strings, ensure_ascii=False).encode()).hexdigest()


def finish_reason(completion: Sequence[int], generation: dict[str, Any]) -> str:
    """Why a stored completion ended: ``eos`` (an end-of-text token, kept as its last
    token), ``stop`` (a stop string: the only other way to end before ``max_new_tokens``)
    or ``length``."""
    if completion and completion[-1] in (generation.get("eos_token_ids") or []):
        return "eos"
    if len(completion) < int(generation["max_new_tokens"]):
        return "stop"
    return "length"


def identity_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """The settings object hashed first into a store's ``identity`` (FORMAT.md §3), taken
    from the ``logitstore`` attribute as stored (``metadata``: its JSON object)."""
    tokenizer = metadata.get("tokenizer")
    settings = {
        "format_version": metadata["format_version"],
        "encoding": metadata["encoding"],
        "layout": metadata["layout"],
        "vocab_size": metadata["vocab_size"],
        "seq_len": metadata["seq_len"],
        "seed": metadata["seed"],
        "teacher": metadata["teacher"],
        "tokenizer": None if tokenizer is None else tokenizer.get("vocab_hash"),
        "tool_version": (metadata.get("tool") or {}).get("version"),
    }
    if metadata.get("generation") is not None:
        settings["generation"] = metadata["generation"]
    return settings


def identity_digest(
    settings: dict[str, Any],
    input_ids: Iterable[np.ndarray],
    offsets: np.ndarray,
    loss_mask: Iterable[np.ndarray] | None,
) -> str:
    """``identity`` (FORMAT.md §3): SHA-256 over the canonical JSON of ``settings`` (sorted
    keys, no spaces, ASCII with ``\\uXXXX`` escapes, floats as Python's shortest
    round-trip repr), then the input ids and offsets as little-endian int64, then the loss
    mask as uint8 when the store has one. Ids and mask may come in pieces, in order."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    for part in input_ids:
        h.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    for part in loss_mask or ():
        h.update(np.ascontiguousarray(part, dtype=np.uint8).tobytes())
    return "sha256:" + h.hexdigest()
