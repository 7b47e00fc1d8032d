"""Batching by length: which sequences share a forward pass, and that it changes no stored
byte the batching does not cause (rows in position order, sampling seeds, resume)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import logitstore
from logitstore import Encoding
from logitstore.write.capture import plan_batches

from .conftest import dies_at_call

VOCAB = 64
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(11)) * 3
SIZES = {"chunk_positions": 16, "shard_positions": 64, "progress": False}


@pytest.fixture(autouse=True)
def _same_created_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # stores compared byte for byte


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _padding(lengths: np.ndarray, plan: list[np.ndarray]) -> float:
    computed = sum(len(b) * int(lengths[b].max()) for b in plan)
    return 1 - int(lengths.sum()) / computed


def _chat_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lengths spread like a chat set's: lognormal, median ~150, clipped to [2, 2048]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150), 1.0, n), 2, 2048).astype(np.int64)


class Recorder:
    """A table teacher whose logits also depend on its batch's shape, by 1e-3 per row and
    column: a store's bytes then say which batches its sequences ran in (as a real model's
    rounding does, but deterministically). Records each batch's sequences."""

    def __init__(self, shape_sensitive: bool = True) -> None:
        self.batches: list[tuple[tuple[int, ...], ...]] = []
        self.shape_sensitive = shape_sensitive

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.batches.append(
            tuple(tuple(row[m > 0].tolist()) for row, m in zip(ids, mask, strict=True))
        )
        shift = 1e-3 * (ids.shape[0] + ids.shape[1]) if self.shape_sensitive else 0.0
        return TABLE[ids] + shift

    def teacher(self) -> logitstore.Teacher:
        return logitstore.Teacher(fn=self, vocab_size=VOCAB, device=torch.device("cpu"))


def _sequences(lengths: np.ndarray, seed: int = 0) -> logitstore.Sequences:
    rng = np.random.default_rng(seed)
    return logitstore.sequences_from_token_ids(
        [rng.integers(0, VOCAB, int(n)) for n in lengths], int(lengths.max())
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=80),
    st.integers(1, 9),
    st.integers(1, 2000),
)
def test_a_length_plan_runs_each_sequence_once_within_the_token_budget(
    lengths: list[int], batch_size: int, group: int
) -> None:
    lens = np.array(lengths)
    plan = plan_batches(lens, batch_size, "length", group_positions=group)
    ran = np.concatenate(plan)
    assert sorted(ran.tolist()) == list(range(len(lens)))
    budget = batch_size * int(lens.max())
    for b in plan:
        assert len(b) * int(lens[b].max()) <= budget  # never a larger (B, T) than sequential
        assert (np.diff(lens[b]) <= 0).all()  # longest first
        # past batch_size sequences, only similar lengths join
        assert (lens[b[batch_size:]] * 8 >= 7 * lens[b[0]]).all()
    # Rows wait to be written in position order; what waits stays within one group.
    done: set[int] = set()
    nxt = 0
    for b in plan:
        done.update(b.tolist())
        while nxt in done:
            done.remove(nxt)
            nxt += 1
        assert sum(int(lens[i]) for i in done) < group + int(lens.max())
    again = plan_batches(lens, batch_size, "length", group_positions=group)
    assert [b.tolist() for b in plan] == [b.tolist() for b in again]


def test_sequential_plan_is_consecutive_batches() -> None:
    plan = plan_batches(np.array([3, 1, 4, 1, 5]), 2, "sequential")
    assert [b.tolist() for b in plan] == [[0, 1], [2, 3], [4]]
    with pytest.raises(logitstore.TeacherError, match="batching"):
        plan_batches(np.array([3]), 2, "sorted")  # type: ignore[arg-type]
    with pytest.raises(logitstore.TeacherError, match="--batch-size"):
        plan_batches(np.array([3]), 0)


def test_length_batching_computes_little_padding_on_chat_lengths() -> None:
    lens = _chat_lengths(2000)
    sequential = _padding(lens, plan_batches(lens, 8, "sequential"))
    by_length = _padding(lens, plan_batches(lens, 8, "length"))
    assert sequential > 0.5 and by_length < 0.06, (sequential, by_length)


