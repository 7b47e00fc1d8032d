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
    AXOLOTL,
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
#: how far the probabilities plus an imported residual may stray from 1 (fp32 values: the
#: store's own tolerance, tools/verify.py sum_tolerance)
_SUM_TOLERANCE = 1e-4
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

        table = _legacy_axolotl(datasets.load_from_disk(str(src)).data.table, columns)
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
        names = list(pf.schema_arrow.names)
        legacy = _is_legacy(pf.schema_arrow, columns)
        if legacy:
            names.append(AXOLOTL.ids)  # made from the logprobs column's "token_id:N" strings
        _require_columns(f, [c for c in columns if c not in names], names)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=[c for c in columns if c in pf.schema_arrow.names])
            yield row, _legacy_axolotl(table, columns) if legacy else table
            row += table.num_rows


def _is_legacy(schema: Any, columns: list[str]) -> bool:
    """Whether rows are axolotl's legacy (vLLM) layout: ``logprobs`` as lists of
    ``{"token": "token_id:N", "logprob": x}`` per position, and no ``target_token_ids``
    (read by ``axolotl.integrations.kd.chat_template.load_legacy``)."""
    import pyarrow as pa

    if AXOLOTL.ids not in columns or AXOLOTL.ids in schema.names:
        return False
    if AXOLOTL.logprobs not in schema.names:
        return False
    t = schema.field(AXOLOTL.logprobs).type
    for _ in range(2):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return False
        t = t.value_type
    return bool(pa.types.is_struct(t) and {"token", "logprob"} <= {f.name for f in t})


def _legacy_axolotl(table: Any, columns: list[str]) -> Any:
    """A legacy axolotl table (:func:`_is_legacy`) with ``target_token_ids`` and float
    ``logprobs`` columns made from the entries; any other table as it is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not _is_legacy(table.schema, columns):
        return table
    arr = table.column(AXOLOTL.logprobs).combine_chunks()
    inner = arr.flatten()  # (positions,) list<struct>
    entries = inner.flatten()  # (entries,) struct
    token = entries.field("token")
    try:
        ids = pc.cast(pc.replace_substring_regex(token, r"^token_id:", ""), pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(
            f"column {AXOLOTL.logprobs!r}: expected entries whose token is 'token_id:N' "
            "(axolotl's legacy vLLM layout), found others"
        ) from None
    pos_off = pa.array(_starts(_lengths(pc.list_value_length(inner))).astype(np.int32))
    row_off = pa.array(_starts(_lengths(pc.list_value_length(arr))).astype(np.int32))

    def nested(values: Any) -> Any:
        return pa.ListArray.from_arrays(row_off, pa.ListArray.from_arrays(pos_off, values))

    table = table.drop_columns([AXOLOTL.logprobs])
    table = table.append_column(AXOLOTL.ids, nested(ids))
    return table.append_column(AXOLOTL.logprobs, nested(entries.field("logprob")))


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


class _Lists:
    """A list<…> or list<list<…>> column of one table as NumPy: per-row lengths (-1 for
    null), per-position widths (-1 for null) and the flat values, with their offsets."""

    def __init__(self, table: Any, name: str, nested: bool) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.name = name
        arr = table.column(name).combine_chunks()
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise InputError(f"column {name!r} is {arr.type}; expected a list per sequence")
        self.lengths = _lengths(pc.list_value_length(arr))
        inner = arr.flatten()
        if nested:
            if not (pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type)):
                raise InputError(
                    f"column {name!r} is {arr.type}; expected a list of lists (one list of "
                    "candidates per position)"
                )
            self.widths = _lengths(pc.list_value_length(inner))
            values = inner.flatten()
        else:
            self.widths = np.ones(len(inner), dtype=np.int64)
            values = inner
        self.integer = pa.types.is_integer(values.type) or pa.types.is_boolean(values.type)
        if not (self.integer or pa.types.is_floating(values.type)):
            raise InputError(f"column {name!r} holds {values.type}; expected numbers")
        self.null_values = values.null_count > 0
        self.values: np.ndarray = values.to_numpy(zero_copy_only=False)
        self.row_start = _starts(self.lengths)
        self.value_start = _starts(self.widths)

    def row(self, r: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of row ``r`` in :attr:`widths`."""
        return int(self.row_start[r]), int(self.row_start[r + 1])

    def flat(self, r: int) -> np.ndarray:
        """The values of row ``r`` of a 1-D list column."""
        a, b = self.row(r)
        out: np.ndarray = self.values[self.value_start[a] : self.value_start[b]]
        return out


