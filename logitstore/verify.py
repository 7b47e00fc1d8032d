"""Full verification of a store: every shard read, every checksum and invariant checked."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .codec import decode_values
from .errors import LogitStoreError
from .metadata import SQRT_BINS, StoreMetadata
from .reader import LogitStore
from .storage import COMMITS, IDS, INPUT_IDS, OFFSETS, RESIDUAL, VALUES, read_all

__all__ = ["VerifyReport", "verify"]

# How far Σ probs (+ residual) may stray from 1 before renormalisation, per value kind.
# uB: |Δp| <= sqrt(p)/L + 1/(4L²) per entry and Σ sqrt(p) <= sqrt(m); see FORMAT.md §7.
_SUM_TOLERANCE = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2, "count": 0.0}


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

    Example:
        >>> report = verify("teacher.zarr")
        >>> report.ok, report.faults[:1]
    """
    report = VerifyReport(str(path))
    try:
        store = LogitStore(path, allow_incomplete=True)
    except LogitStoreError as e:
        report.faults.append(str(e))
        return report
    md = store.metadata
    group = store._group
    if md.state != "complete":
        report.faults.append(f"the store is not complete (state {md.state!r}); resume its writer")
    _check_offsets(read_all(group, OFFSETS), md, report)
    try:
        commits = read_all(group, COMMITS)
    except Exception as e:
        report.faults.append(f"commit records are unreadable: {e}")
        commits = np.zeros(md.num_shards, dtype=np.uint8)
    leftovers = sorted(str(p.relative_to(store.path)) for p in Path(store.path).rglob("*.partial"))
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
    return report


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
    data: dict[str, np.ndarray] = {}
    for name, arr in store._arrays.items():
        key = Path(store.path, name, "c", str(s), *(["0"] if arr.ndim == 2 else []))
        if not key.is_file():
            report.faults.append(f"{where}: array {name!r} has no shard file ({key.name} missing)")
            return
        try:
            data[name] = np.asarray(arr[s0:s1])
        except Exception as e:
            report.faults.append(f"{where}: array {name!r} fails its checksum or decoding: {e}")
            return

    def fault(name: str, rows: np.ndarray, what: str) -> None:
        report.faults.append(f"{where}: array {name!r} at position {s0 + int(rows[0])}: {what}")

    bad = np.flatnonzero(data[INPUT_IDS] >= vocab)
    if len(bad):
        fault(INPUT_IDS, bad, f"input id {int(data[INPUT_IDS][bad[0]])} >= vocab {vocab}")
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
        gaps = data[IDS].astype(np.int64)  # (n, m)
        pad = gaps == 0
        pad[:, 0] = False
        ids = np.cumsum(gaps, axis=1)
        bad = np.flatnonzero(np.where(pad, 0, ids).max(axis=1) >= vocab)
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
    tol = _SUM_TOLERANCE.get(enc.values)
    if tol is None:
        bins, width = SQRT_BINS[enc.values], md.layout.width
        tol = float(np.sqrt(width)) / bins + width / (4 * bins**2) + 1e-3
    bad = np.flatnonzero(np.abs(total - 1) > tol)
    if len(bad):
        fault(VALUES, bad, f"probabilities sum to {total[bad[0]]:.6f}, expected 1 ± {tol:g}")
