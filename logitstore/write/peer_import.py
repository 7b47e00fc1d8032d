"""Import an axolotl or DistillKit offline-KD dataset (top-k ids and log-probabilities per
position) as a store, which is then read, served, streamed and verified like any other.

Every row is checked (:mod:`logitstore.format.peer_rows`) before anything is written.
Values are kept as fp32 probabilities (``exp`` of the log-probabilities). The residual is
the exact one when the rows carry logitstore's own column (an export of ours); otherwise it
is derived as ``1 − Σ p`` and the store's provenance says so (``teacher.imported``): the
peers' files do not know the mass outside their top-k, and renormalised files give 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..format.metadata import Encoding, StoreMetadata
from ..format.peer_rows import Tokenize, read_peer_rows
from ..format.peers import SIDECAR, SIDECAR_TOKENIZER, ZERO_LOGPROB, peer_schema
from .encode import EncodedRows
from .writer import StoreWriter

__all__ = ["import_peer"]


def _encode(ids: np.ndarray, probs: np.ndarray, residual: np.ndarray, vocab: int) -> EncodedRows:
    """Rows ``(n, m)`` → stored top-k rows: ids ascending as gaps, padding last (FORMAT.md §5)."""
    valid = probs > 0
    key = np.where(valid, ids, ids + vocab)  # padding sorts after every real id
    order = np.argsort(key, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    p = np.take_along_axis(probs, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    gaps = np.empty_like(ids)
    gaps[:, :1] = ids[:, :1]
    gaps[:, 1:] = ids[:, 1:] - ids[:, :-1]
    gaps = np.where(valid, gaps, 0)
    g = torch.from_numpy(
        gaps.astype(np.uint16).view(np.int16) if vocab <= 65536 else gaps.astype(np.int32)
    )
    return EncodedRows(
        g,
        torch.from_numpy(p.astype(np.float32)),
        torch.from_numpy(residual.astype(np.float32)),
        torch.zeros(len(ids), dtype=torch.bool),
    )


def import_peer(
    src: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    temperature: float | None = None,
    teacher: str | None = None,
    tokenizer: str | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> StoreMetadata:
    """Write the ``fmt`` dataset at ``src`` as a store at ``out`` (top-k, fp32 values).

    ``vocab_size`` and ``temperature`` default to what an export's ``logitstore.json``
    says; a peer's own files need ``vocab_size`` (ids are checked against it) and have
    temperature 1 unless told. The tokenizer of an export comes along. ``tokenizer`` (a
    Hugging Face tokenizer directory or hub id, with ``chat_template`` as for ``write``)
    tokenises the ``messages`` of axolotl rows that have no ``input_ids``, as ``logitstore
    write`` would (assistant turns learned); the rows then align with the last tokens.

    Raises:
        InputError: a bad row (row, position and column named), or no vocabulary size.
        StoreExistsError: a complete store is at ``out`` (pass ``overwrite``).
    """
    schema = peer_schema(fmt)
    src = Path(src)
    if not src.exists():
        raise InputError(f"{str(src)!r} does not exist")
    base = src if src.is_dir() else src.parent
    if not src.is_dir() and src.parent.name == "data" and (src.parent.parent / SIDECAR).exists():
        base = src.parent.parent  # the data file of an export
    side: dict[str, Any] = {}
    if (base / SIDECAR).exists():
        try:
            side = json.loads((base / SIDECAR).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{str(base / SIDECAR)!r} cannot be read: {e}") from None
        if not isinstance(side, dict):
            raise InputError(f"{str(base / SIDECAR)!r} is not a JSON object")
    vocab = vocab_size if vocab_size is not None else side.get("vocab_size")
    if vocab is None:
        raise InputError(
            f"the vocabulary size of {str(src)!r} is unknown: pass --vocab-size (the teacher's "
            "vocabulary; DistillKit's compressor config calls it d)"
        )
    T = float(temperature if temperature is not None else side.get("temperature", 1.0))
    zero = float(side.get("zero_logprob", ZERO_LOGPROB))
    tokenize: Tokenize | None = None
    tok_prov = side.get("tokenizer")
    tok_json = base / SIDECAR_TOKENIZER if side else None
    tok_raw = tok_json.read_bytes() if tok_json is not None and tok_json.exists() else None
    if tokenizer is not None:
        from ..format.provenance import tokenizer_identity
        from .chat import ChatTemplate, check_messages, load_tokenizer

        hf = load_tokenizer(tokenizer, chat_template)
        chat = ChatTemplate(hf)
        tok_prov, tok_raw = tokenizer_identity(hf)

        def tokenize(messages: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
            return chat.encode(check_messages(messages, where), where)

    # pass 1: check every row, collect the tokens (the writer needs them up front)
    tokens, lengths, masks, width, exact = [], [], [], 1, True
    for row in read_peer_rows(src, schema, int(vocab), zero, tokenize):
        tokens.append(row["input_ids"])
        lengths.append(len(row["input_ids"]))
        masks.append(row["mask"])
        width = max(width, row["ids"].shape[1])
        exact = exact and row["residual"] is not None
    if not tokens:
        raise InputError(f"{str(src)!r} holds no rows")
    has_mask = any(m is not None for m in masks)
    loss_mask = (
        np.concatenate(
            [np.ones(n, bool) if m is None else m for m, n in zip(masks, lengths, strict=True)]
        )
        if has_mask
        else None
    )
    imported = {
        "format": schema.name,
        "source": str(src.resolve()),
        "residual": "exact (the export's logitstore_residual column)"
        if exact
        else "derived as 1 - sum of the imported top-k probabilities: INEXACT (the peer "
        "format does not keep the mass outside its top-k; renormalised files give 0)",
    }
    prov = dict(side.get("teacher") or {})
    if teacher is not None or not prov:
        prov["name"] = teacher or f"unknown ({schema.name} import)"
    prov["imported"] = imported
    encoding = Encoding("topk", "fp32", temperature=T, k=width)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with StoreWriter(
        out,
        encoding=encoding,
        vocab_size=int(vocab),
        input_ids=np.concatenate(tokens),
        offsets=offsets,
        teacher=prov,
        tokenizer=tok_prov,
        tokenizer_json=tok_raw,
        loss_mask=loss_mask,
        overwrite=overwrite,
    ) as w:
        pos = 0
        bar = tqdm(total=int(offsets[-1]), unit="pos", desc=f"import {fmt}", disable=not progress)
        for row in read_peer_rows(src, schema, int(vocab), zero, tokenize):
            n, m = row["ids"].shape
            ids = np.zeros((n, width), dtype=np.int64)
            probs = np.zeros((n, width), dtype=np.float32)
            ids[:, :m], probs[:, :m] = row["ids"], row["probs"]
            res = row["residual"]
            if res is None:
                res = np.clip(1.0 - probs.sum(axis=1, dtype=np.float64), 0.0, 1.0)
            w.write(pos, _encode(ids, probs, np.asarray(res, dtype=np.float32), int(vocab)))
            pos += n
            bar.update(n)
        bar.close()
    return w.metadata
