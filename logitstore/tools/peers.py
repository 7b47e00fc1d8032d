"""Export a store as an axolotl or DistillKit offline-KD dataset: Parquet rows, the peer's
config snippet, and what logitstore knows that the peer format cannot say.

One row per sequence (docs/PEERS.md): ``input_ids``; per position the candidates sorted
most likely first and their log-probabilities at the store's temperature; the mask; for
axolotl the conversation (``messages``) when the caller has it. Two extra columns, which
the peers ignore, keep an export importable without loss: the exact residual and the 0/1
loss mask. NumPy and pyarrow only (pyarrow imported on use: the ``data`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import InputError, LogitStoreError, StoreExistsError
from ..format.peers import (
    DATA_FILE,
    IGNORE_LABEL,
    INPUT_IDS_COLUMN,
    LOSS_MASK_COLUMN,
    MESSAGES_COLUMN,
    PINNED,
    RESIDUAL_COLUMN,
    SIDECAR,
    SIDECAR_TOKENIZER,
    ZERO_LOGPROB,
    PeerSchema,
    peer_schema,
)
from ..read.store import StoreBase

__all__ = ["PeerExport", "export_peer", "peer_logprobs"]

LogprobDtype = Literal["float32", "float64"]
#: positions per Parquet row group (a row group holds whole sequences)
_GROUP_POSITIONS = 1 << 16


@dataclass
class PeerExport:
    """What :func:`export_peer` wrote, and what the peer format loses (``warnings``)."""

    path: Path
    rows: int
    positions: int
    files: list[str]
    warnings: list[str] = field(default_factory=list)


def peer_logprobs(
    ids: np.ndarray, probs: np.ndarray, dtype: LogprobDtype = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded rows ``(n, m)`` → candidates sorted most likely first (ties in the rows' order:
    ascending ids, as decoded) and their log-probabilities; probability 0 (padding) becomes
    :data:`ZERO_LOGPROB`.

    float64 log-probabilities bring fp32 probabilities back bit for bit (``exp`` of a float64
    log is within 1e-15 of ``p``, far inside half a float32 step); float32 ones within a few
    float32 steps (relative error ≈ 6e-8 · |log p|).
    """
    # (n, m): by probability; a stable sort keeps decoded rows' ascending ids among ties
    order = np.argsort(-probs, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)
    p = np.take_along_axis(probs, order, axis=-1).astype(np.float64)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(p), ZERO_LOGPROB)
    return ids, logp.astype(dtype)


def _nested(values: np.ndarray, lengths: np.ndarray, width: int) -> Any:
    """``values`` ``(N, width)`` as list<list<…>>: one outer list per sequence of ``lengths``."""
    import pyarrow as pa

    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (len(values) + 1) * width, width, dtype=np.int32)),
        pa.array(values.reshape(-1)),
    )
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths)), inner)


def _flat(values: np.ndarray, lengths: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(_offsets(lengths)), pa.array(values))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _check(store: StoreBase, schema: PeerSchema, messages: Sequence[Any] | None) -> list[str]:
    """Refuse what the peer cannot carry; return the warnings for what it loses."""
    enc, md = store.encoding, store.metadata
    if enc.kind not in ("topk", "sampled"):
        raise InputError(
            f"the store's encoding is {enc.kind!r}, but {schema.name} reads top-k candidate "
            "lists: export a store written with --encoding topk or sampled"
        )
    if messages is not None and len(messages) != store.num_sequences:
        raise InputError(
            f"--messages holds {len(messages)} conversation(s), but the store has "
            f"{store.num_sequences} sequence(s): pass the file the store was written from "
            "(one conversation per sequence)"
        )
    lost = []
    if enc.kind == "topk":
        lost.append(
            f"LOST: the residual (the teacher's mass outside the top-{enc.k}). {schema.name} "
            "renormalises the top-k to sum to 1, so its target is not the teacher's "
            f"distribution; the exact residual is kept in the column {RESIDUAL_COLUMN!r}, "
            "which only `logitstore import` reads"
        )
    else:
        lost.append(
            f"sampled store: the candidates are the {enc.samples} draws' unique ids, their "
            "log-probabilities the logs of count / n (already summing to 1: no residual to "
            f"lose); {schema.name} treats them as a top-k, which is the unbiased estimate"
        )
    if enc.lossy:
        lost.append(
            f"values were stored as {enc.values}: the exported log-probabilities are the "
            "decoded (quantised) ones, not the teacher's exact values"
        )
    if schema.name == "distillkit" and enc.temperature != 1.0:
        lost.append(
            f"the log-probabilities are at the store's temperature {enc.temperature}, but "
            "DistillKit takes offline values to be at T = 1 (OfflineSignalSource): keep "
            "its kl temperature at 1.0 to train on the store's distribution as it is"
        )
    if schema.name == "axolotl" and messages is None:
        lost.append(
            "no `messages` column (pass --messages with the conversations the store was "
            "written from): axolotl's KD loader tokenises conversations itself and cannot "
            "read these rows without them"
        )
    if not md.has_loss_mask:
        lost.append("the store has no loss mask: every position counts for training")
    return lost


