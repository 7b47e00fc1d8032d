"""examples/train_student.py: it trains, and a stopped run resumes to the same numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding

ROOT = Path(__file__).resolve().parent.parent


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "train_student", ROOT / "examples/train_student.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    vocab = 64
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=vocab, device=torch.device("cpu")
    )
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("train")
    out = []
    for name, docs in (("train", 30), ("eval", 5)):
        seqs = logitstore.sequences_from_token_ids(
            [rng.integers(0, vocab, 100) for _ in range(docs)], 64
        )
        out.append(
            logitstore.capture(
                teacher, seqs, root / name, Encoding("topk", "u8", k=8), progress=False
            )
        )
    return out[0], out[1]


def _log(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_stopped_training_resumes_exactly(stores, tmp_path: Path, workers: int) -> None:
    train, held_out = stores
    common = [
        "--store",
        str(train),
        "--eval-store",
        str(held_out),
        "--steps",
        "16",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "8",
        "--save-every",
        "5",
        "--workers",
        str(workers),
        "--layers",
        "1",
        "--embd",
        "32",
        "--alpha",
        "0.7",
    ]
    example = _example()
    assert example.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert example.main([*common, "--out", str(tmp_path / "b"), "--stop-at", "7"]) == 0
    assert len(_log(tmp_path / "b")) == 7
    assert example.main([*common, "--out", str(tmp_path / "b")]) == 0
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 17))
    assert a == b  # every loss, bit for bit, and the held-out evaluations
    assert a[-1]["eval_kl"] < a[7]["eval_kl"]  # and it learns