@pytest.mark.parametrize(
    "encoding",
    [Encoding("topk", "u8", k=8), Encoding("sampled", "count", samples=16)],
    ids=["topk", "sampled"],
)
def test_batching_changes_no_byte_when_logits_do_not_depend_on_the_batch(
    tmp_path: Path, encoding: Encoding
) -> None:
    # Rows reach the writer in position order and sampling is seeded by each row's own
    # position, whatever batch the row was computed in.
    seqs = _sequences(_chat_lengths(60, seed=1) // 4 + 2)
    stores = {}
    for batching in ("sequential", "length"):
        rec = Recorder(shape_sensitive=False)
        stores[batching] = logitstore.capture(
            rec.teacher(),
            seqs,
            tmp_path / batching,
            encoding,
            batch_size=4,
            seed=5,
            batching=batching,
            **SIZES,
        )
        assert sum(len(b) for b in rec.batches) == len(seqs)
    assert _files(stores["sequential"]) == _files(stores["length"])


def test_the_teacher_sees_the_planned_batches_and_sequences_stay_apart(teacher, tmp_path):
    # The real (tiny GPT-2) teacher, sequences of mixed lengths batched by length: every
    # stored distribution is that of its sequence run alone.
    rng = np.random.default_rng(2)
    lens = np.array([40, 3, 17, 40, 5, 9, 2, 31, 12, 7])
    seqs = logitstore.sequences_from_token_ids([rng.integers(0, 300, n) for n in lens], 40)
    shapes: list[tuple[int, int]] = []

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(ids.shape))  # type: ignore[arg-type]
        return teacher.fn(ids, mask)  # type: ignore[no-any-return]

    out = logitstore.capture(
        dataclasses.replace(teacher, fn=fn),
        seqs,
        tmp_path / "s",
        Encoding("full", "fp32"),
        batch_size=2,
        **SIZES,
    )
    plan = plan_batches(lens, 2, "length", align=SIZES["shard_positions"])  # capture's groups
    assert shapes == [(len(b), int(lens[b].max())) for b in plan]
    sequential = plan_batches(lens, 2, "sequential")
    assert sum(b * t for b, t in shapes) < sum(len(b) * int(lens[b].max()) for b in sequential)
    store = logitstore.open(out)
    for i in range(len(lens)):
        got = store.sequence(i)
        with torch.no_grad():
            x = torch.from_numpy(got.input_ids)[None]
            want = torch.softmax(teacher.fn(x, torch.ones_like(x))[0].double(), -1).numpy()
        np.testing.assert_allclose(got.probs, want, rtol=2e-5, atol=1e-7)


def test_a_run_killed_inside_a_group_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    # The teacher's logits depend on its batch's shape, so equal bytes mean equal batches.
    # Batch size 1 and sequences of 2-19 tokens: groups of 64 x 19 positions (~110
    # sequences), several per store; the teacher dies in the second group, while finished
    # sequences wait for an earlier one.
    rng = np.random.default_rng(4)
    seqs = _sequences(rng.integers(2, 20, 300), seed=4)
    enc = Encoding("topk", "u8", k=4)
    sizes = {**SIZES, "chunk_positions": 64, "shard_positions": 256}
    ref_rec = Recorder()
    ref = logitstore.capture(ref_rec.teacher(), seqs, tmp_path / "ref", enc, batch_size=1, **sizes)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="teacher died"):
        logitstore.capture(
            dies_at_call(Recorder().teacher(), 120), seqs, out, enc, batch_size=1, **sizes
        )
    partial = logitstore.open(out, allow_incomplete=True)
    assert 0 < partial.committed().sum() < len(partial.committed())
    rec = Recorder()
    logitstore.capture(rec.teacher(), seqs, out, enc, batch_size=1, **sizes)
    assert _files(out) == _files(ref)
    assert 0 < len(rec.batches) < len(ref_rec.batches) - 50  # committed work is not redone
    assert set(rec.batches) <= set(ref_rec.batches)  # and each batch is one the first run ran
    other = logitstore.capture(
        Recorder().teacher(),
        seqs,
        tmp_path / "seq",
        enc,
        batch_size=1,
        batching="sequential",
        **sizes,
    )
    assert _files(other) != _files(ref)  # the test can see a change of batches


def test_the_cli_runs_the_batching_it_is_given(teacher_dir: Path, tmp_path: Path) -> None:
    # `write --batching sequential` gives the bytes of capture(batching="sequential"): the
    # shipped-size GPT-2's rounding depends on its batches, so the stores say which ran.
    from logitstore.cli import main

    data = tmp_path / "d.jsonl"
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta"]
    data.write_text(
        "".join(
            '{"text": "' + " ".join(rng.choice(words, int(n))) + '"}\n'
            for n in _chat_lengths(12, seed=2) // 6 + 1
        )
    )
    torch.set_num_threads(1)
    args = ["--batch-size", "3", "--seq-len", "64", "--shard-positions", "64"]
    args += ["--chunk-positions", "16"]
    for batching in ("sequential", "length"):
        out = tmp_path / f"cli-{batching}"
        argv = ["write", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out)]
        assert main([*argv, *args, "--batching", batching, "--no-progress"]) == 0
        t = logitstore.load_teacher(str(teacher_dir), "cpu")
        seqs = logitstore.tokenize(logitstore.read_documents([data]), t.tokenizer, 64)
        ref = logitstore.capture(
            t, seqs, tmp_path / f"api-{batching}", Encoding("topk", "u8", k=64),
            batch_size=3, batching=batching, seq_len=64, shard_positions=64, chunk_positions=16,
            progress=False,
        )  # fmt: skip
        assert _files(out) == _files(ref), batching