def export_peer(
    store: StoreBase,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    messages: Sequence[Any] | None = None,
    logprob_dtype: LogprobDtype = "float32",
    overwrite: bool = False,
    progress: bool = False,
) -> PeerExport:
    """Write ``store`` as a ``fmt`` (``axolotl`` or ``distillkit``) dataset into directory
    ``out``: ``data/train-00000-of-00001.parquet``, the peer's config snippet (``axolotl.yaml`` or
    ``distillkit.yaml``), ``logitstore.json`` (vocabulary, temperature, provenance, what is
    lost) and the store's ``tokenizer.json`` if it keeps one.

    ``messages`` (one conversation per sequence, in store order) adds axolotl's
    ``messages`` column. ``logprob_dtype`` float64 makes an fp32 store's round trip through
    ``logitstore import`` bit-exact (twice the bytes).

    Raises:
        InputError: an encoding the peers cannot read (full, tokens only), or ``messages``
            of another length than the store's sequences.
        StoreExistsError: ``out`` exists and is not empty (pass ``overwrite``).

    Example:
        >>> export_peer(logitstore.open("s.zarr"), "distillkit", "s-dk").warnings
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = peer_schema(fmt)
    lost = _check(store, schema, messages)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise StoreExistsError(f"{str(out)!r} exists and is not empty; pass --overwrite")
        if not (out / SIDECAR).exists():  # never delete a directory that is not an export
            raise StoreExistsError(
                f"{str(out)!r} is not empty and holds no {SIDECAR}, so it is not an export to "
                "replace; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    md, width = store.metadata, store.metadata.layout.width
    (out / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{DATA_FILE}.partial"
    writer: pq.ParquetWriter | None = None
    residual_sum, residual_max, positions = 0.0, 0.0, 0
    bar = tqdm(total=len(store), unit="pos", desc=f"export {fmt}", disable=not progress)
    try:
        s = 0
        while s < store.num_sequences:
            # whole sequences, about _GROUP_POSITIONS positions per row group
            stop = int(np.searchsorted(store.offsets, store.offsets[s] + _GROUP_POSITIONS, "right"))
            e = min(max(stop - 1, s + 1), store.num_sequences)
            a, b = int(store.offsets[s]), int(store.offsets[e])
            batch = store.read(a, b)
            lengths = np.diff(store.offsets[s : e + 1])
            ids, logp = peer_logprobs(batch.ids, batch.probs, logprob_dtype)
            mask = np.ones(b - a, dtype=bool) if batch.loss_mask is None else batch.loss_mask
            cols: dict[str, Any] = {}
            if schema.name == "axolotl" and messages is not None:
                cols[MESSAGES_COLUMN] = pa.array([list(m) for m in messages[s:e]])
            cols[INPUT_IDS_COLUMN] = _flat(batch.input_ids.astype(np.int64), lengths)
            if schema.labels is not None:
                labels = np.where(mask, batch.input_ids, IGNORE_LABEL).astype(np.int64)
                cols[schema.labels] = _flat(labels, lengths)
            cols[schema.ids] = _nested(ids.astype(np.int64), lengths, width)
            cols[schema.logprobs] = _nested(logp, lengths, width)
            if md.encoding.kind == "topk":
                cols[RESIDUAL_COLUMN] = _flat(batch.residual.astype(np.float32), lengths)
                if len(batch.residual):
                    residual_sum += float(batch.residual.sum(dtype=np.float64))
                    residual_max = max(residual_max, float(batch.residual.max()))
            if md.has_loss_mask:
                cols[LOSS_MASK_COLUMN] = _flat(mask.astype(np.uint8), lengths)
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            positions += b - a
            bar.update(b - a)
            s = e
        if writer is None:
            raise InputError("the store has no sequences: nothing to export")
        writer.close()
        writer = None
        tmp.rename(out / DATA_FILE)
    except OSError as e:
        raise LogitStoreError(f"cannot write {str(out)!r}: {e}") from None
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    if md.encoding.kind == "topk" and positions:
        lost[0] += (
            f" (mean {residual_sum / positions:.4f}, max {residual_max:.4f} over the "
            f"{positions:,} positions)"
        )
    files = [DATA_FILE, *_write_config(store, schema, out, logprob_dtype, lost)]
    return PeerExport(out, store.num_sequences, positions, files, lost)


def _write_config(
    store: StoreBase, schema: PeerSchema, out: Path, dtype: str, lost: list[str]
) -> list[str]:
    md, enc = store.metadata, store.encoding
    sidecar = {
        "written_by": {"name": "logitstore", "version": __version__},
        "format": schema.name,
        "checked_against": PINNED[schema.name],
        "vocab_size": md.vocab_size,
        "encoding": enc.to_dict(),
        "temperature": enc.temperature,
        "logprob_dtype": dtype,
        "zero_logprob": ZERO_LOGPROB,
        "alignment": "row j of a sequence is the teacher's distribution of the token after "
        "input_ids[j] (logitstore position j)",
        "store": {"path": str(store.path), "identity": md.identity},
        "teacher": md.teacher,
        "tokenizer": md.tokenizer,
        "lost": lost,
    }
    files = [SIDECAR]
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    tok = store.tokenizer()
    if tok is not None:
        tok.save(str(out / SIDECAR_TOKENIZER))
        files.append(SIDECAR_TOKENIZER)
    note = "\n".join(f"# {line}" for line in _wrap(lost))
    data = str((out / DATA_FILE).resolve())
    T = enc.temperature
    if schema.name == "axolotl":
        text = f"""# axolotl KD config for {data}
