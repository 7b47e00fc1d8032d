"""Shared fixtures: a tiny, randomly initialised Hugging Face teacher built from a config
(no download), with a byte-level BPE tokenizer trained on the spot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "while True:\n    line = input()\n    if not line:\n        break\n",
]


def make_teacher(path: Path, *, vocab_size: int = 320, head_scale: float = 8.0) -> Path:
    """Save a tiny GPT-2 teacher and its tokenizer to ``path``; returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # a random head is nearly uniform; scaling it makes it peaked
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return path


def table_store(
    path: Path,
    encoding: Any,
    docs: list[Any],
    seq_len: int,
    *,
    vocab: int,
    seed: int = 0,
    **capture: Any,
) -> Path:
    """A store at ``path`` captured from a teacher that is a random table (the logits after
    token ``t`` are row ``t``, scaled ×3 to be peaked) over ``docs`` cut into ``seq_len``
    sequences; ``capture`` goes to :func:`logitstore.capture` (chunk sizes, a loss mask)."""
    import logitstore

    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=vocab, device=torch.device("cpu")
    )
    seqs = logitstore.sequences_from_token_ids(docs, seq_len)
    return logitstore.capture(teacher, seqs, path, encoding, progress=False, **capture)


def dies_at_call(teacher: Any, call: int) -> Any:
    """A copy of ``teacher`` whose forward pass raises ``RuntimeError("teacher died")`` on
    its ``call``-th batch: a crash in the middle of a real write, without a mock."""
    import dataclasses

    calls = 0

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == call:
            raise RuntimeError("teacher died")
        out: torch.Tensor = teacher.fn(ids, mask)
        return out

    return dataclasses.replace(teacher, fn=fn)


def deterministic_env(**extra: str) -> dict[str, str]:
    """The environment for a teacher process whose results are compared bit for bit with
    another process's. With two intra-op threads, torch's CPU forward is not bit-identical
    across processes (measured: the first batch differed in the 7th digit in 3 of 12 runs of
    the same script; 0 of 12 with one thread), so stores compared byte for byte are written
    with one."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def kill_when(cmd: list[str], env: dict[str, str], ready: Any, timeout: float = 60) -> bool:
    """Run ``cmd`` and SIGKILL it as soon as ``ready()`` is true (a real crash at a chosen
    point); returns whether it was killed (False: it finished first)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    return killed


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def teacher(teacher_dir: Path):  # type: ignore[no-untyped-def]
    import logitstore

    return logitstore.load_teacher(str(teacher_dir), "cpu")


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    """A JSONL file of a few documents of different lengths."""
    path = tmp_path / "data.jsonl"
    texts = [c * (1 + i % 3) for i, c in enumerate(CORPUS)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is, and are skipped (with the reason) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def zarr_rows(path: Path, start: int, stop: int) -> Any:
    """Positions ``[start, stop)`` of the store at ``path`` as zarr's own reader returns them
    (a ``StoredRows``): the reference the project's shard readers are checked against."""
    import numpy as np
    import zarr

    import logitstore
    from logitstore.format.schema import columns, rows_from_columns

    md = logitstore.open(path, allow_incomplete=True).metadata
    got = {
        c.name: np.asarray(zarr.open_array(str(path / c.name), mode="r")[start:stop])
        for c in columns(md)
    }
    return rows_from_columns(md, got, stop - start)
