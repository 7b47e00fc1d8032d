"""The facts about a store that ``logitstore info --json`` prints and the server sends."""

from __future__ import annotations

from typing import Any

from ..read.store import StoreBase

__all__ = ["store_info"]


def store_info(store: StoreBase) -> dict[str, Any]:
    """Settings, counts, sizes and provenance of ``store``, JSON-ready.

    ``metadata`` is the full group metadata (FORMAT.md §3), for clients that rebuild a store
    object from it; the other keys are for people and dashboards.
    """
    md = store.metadata
    nbytes = store.nbytes_stored()
    counted = store.loss_mask_positions() if md.state == "complete" else None
    full_bf16 = md.num_positions * md.vocab_size * 2
    return {
        "path": str(store.path),
        "format_version": md.format_version,
        "state": md.state,
        "encoding": md.encoding.to_dict(),
        "vocab_size": md.vocab_size,
        "num_positions": md.num_positions,
        "num_sequences": md.num_sequences,
        "seq_len": md.seq_len,
        "shards": {"committed": int(store.committed().sum()), "total": md.num_shards},
        "layout": md.layout.to_dict(),
        "teacher": md.teacher,
        "tokenizer": md.tokenizer,
        "tool": md.tool,
        "created_at": md.created_at,
        "identity": md.identity,
        "seed": md.seed,
        "extensions": list(md.extensions),
        "loss_mask_positions": counted,
        "generation": md.generation,
        "bytes_on_disk": nbytes,
        "bytes_per_position": nbytes / max(md.num_positions, 1),
        "full_vocab_bf16_bytes": full_bf16,
        "compression_ratio_vs_full_bf16": full_bf16 / max(nbytes, 1),
        "metadata": md.to_dict(),
    }