# written by logitstore {__version__}; checked against {PINNED["axolotl"]}
{note}
plugins:
  - axolotl.integrations.kd.KDPlugin
kd_trainer: true
kd_ce_alpha: 0.1
kd_alpha: 0.9
kd_temperature: {T}  # equal to the dataset temperature: no re-scaling of the targets
datasets:
  - path: {data}
    ds_type: parquet
    type: axolotl.integrations.kd.chat_template
    field_messages: {MESSAGES_COLUMN}
    logprobs_field: {schema.logprobs}
    temperature: {T}  # the store's temperature: the log-probabilities are at T = {T}
"""
    else:
        text = f"""# DistillKit config for {data} (one row per sequence; pack equal-length rows
# with `distillkit-pack-logits --dataset {out.resolve()} --max-len N` for `prepacked: true`)
# written by logitstore {__version__}; checked against {PINNED["distillkit"]}
{note}
dataset:
  train_dataset:
    repo_id: {out.resolve()}
    split: train
teacher:
  kind: dataset
  logprob_compressor:  # raw token_ids/top_values rows: the compressor only needs d
    d: {md.vocab_size}
    k: {md.layout.width}
    exact_k: {md.layout.width}
    exact_dtype: float32
    polynomial_terms: []
    residual_bins: []
    delta_encoding: false
loss_functions:
  - function: cross_entropy
    weight: 0.5
  - function: kl
    weight: 0.5
    temperature: 1.0  # the values are at the store's T = {T}; 1.0 keeps them as they are
    missing_probability_handling: zero
"""
    name = f"{schema.name}.yaml"
    (out / name).write_text(text)
    return [*files, name]


def _wrap(lines: list[str], width: int = 88) -> list[str]:
    out = []
    for line in lines:
        words, cur = line.split(), ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > width:
                out.append(cur)
                cur = "  " + w
            else:
                cur = f"{cur} {w}" if cur else w
        out.append(cur)
    return out
