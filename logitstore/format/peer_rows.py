"""Reading an axolotl or DistillKit offline-KD dataset and checking every row: the one place
that knows what a well-formed peer row is (docs/PEERS.md). NumPy; pyarrow (and ``datasets``
for a saved dataset) imported on use.

A missing column, lists of unequal length, an id outside the vocabulary, a duplicate id, a
NaN or +inf or positive log-probability is an :class:`InputError` naming the row, the
position and the column. :mod:`logitstore.write.peer_import` writes the rows as a store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .peers import (
    DATA_FILE,
    INPUT_IDS_COLUMN,
    LOSS_MASK_COLUMN,
    MESSAGES_COLUMN,
    RESIDUAL_COLUMN,
    ZERO_LOGPROB,
    PeerSchema,
)

__all__ = ["Tokenize", "read_peer_rows"]

#: a log-probability above this is a probability above 1 (beyond float32 rounding)
_MAX_LOGPROB = 1e-4
#: a marker in the wanted columns: a tokenizer is at hand, so messages may stand for tokens
_TOKENIZING = "\0tokenizing"
#: (messages, where) → the conversation's tokens and which of them are learned
Tokenize = Callable[[Any, str], tuple[np.ndarray, np.ndarray]]


def _tables(src: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """(first row, pyarrow table) of each row group of ``src``: a Parquet file, a directory
    of them (an export holds ``data.parquet``), or a ``datasets`` ``save_to_disk`` folder."""
    import pyarrow.parquet as pq

    if src.is_dir() and (src / "state.json").exists():
        import datasets

        table = datasets.load_from_disk(str(src)).data.table
        missing = [c for c in columns if c not in table.column_names]
        _require_columns(src, missing, table.column_names)
        yield 0, table.select([c for c in columns if c in table.column_names])
        return
    files = (
        (sorted(src.glob("*.parquet")) or sorted(src.glob("data/*.parquet")))
        if src.is_dir()
        else [src]
    )
    if not files or not all(f.is_file() for f in files):
        raise InputError(
            f"{str(src)!r}: expected a .parquet file, a directory of them (an export holds "
            f"{DATA_FILE}) or a saved Hugging Face dataset"
        )
    row = 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise InputError(f"{str(f)!r} is not a readable Parquet file: {e}") from None
        names = pf.schema_arrow.names
        _require_columns(f, [c for c in columns if c not in names], names)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=[c for c in columns if c in names])
            yield row, table
            row += table.num_rows


_OPTIONAL = {RESIDUAL_COLUMN, LOSS_MASK_COLUMN, MESSAGES_COLUMN}


def _require_columns(where: Path, missing: list[str], found: list[str]) -> None:
    if INPUT_IDS_COLUMN in missing and MESSAGES_COLUMN in found and _TOKENIZING in missing:
        missing = [c for c in missing if c != INPUT_IDS_COLUMN]
    missing = [c for c in missing if c not in _OPTIONAL and c != _TOKENIZING]
    compressed = {"compressed_logprobs", "packed_indices"} & set(found)
    if missing and compressed:
        raise InputError(
            f"{str(where)!r} holds DistillKit's compressed rows ({', '.join(sorted(compressed))}"
            "), which import does not decode: decompress them to token_ids/top_values with "
            "DistillKit's LogprobCompressor.decompress_to_sparse (and the capture's "
            "compressor config) first"
        )
    if missing:
        raise InputError(
            f"{str(where)!r}: column(s) {', '.join(repr(c) for c in missing)} missing; found "
            f"{', '.join(repr(c) for c in found) or 'none'}. Check --format (the axolotl "
            "layout has input_ids, target_token_ids, logprobs; DistillKit's input_ids, "
            "token_ids, top_values, labels); an axolotl file with `messages` and no "
            "input_ids needs --tokenizer (the teacher's, with its chat template)"
        )


def _column(table: Any, name: str) -> list[Any] | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def read_peer_rows(
    src: Path,
    schema: PeerSchema,
    vocab_size: int,
    zero_logprob: float = ZERO_LOGPROB,
    tokenize: Tokenize | None = None,
) -> Iterator[dict[str, Any]]:
    """Each row (sequence) of ``src`` checked and decoded: ``input_ids`` ``(n,)``, ``ids`` and
    ``probs`` ``(n, m)`` (padding slots id 0, probability 0), ``residual`` ``(n,)`` or None,
    ``mask`` ``(n,)`` bool or None. With ``tokenize``, a row without ``input_ids`` is
    tokenised from its ``messages`` (and its mask is the learned tokens').

    Raises:
        InputError: naming the row, position and column at fault.
    """
    cols = [*schema.required, RESIDUAL_COLUMN, LOSS_MASK_COLUMN]
    if schema.labels is not None:
        cols.append(schema.labels)
    if tokenize is not None:
        cols += [MESSAGES_COLUMN, _TOKENIZING]
    for first, table in _tables(src, cols):
        data = {c: _column(table, c) for c in cols if c != _TOKENIZING}
        if tokenize is not None and data[INPUT_IDS_COLUMN] is None:
            data[INPUT_IDS_COLUMN], data[LOSS_MASK_COLUMN] = _tokenize_all(
                tokenize, data[MESSAGES_COLUMN], first, src
            )
        for i in range(table.num_rows):
            yield _check_row(
                first + i,
                {c: (v[i] if v is not None else None) for c, v in data.items()},
                schema,
                vocab_size,
                zero_logprob,
            )


def _tokenize_all(
    tokenize: Tokenize, messages: list[Any] | None, first: int, src: Path
) -> tuple[list[Any], list[Any]]:
    """Tokens and loss masks of each row's conversation: prediction ``t`` counts when token
    ``t + 1`` is learned, as ``logitstore write`` stores chats."""
    if messages is None:
        raise InputError(f"{str(src)!r}: no input_ids and no messages column to tokenise")
    tokens, masks = [], []
    for i, m in enumerate(messages):
        ids, learn = tokenize(m, f"row {first + i}, column {MESSAGES_COLUMN!r}")
        mask = np.zeros(len(ids), dtype=bool)
        mask[:-1] = learn[1:]
        tokens.append(ids.tolist())
        masks.append(mask)
    return tokens, masks


def _check_row(
    r: int, row: dict[str, Any], schema: PeerSchema, vocab: int, zero: float
) -> dict[str, Any]:
    def fail(column: str, what: str) -> InputError:
        return InputError(f"row {r}, column {column!r}: {what}")

    tokens, ids, logps = row[INPUT_IDS_COLUMN], row[schema.ids], row[schema.logprobs]
    for name, v in ((INPUT_IDS_COLUMN, tokens), (schema.ids, ids), (schema.logprobs, logps)):
        if v is None:
            raise fail(name, "is null; expected a list per sequence")
    n = len(ids)
    if len(logps) != n:
        raise fail(
            schema.logprobs,
            f"has {len(logps)} position(s) but {schema.ids!r} has {n}: the lists must be parallel",
        )
    if not n:
        raise fail(
            schema.ids, "is empty: a store has no empty sequences; drop the row from the file"
        )
    if len(tokens) < n:
        raise fail(
            schema.ids,
            f"has {n} positions but {INPUT_IDS_COLUMN!r} only {len(tokens)} tokens: row j "
            "is the distribution after token j, so there cannot be more rows than tokens",
        )
    m = max((len(x) for x in ids if x is not None), default=0)
    out_ids = np.zeros((n, m), dtype=np.int64)
    out_lp = np.full((n, m), zero, dtype=np.float64)
    for t in range(n):
        a, b = ids[t], logps[t]
        if a is None or b is None or len(a) != len(b):
            la = "null" if a is None else len(a)
            lb = "null" if b is None else len(b)
            raise fail(
                schema.logprobs,
                f"position {t} has {lb} value(s) for {la} id(s) in {schema.ids!r}: ragged row",
            )
        if not a:
            raise fail(schema.ids, f"position {t} has no candidates")
        try:
            out_ids[t, : len(a)] = a
            out_lp[t, : len(b)] = [np.nan if x is None else x for x in b]
        except (TypeError, ValueError, OverflowError):
            raise fail(schema.ids, f"position {t} holds values that are not numbers") from None
    bad = (out_ids < 0) | (out_ids >= vocab)
    if bad.any():
        t, j = map(int, np.argwhere(bad)[0])
        raise fail(
            schema.ids,
            f"position {t}, candidate {j}: id {int(out_ids[t, j])} is outside the vocabulary "
            f"[0, {vocab}); pass the teacher's --vocab-size",
        )
    nonfinite = np.isnan(out_lp) | (out_lp == np.inf) | (out_lp > _MAX_LOGPROB)
    if nonfinite.any():
        t, j = map(int, np.argwhere(nonfinite)[0])
        raise fail(
            schema.logprobs,
            f"position {t}, candidate {j}: log-probability {out_lp[t, j]} is not a finite "
            "number <= 0 (a probability in [0, 1]); -inf stands for probability 0",
        )
    probs = np.where(out_lp == zero, 0.0, np.exp(out_lp)).astype(np.float32)
    # duplicate candidates (among non-zero ones) would be stored twice
    live_ids = np.where(probs > 0, out_ids, -1 - np.arange(m))  # empty slots never collide
    srt = np.sort(live_ids, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        t = int(np.argwhere(dup)[0][0])
        raise fail(schema.ids, f"position {t}: id {int(srt[t][1:][dup[t]][0])} appears twice")
    total = probs.sum(axis=1, dtype=np.float64)
    if (total > 1.001).any():
        t = int(np.argmax(total))
        raise fail(
            schema.logprobs,
            f"position {t}: the probabilities sum to {total[t]:.4f} > 1; expected "
            "log-probabilities of one distribution",
        )
    res = row.get(RESIDUAL_COLUMN)
    mask = row.get(LOSS_MASK_COLUMN)
    labels = row.get(schema.labels) if schema.labels is not None else None
    out_mask = None
    if mask is not None and len(mask) == len(tokens) != n and schema.name == "axolotl":
        mask = mask[len(tokens) - n :]  # a tokenised conversation's: align with the rows
    if mask is not None:
        out_mask = np.asarray(mask[:n], dtype=bool)
    elif labels is not None:
        out_mask = np.asarray(labels[:n], dtype=np.int64) >= 0
    if out_mask is not None and len(out_mask) != n:
        raise fail(schema.labels or LOSS_MASK_COLUMN, f"has {len(out_mask)} entries for {n}")
    out_res = None if res is None else np.asarray(res, dtype=np.float32)
    if out_res is not None and len(out_res) != n:
        raise fail(RESIDUAL_COLUMN, f"has {len(out_res)} entries for {n} positions")
    out_ids = np.where(probs > 0, out_ids, 0)
    lead = len(tokens) - n
    if schema.name == "distillkit" or not lead:
        # DistillKit (vLLM) rows stop before the last token: cut the tokens, as its
        # _truncate_row does
        return {
            "input_ids": np.asarray(tokens[:n], dtype=np.int64),
            "ids": out_ids,
            "probs": probs,
            "residual": out_res,
            "mask": out_mask,
        }
    # axolotl aligns the rows with the last tokens; the first `lead` positions have no
    # distribution: stored empty (residual 1) and masked
    head = np.zeros(lead, dtype=bool)
    return {
        "input_ids": np.asarray(tokens, dtype=np.int64),
        "ids": np.concatenate([np.zeros((lead, m), np.int64), out_ids]),
        "probs": np.concatenate([np.zeros((lead, m), np.float32), probs]),
        "residual": None
        if out_res is None
        else np.concatenate([np.ones(lead, np.float32), out_res]),
        "mask": np.concatenate([head, np.ones(n, bool) if out_mask is None else out_mask]),
    }
