"""Exporting a store's text as JSON lines, for inspection or for other tools.

A generated store gives one object per sequence with its prompt and completion; any other
store gives each sequence's text (and, with a loss mask, the learned spans). Given the
prompts a store was generated from, a conversation prompt comes back as ``messages``: the
conversation with the generated assistant turn appended (a chat dataset for the next run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from ..errors import InputError, LogitStoreError
from ..format.provenance import finish_reason, prompts_digest
from ..read.store import StoreBase

__all__ = ["export_jsonl", "sequence_records"]


def sequence_records(
    store: StoreBase,
    *,
    ids: bool = False,
    prompts: Sequence[str | Sequence[dict[str, Any]]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per sequence, in store order.

    In a generated store, the prompt is every token up to and including the first position
    whose prediction counts, and the completion is every token after it (FORMAT.md §4). In
    another store with a loss mask (a chat store), ``learned`` lists the text of each run of
    tokens the mask counts (the assistant turns).
    ``ids`` adds the token ids (``prompt_ids``/``completion_ids`` or ``input_ids``).
    ``prompts``, the generated store's prompts in order (texts, or conversations as lists
    of messages), adds ``messages`` to the records of conversations: the conversation and
    the completion as an assistant turn (its end-of-text token dropped).

    Raises:
        LogitStoreError: the store keeps no tokenizer and ``ids`` is false (nothing to print).
        InputError: ``prompts`` given for a store that was not generated, or not the
            prompts it was generated from (their count or digest differs).
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
    if prompts is not None:
        _check_prompts(gen, prompts)

    def text(x: np.ndarray) -> str | None:
        return None if tok is None else str(tok.decode(x.tolist(), skip_special_tokens=False))

    for s in range(store.num_sequences):
        a, b = int(store.offsets[s]), int(store.offsets[s + 1])
        input_ids, mask = store.read_tokens(a, b)
        record: dict[str, Any] = {"sequence": s}
        if gen and md.has_loss_mask and mask.any():
            cut = int(np.flatnonzero(mask)[0]) + 1  # first completion token
            prompt, completion = input_ids[:cut], input_ids[cut:]
            if gen:
                record["prompt_index"], record["sample"] = divmod(s, samples)
            record["prompt"], record["completion"] = text(prompt), text(completion)
            record["prompt_tokens"], record["completion_tokens"] = len(prompt), len(completion)
            if gen:
                record["finish_reason"] = finish_reason(completion.tolist(), gen)
            if (
                prompts is not None
                and tok is not None
                and not isinstance(prompts[s // samples], str)
            ):
                reply = completion[:-1] if record["finish_reason"] == "eos" else completion
                record["messages"] = [
                    *prompts[s // samples],
                    {"role": "assistant", "content": text(reply)},
                ]
            if ids:
                record["prompt_ids"] = prompt.tolist()
                record["completion_ids"] = completion.tolist()
        else:
            record["text"] = text(input_ids)
            record["tokens"] = len(input_ids)
            if md.has_loss_mask and tok is not None:
                record["learned"] = [text(input_ids[a:b]) for a, b in _runs(mask)]
            if ids:
                record["input_ids"] = input_ids.tolist()
        if tok is None:
            record = {k: v for k, v in record.items() if v is not None}
        yield record


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` of each run of learned tokens: token ``t`` is learned when ``mask[t - 1]``
    is 1 (the prediction at ``t - 1`` is of token ``t``)."""
    learned = np.zeros(len(mask) + 2, dtype=np.int8)  # (n + 2,): zero-padded at both ends
    learned[2:-1] = mask[:-1].astype(bool)  # learned[t + 1] = token t is learned
    edges = np.flatnonzero(np.diff(learned))  # starts and ends alternate
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _check_prompts(
    gen: dict[str, Any] | None, prompts: Sequence[str | Sequence[dict[str, Any]]]
) -> None:
    if not gen:
        raise InputError("--prompts was given, but the store was not generated from prompts")
    count, digest = int(gen["prompts"]["count"]), gen["prompts"]["sha256"]
    if len(prompts) != count:
        raise InputError(
            f"the store was generated from {count} prompt(s), but --prompts holds "
            f"{len(prompts)}: pass the prompts it was generated from"
        )
    if prompts_digest(prompts) != digest:
        raise InputError(
            "--prompts differs from the prompts the store was generated from (their SHA-256 "
            "differs from the store's generation.prompts.sha256); pass the same file"
        )


def export_jsonl(
    store: StoreBase,
    out: IO[str],
    *,
    ids: bool = False,
    prompts: Sequence[str | Sequence[dict[str, Any]]] | None = None,
) -> int:
    """Write :func:`sequence_records` to ``out``, one JSON object per line; returns the
    number of lines."""
    n = 0
    for record in sequence_records(store, ids=ids, prompts=prompts):
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n
