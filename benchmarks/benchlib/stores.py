"""Real teacher rows for the write, read and HTTP benchmarks: the shipped teacher's logits
on held-out stdlib text, encoded once and tiled to any number of positions, and the top-64 u8
store built from them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import logitstore
from benchlib.corpus import held_out_documents
from benchlib.report import REPO_ROOT
from logitstore import EncodedRows, Encoding, encode_rows
from logitstore.write.inputs import Document

SHIPPED_TEACHER = REPO_ROOT / "examples" / "teacher"


def teacher_logits(
    teacher: logitstore.Teacher, seqs: logitstore.Sequences, limit: int | None = None
) -> torch.Tensor:
    """``(N, V)`` float32 logits of the teacher at every position, one sequence at a time;
    with ``limit``, the first ``limit`` positions (later sequences are not run)."""
    out, have = [], 0
    with torch.inference_mode():
        for i in range(len(seqs)):
            s0, s1 = seqs.offsets[i], seqs.offsets[i + 1]
            ids = torch.from_numpy(seqs.input_ids[s0:s1])[None]  # (1, T)
            out.append(teacher.fn(ids, torch.ones_like(ids))[0].float())  # (T, V)
            have += s1 - s0
            if limit is not None and have >= limit:
                break
    return torch.cat(out)[:limit]


def held_out_logits(teacher_dir: Path, positions: int, seq_len: int = 256) -> torch.Tensor:
    """``(positions, V)`` float32 logits of the teacher in ``teacher_dir`` on held-out text."""
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    docs = [Document(t, "stdlib") for t in held_out_documents()]
    seqs = logitstore.tokenize(docs, teacher.tokenizer, seq_len)
    return teacher_logits(teacher, seqs, positions)


def spread_rows(logits: torch.Tensor, enc: Encoding, vocab: int, chunk: int = 256) -> EncodedRows:
    """The rows a teacher with a ``vocab``-wide output layer would give for ``logits``
    ``(N, V)``: teacher id ``j`` becomes ``j·s + (j·40503 mod s)`` with ``s = vocab // V``
    (ascending, spread over the whole vocabulary as a large tokenizer's ids are), and the
    ids in between get no mass. The probabilities are the real teacher's; only the ids, and
    so their gaps and id width (uint32 past 65,536), change. Encoded ``chunk`` rows at a
    time, so a (N, vocab) float32 matrix is never made."""
    n, v = logits.shape
    s = vocab // v
    j = torch.arange(v)
    where = j * s + (j * 40503) % s  # (V,) ascending, below vocab
    parts = []
    for start in range(0, n, chunk):
        part = logits[start : start + chunk]  # (c, V)
        # A finite floor far below every real logit: exp() gives exact zeros, not denormals.
        big = torch.full((len(part), vocab), float(part.min()) - 1e4)
        big[:, where] = part
        parts.append(encode_rows(big, enc, 0, torch.arange(start, start + len(part))))

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

    return EncodedRows(
        cat([p.gaps for p in parts]),
        torch.cat([p.values for p in parts]),
        cat([p.residual for p in parts]),
        torch.cat([p.bad for p in parts]),
    )


def tile_rows(rows: EncodedRows, start: int, n: int) -> EncodedRows:
    """Rows ``[start, start + n)`` of the endlessly repeated ``rows``."""
    size = len(rows.values)
    idx = torch.arange(start, start + n) % size

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[idx]

    return EncodedRows(take(rows.gaps), rows.values[idx], take(rows.residual), rows.bad[idx])


def teacher_bytes(path: Path, metadata: bool = True) -> int:
    """Bytes of a store's per-position teacher arrays (ids, values, residual) on disk, with
    or without their ``zarr.json`` metadata documents."""
    return sum(
        f.stat().st_size
        for name in ("ids", "values", "residual")
        for f in (path / name).rglob("*")
        if f.is_file() and (metadata or f.name != "zarr.json")
    )


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`build_store` reads (bench_read.py and bench_http.py)."""
    p.add_argument(
        "--teacher",
        type=Path,
        default=SHIPPED_TEACHER,
        help="teacher directory for the real rows (default: the shipped teacher)",
    )
    p.add_argument("--positions", type=int, default=1 << 21, help="store size (default 2M)")
    p.add_argument("--sample-positions", type=int, default=1 << 15, help="real rows, tiled")
    p.add_argument("--sequence-length", type=int, default=2048, help="teacher context length")


def build_store(args: argparse.Namespace, root: Path) -> Path:
    """``root``/store: ``args.positions`` top-64 u8 rows, ``args.sample_positions`` real
    rows tiled, over random input ids cut into ``args.sequence_length`` sequences."""
    logits = held_out_logits(args.teacher, args.sample_positions)
    enc = Encoding("topk", "u8", k=64)
    rows = encode_rows(logits, enc, 0, torch.arange(len(logits)))
    n = args.positions
    tokens = np.random.default_rng(0).integers(0, logits.shape[1], n)
    seqs = logitstore.sequences_from_token_ids([tokens], args.sequence_length)
    path = root / "store"
    with logitstore.StoreWriter(
        path,
        encoding=enc,
        vocab_size=logits.shape[1],
        input_ids=seqs.input_ids,
        offsets=seqs.offsets,
    ) as w:
        for s in range(0, n, 8192):
            w.write(s, tile_rows(rows, s, min(8192, n - s)))
    return path
