"""Full verification of a store: every shard read, every checksum and invariant checked."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import LogitStoreError
from ..format.codec import decode_ids, decode_values
from ..format.fused import check_decoder
from ..format.metadata import ATTRS_KEY, SQRT_BINS, StoreMetadata
from ..format.provenance import identity_digest, identity_settings
from ..format.schema import IDS, INPUT_IDS, LOSS_MASK, RESIDUAL, VALUES, columns
from ..format.storage import leftover_keys, open_group, shard_key
from ..read.local import LogitStore, local_reader

__all__ = ["VerifyReport", "sum_tolerance", "verify"]


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is true when ``faults`` is empty."""

    path: str
    shards: int = 0
    positions: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def verify(path: str | os.PathLike[str], *, progress: bool = False) -> VerifyReport:
    """Read the whole store and check integrity and invariants (docs/FORMAT.md §7).

    Never raises for a damaged store: every fault found is reported, naming the array,
    shard and first position concerned.

    Raises:
        LogitStoreError: ``LOGITSTORE_LOCAL_READER`` is set to neither ``shards`` nor
            ``zarr`` (a setting, not a fault of the store).

    Example:
        >>> report = verify("teacher.zarr")
        >>> report.ok, report.faults[:1]
    """
    local_reader()  # a bad setting is the caller's error, not a fault of the store
    check_decoder()
    report = VerifyReport(str(path))
    try:
        _verify(path, report, progress)
    except LogitStoreError as e:  # a fault that stops the walk: reported, never raised
        report.faults.append(str(e))
    except OSError as e:
        report.faults.append(f"cannot read the store: {e}")
    return report


def _verify(path: str | os.PathLike[str], report: VerifyReport, progress: bool) -> None:
    store = LogitStore(path, allow_incomplete=True)
    md = store.metadata
    if md.state != "complete":
        report.faults.append(f"the store is not complete (state {md.state!r}); resume its writer")
    _check_offsets(store.offsets, md, report)
    try:
        commits = store.commit_records()
    except LogitStoreError as e:
        report.faults.append(f"commit records: {e}")
        commits = np.zeros(md.num_shards, dtype=np.uint8)
    leftovers = leftover_keys(store.path)
    if leftovers:
        report.faults.append(f"temporary files of an interrupted write remain: {leftovers[:3]}")
    for s in tqdm(range(md.num_shards), desc="verify", unit="shard", disable=not progress):
        s0, s1 = md.shard_range(s)
        where = f"shard {s} (positions {s0}-{s1 - 1})"
        if commits[s] != 1:
            report.faults.append(f"{where}: not committed")
            continue
        _check_shard(store, s, s0, s1, where, report)
        report.shards += 1
        report.positions += s1 - s0
    if report.ok:
        _check_identity(store, report)


def _check_identity(store: LogitStore, report: VerifyReport) -> None:
    """The stored ``identity`` recomputed from the metadata and the tokens (FORMAT.md §3)."""
    raw: Any = open_group(store.path).attrs.get(ATTRS_KEY)  # the JSON object as stored
    step, n = 1 << 22, len(store)
    blocks = range(0, n, step)
    ids = (store.read_tokens(a, min(a + step, n))[0] for a in blocks)
    mask = (
        (store.read_tokens(a, min(a + step, n))[1] for a in blocks)
        if store.metadata.has_loss_mask
        else None
    )
    found = identity_digest(identity_settings(raw), ids, store.offsets, mask)
    if found != store.metadata.identity:
        report.faults.append(
            f"identity: the metadata says {store.metadata.identity[:23]}…, the metadata and "
            f"tokens hash to {found[:23]}…: the store was changed after it was written"
        )


def sum_tolerance(values: str, width: int) -> float:
    """How far Σ q̃ + residual may stray from 1 before rescaling (FORMAT.md §7)."""
    if values in SQRT_BINS:  # |Δp| <= sqrt(p)/L + 1/(4L²) per entry, and Σ sqrt(p) <= sqrt(m)
        bins = SQRT_BINS[values]
        return float(np.sqrt(width)) / bins + width / (4 * bins**2) + 1e-3
    # fp16/bf16: relative rounding per entry, plus fp16's absolute floor for tiny values.
    per_entry = {"fp32": (0.0, 0.0), "fp16": (2.0**-11, 2.0**-24), "bf16": (2.0**-8, 0.0)}
    rel, absolute = per_entry[values]
    return rel + width * absolute + 1e-4


