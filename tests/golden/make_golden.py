"""Recreate the golden stores of format v1 (run only when the format version changes).

    python -m tests.golden.make_golden

The teacher is a fixed table: the distribution after token t is ``TABLE[t]``, exact binary
fractions chosen so that the expected stored integers can be worked out by hand
(tests/test_golden.py does so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

import logitstore
from logitstore import Encoding

HERE = Path(__file__).parent / "v1"
VOCAB = 12
TABLE = np.zeros((VOCAB, VOCAB))
TABLE[0, :6] = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125]
TABLE[1, [11, 7, 3]] = [0.75, 0.125, 0.125]
TABLE[2, :] = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.01, 0.005, 0.004, 0.001]
for t in range(3, VOCAB):
    TABLE[t, (t + 1) % VOCAB] = 0.5
    TABLE[t, (t + 2) % VOCAB] = 0.25
    TABLE[t, (t + 5) % VOCAB] = 0.25
INPUT = [[0, 1, 2, 3, 4], [5, 0, 11, 1]]  # two sequences (teacher contexts)
STORES = {
    "topk-u8": Encoding("topk", "u8", k=4),
    "topk-fp32": Encoding("topk", "fp32", k=4),
    "sampled-8": Encoding("sampled", "count", samples=8),
    "full-fp16": Encoding("full", "fp16"),
    # format 1.1: a loss mask (the second sequence's prediction of token 1 only), and tokens only
    "topk-u8-masked": Encoding("topk", "u8", k=4),
    "tokens-masked": Encoding("none", "none"),
}
MASK = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=np.uint8)


def teacher() -> logitstore.Teacher:
    with np.errstate(divide="ignore"):
        logits = torch.from_numpy(np.log(TABLE)).to(torch.float32)

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits[ids]  # (B, T, V)

    return logitstore.Teacher(
        fn=fn, vocab_size=VOCAB, device=torch.device("cpu"), name="golden-table"
    )


def write(name: str, out: Path) -> Path:
    seqs = logitstore.sequences_from_token_ids(INPUT, None)
    return logitstore.capture(
        teacher(),
        seqs,
        out,
        STORES[name],
        seed=1234,
        progress=False,
        loss_mask=MASK if name.endswith("-masked") else None,
        chunk_positions=4,
        shard_positions=8,
        overwrite=True,
    )


if __name__ == "__main__":
    os.environ["SOURCE_DATE_EPOCH"] = "1767225600"  # 2026-01-01T00:00:00Z
    shutil.rmtree(HERE, ignore_errors=True)
    for name in STORES:
        write(name, HERE / f"{name}.zarr")
        print("wrote", HERE / f"{name}.zarr")