def _lengths(lengths: Any) -> np.ndarray:
    out = lengths.to_numpy(zero_copy_only=False)
    return np.where(np.isnan(out), -1, out).astype(np.int64) if out.dtype.kind == "f" else out


def _starts(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.maximum(lengths, 0), out=out[1:])
    return out


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
        names = table.column_names
        tokens: list[Any] | None = None
        masks: list[Any] | None = None
        if tokenize is not None and INPUT_IDS_COLUMN not in names:
            messages = table.column(MESSAGES_COLUMN).to_pylist()
            tokens, masks = _tokenize_all(tokenize, messages, first, src)
        lists = {
            c: _Lists(table, c, nested=c in (schema.ids, schema.logprobs))
            for c in cols
            if c in names and c not in (MESSAGES_COLUMN, _TOKENIZING)
        }
        for i in range(table.num_rows):
            yield _check_row(first + i, i, lists, tokens, masks, schema, vocab_size, zero_logprob)


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
    r: int,
    i: int,
    lists: dict[str, _Lists],
    tokenized: list[Any] | None,
    masks: list[Any] | None,
    schema: PeerSchema,
    vocab: int,
    zero: float,
) -> dict[str, Any]:
    def fail(column: str, what: str) -> InputError:
        return InputError(f"row {r}, column {column!r}: {what}")

    ids_l, lp_l = lists[schema.ids], lists[schema.logprobs]
    if tokenized is not None:
        tokens = np.asarray(tokenized[i], dtype=np.int64)
    else:
        tok_l = lists[INPUT_IDS_COLUMN]
        if tok_l.lengths[i] < 0:
            raise fail(INPUT_IDS_COLUMN, "is null; expected a list per sequence")
        if not tok_l.integer or tok_l.null_values:
            raise fail(INPUT_IDS_COLUMN, "holds values that are not integers")
        tokens = tok_l.flat(i).astype(np.int64)
    for lst in (ids_l, lp_l):
        if lst.lengths[i] < 0:
            raise fail(lst.name, "is null; expected a list per sequence")
    n = int(ids_l.lengths[i])
    if int(lp_l.lengths[i]) != n:
        raise fail(
            schema.logprobs,
            f"has {lp_l.lengths[i]} position(s) but {schema.ids!r} has {n}: the lists must "
            "be parallel",
        )
    if not n:
        raise fail(
            schema.ids, "is empty: a store has no empty sequences; drop the row from the file"
        )
    outside = (tokens < 0) | (tokens >= vocab)
    if outside.any():
        t = int(np.flatnonzero(outside)[0])
        raise fail(
            INPUT_IDS_COLUMN,
            f"position {t}: token {int(tokens[t])} is outside the vocabulary [0, {vocab}); "
            "was the data tokenised with another tokenizer (or is --vocab-size wrong)?",
        )
    if len(tokens) < n:
        raise fail(
            schema.ids,
            f"has {n} positions but {INPUT_IDS_COLUMN!r} only {len(tokens)} tokens: row j "
            "is the distribution after token j, so there cannot be more rows than tokens",
        )
    a, b = ids_l.row(i)
    c, d = lp_l.row(i)
    w_ids, w_lp = ids_l.widths[a:b], lp_l.widths[c:d]  # (n,)
    ragged = (w_ids != w_lp) | (w_ids < 0)
    if ragged.any():
        t = int(np.flatnonzero(ragged)[0])
        la = "null" if w_ids[t] < 0 else int(w_ids[t])
        lb = "null" if w_lp[t] < 0 else int(w_lp[t])
        raise fail(
            schema.logprobs,
            f"position {t} has {lb} value(s) for {la} id(s) in {schema.ids!r}: ragged row",
        )
    if (w_ids == 0).any():
        raise fail(schema.ids, f"position {int(np.flatnonzero(w_ids == 0)[0])} has no candidates")
    m = int(w_ids.max())
    slots = np.arange(m)[None, :] < w_ids[:, None]  # (n, m): filled slots, row-major order
    raw_ids = ids_l.values[ids_l.value_start[a] : ids_l.value_start[b]]
    raw_lp = lp_l.values[lp_l.value_start[c] : lp_l.value_start[d]]
    if not ids_l.integer or (ids_l.null_values and np.isnan(raw_ids.astype(float)).any()):
        raise fail(schema.ids, "holds values that are not integers (or nulls)")
    out_ids = np.zeros((n, m), dtype=np.int64)
    out_lp = np.full((n, m), zero, dtype=np.float64)
    out_ids[slots] = raw_ids
    out_lp[slots] = raw_lp
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

    def flat(name: str | None) -> np.ndarray | None:
        lst = lists.get(name) if name is not None else None
        if lst is None or lst.lengths[i] < 0:
            return None
        return lst.flat(i)

    res = flat(RESIDUAL_COLUMN)
    mask = flat(LOSS_MASK_COLUMN)
    if masks is not None:
        mask = masks[i]
    labels = flat(schema.labels)
    out_mask = None
    if mask is not None and len(mask) == len(tokens) != n and schema.name == "axolotl":
        mask = mask[len(tokens) - n :]  # a tokenised conversation's: align with the rows
    if mask is not None:
        out_mask = np.asarray(mask[:n]).astype(bool)
    elif labels is not None:
        out_mask = np.asarray(labels[:n]).astype(np.int64) >= 0
    if out_mask is not None and len(out_mask) != n:
        raise fail(schema.labels or LOSS_MASK_COLUMN, f"has {len(out_mask)} entries for {n}")
    out_res = None if res is None else np.asarray(res, dtype=np.float32)
    if out_res is not None and len(out_res) != n:
        raise fail(RESIDUAL_COLUMN, f"has {len(out_res)} entries for {n} positions")
    if out_res is not None:
        # The store's own check (FORMAT.md §7, tools/verify.py): a residual in [0, 1] that
        # completes the stored probabilities to 1 (fp32 values: within 1e-4).
        r64 = out_res.astype(np.float64)
        off = ~np.isfinite(r64) | (r64 < 0) | (r64 > 1 + 1e-6)
        off |= np.abs(total + r64 - 1) > _SUM_TOLERANCE
        if off.any():
            t = int(np.flatnonzero(off)[0])
            raise fail(
                RESIDUAL_COLUMN,
                f"position {t}: residual {r64[t]:.6g} with probabilities summing to "
                f"{total[t]:.6f}; expected a residual in [0, 1] that completes them to 1",
            )
    out_ids = np.where(probs > 0, out_ids, 0)
    lead = len(tokens) - n
    if schema.name == "distillkit" or not lead:
        # DistillKit (vLLM) rows stop before the last token: cut the tokens, as its
        # _truncate_row does
        return {
            "input_ids": tokens[:n],
            "ids": out_ids,
            "probs": probs,
            "residual": out_res,
            "mask": out_mask,
        }
    # axolotl aligns the rows with the last tokens; the first `lead` positions have no
    # distribution: stored empty (residual 1) and masked
    head = np.zeros(lead, dtype=bool)
    return {
        "input_ids": tokens,
        "ids": np.concatenate([np.zeros((lead, m), np.int64), out_ids]),
        "probs": np.concatenate([np.zeros((lead, m), np.float32), probs]),
        "residual": None
        if out_res is None
        else np.concatenate([np.ones(lead, np.float32), out_res]),
        "mask": np.concatenate([head, np.ones(n, bool) if out_mask is None else out_mask]),
    }