def _check_offsets(offsets: np.ndarray, md: StoreMetadata, report: VerifyReport) -> None:
    if len(offsets) != md.num_sequences + 1:
        report.faults.append(f"offsets: {len(offsets)} entries, expected {md.num_sequences + 1}")
    elif offsets[0] != 0 or offsets[-1] != md.num_positions:
        report.faults.append(
            f"offsets: run from {offsets[0]} to {offsets[-1]}, expected 0 to {md.num_positions}"
        )
    elif np.any(np.diff(offsets) < 1):
        i = int(np.flatnonzero(np.diff(offsets) < 1)[0])
        report.faults.append(
            f"offsets: sequence {i} is empty or reversed ({offsets[i]}→{offsets[i + 1]})"
        )


def _check_shard(
    store: LogitStore, s: int, s0: int, s1: int, where: str, report: VerifyReport
) -> None:
    md = store.metadata
    enc, vocab = md.encoding, md.vocab_size
    for col in columns(md):
        if not store.shard_present(col.name, s):
            key = shard_key(col.name, col.ndim, s)
            report.faults.append(f"{where}: array {col.name!r} has no shard file ({key} missing)")
            return
    try:
        data = store.read_columns(s0, s1)
    except LogitStoreError as e:
        report.faults.append(f"{where}: {e}")
        return

    def fault(name: str, rows: np.ndarray, what: str) -> None:
        report.faults.append(f"{where}: array {name!r} at position {s0 + int(rows[0])}: {what}")

    bad = np.flatnonzero(data[INPUT_IDS] >= vocab)
    if len(bad):
        fault(INPUT_IDS, bad, f"input id {int(data[INPUT_IDS][bad[0]])} >= vocab {vocab}")
    if LOSS_MASK in data:
        bad = np.flatnonzero(data[LOSS_MASK] > 1)
        if len(bad):
            fault(LOSS_MASK, bad, f"loss mask value {int(data[LOSS_MASK][bad[0]])} is not 0 or 1")
    if enc.kind == "none":  # tokens only: nothing else to check
        return
    values = data[VALUES]
    if enc.kind == "sampled":
        probs = values.astype(np.float32)
    else:
        probs = decode_values(values, enc.values)
        bad = np.flatnonzero(~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1))
        if len(bad):
            fault(VALUES, bad, "probability is negative or not finite")
            return
    if IDS in data:
        ids, pad = decode_ids(data[IDS])  # (n, m)
        bad = np.flatnonzero(ids.max(axis=1) >= vocab)
        if len(bad):
            fault(IDS, bad, f"candidate id outside the vocabulary of {vocab}")
        # Padding is a suffix: once a slot is padding, every later slot is too.
        bad = np.flatnonzero((pad[:, :-1] & ~pad[:, 1:]).any(axis=1))
        if len(bad):
            fault(IDS, bad, "padding slot followed by a real candidate")
        bad = np.flatnonzero((pad & (values != 0)).any(axis=1))
        if len(bad):
            fault(VALUES, bad, "padding slot has a non-zero value")
    if enc.kind == "sampled":
        assert enc.samples is not None
        bad = np.flatnonzero(values.astype(np.int64).sum(axis=1) != enc.samples)
        if len(bad):
            fault(VALUES, bad, f"sample counts do not add up to {enc.samples}")
        return
    total = probs.sum(axis=1, dtype=np.float64)
    if RESIDUAL in data:
        residual = data[RESIDUAL].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(residual) | (residual < 0) | (residual > 1 + 1e-6))
        if len(bad):
            fault(RESIDUAL, bad, f"residual {residual[bad[0]]} is not in [0, 1]")
            return
        total = total + residual
    tol = sum_tolerance(enc.values, md.layout.width)
    bad = np.flatnonzero(np.abs(total - 1) > tol)
    if len(bad):
        fault(VALUES, bad, f"probabilities sum to {total[bad[0]]:.6f}, expected 1 ± {tol:g}")
