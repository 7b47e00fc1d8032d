"""Exporting a store's text as JSON lines, for inspection or for other tools.

A generated store (one with a loss mask) gives one object per sequence with its prompt and
completion; any other store gives each sequence's text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from ..errors import LogitStoreError
from ..format.provenance import finish_reason
from ..read.store import StoreBase

__all__ = ["export_jsonl", "sequence_records"]


def sequence_records(store: StoreBase, *, ids: bool = False) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per sequence, in store order.

    With a loss mask, the prompt is every token up to and including the first position
    whose prediction counts, and the completion is every token after it (FORMAT.md §4).
    ``ids`` adds the token ids (``prompt_ids``/``completion_ids`` or ``input_ids``).

    Raises:
        LogitStoreError: the store keeps no tokenizer and ``ids`` is false (nothing to print).
    """
    tok = store.tokenizer()
    if tok is None and not ids:
        raise LogitStoreError(
            "the store keeps no tokenizer, so its text cannot be decoded; pass --ids to "
            "export token ids instead"
        )
    md = store.metadata
    gen = md.generation
    samples = int(gen["num_samples"]) if gen else 1

    def text(x: np.ndarray) -> str | None:
        return None if tok is None else str(tok.decode(x.tolist(), skip_special_tokens=False))

    for s in range(store.num_sequences):
        a, b = int(store.offsets[s]), int(store.offsets[s + 1])
        input_ids, mask = store.read_tokens(a, b)
        record: dict[str, Any] = {"sequence": s}
        if md.has_loss_mask and mask.any():
            cut = int(np.flatnonzero(mask)[0]) + 1  # first completion token
            prompt, completion = input_ids[:cut], input_ids[cut:]
            if gen:
                record["prompt_index"], record["sample"] = divmod(s, samples)
            record["prompt"], record["completion"] = text(prompt), text(completion)
            record["prompt_tokens"], record["completion_tokens"] = len(prompt), len(completion)
            if gen:
                record["finish_reason"] = finish_reason(completion.tolist(), gen)
            if ids:
                record["prompt_ids"] = prompt.tolist()
                record["completion_ids"] = completion.tolist()
        else:
            record["text"] = text(input_ids)
            record["tokens"] = len(input_ids)
            if ids:
                record["input_ids"] = input_ids.tolist()
        if tok is None:
            record = {k: v for k, v in record.items() if v is not None}
        yield record


def export_jsonl(store: StoreBase, out: IO[str], *, ids: bool = False) -> int:
    """Write :func:`sequence_records` to ``out``, one JSON object per line; returns the
    number of lines."""
    n = 0
    for record in sequence_records(store, ids=ids):
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n
