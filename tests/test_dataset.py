"""LogitDataset with real DataLoader workers: alignment, coverage, sharding and resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import logitstore
from logitstore import Encoding
from logitstore.read.dataset import LogitDataset, collate

VOCAB = 50
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) * 3


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return TABLE[ids]  # the distribution after token t depends on t alone

    teacher = logitstore.Teacher(fn=fn, vocab_size=VOCAB, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, rng.integers(2, 120)) for _ in range(40)]
    seqs = logitstore.sequences_from_token_ids(docs, 50)
    return logitstore.capture(
        teacher,
        seqs,
        tmp_path_factory.mktemp("d") / "s",
        Encoding("topk", "fp32", k=8),
        progress=False,
        chunk_positions=64,
        shard_positions=256,
    )


def _key(sample: dict[str, torch.Tensor]) -> tuple[int, ...]:
    n = int(sample["attention_mask"].sum())
    return tuple(sample["input_ids"][:n].tolist())


def _all(ds: LogitDataset) -> list[dict[str, torch.Tensor]]:
    return list(ds)


def test_samples_are_aligned_windows_of_one_sequence(store_path: Path) -> None:
    store = logitstore.open(store_path)
    ds = LogitDataset(store_path, seq_len=16, shuffle=False, block_positions=64)
    samples = _all(ds)
    assert len(samples) == ds.num_windows == len(ds)
    expected_p = torch.softmax(TABLE, -1)
    pos = 0
    for s in samples:
        n = int(s["attention_mask"].sum())
        seq = store.sequence_of(pos)
        seq_end = int(store.offsets[seq + 1])
        assert pos + n <= seq_end  # never crosses into another sequence
        truth = store.read(pos, min(pos + n + 1, len(store)))
        assert s["input_ids"][:n].tolist() == truth.input_ids[:n].tolist()
        for t in range(n):
            want = int(truth.input_ids[t + 1]) if pos + t + 1 < seq_end else -100
            assert int(s["labels"][t]) == want
            # the teacher row at t is the distribution after reading input_ids[t]
            p = expected_p[s["input_ids"][t]]
            torch.testing.assert_close(s["probs"][t], p[s["ids"][t]], rtol=1e-5, atol=1e-6)
        assert (s["labels"][n:] == -100).all() and (s["probs"][n:] == 0).all()
        assert s["loss_mask"][:n].all() and not s["loss_mask"][n:].any()
        pos += n
    assert pos == len(store)


def test_shuffle_is_deterministic_and_covers_every_window(store_path: Path) -> None:
    plain = Counter(map(_key, LogitDataset(store_path, 16, shuffle=False)))
    a = [_key(s) for s in LogitDataset(store_path, 16, seed=1, block_positions=64)]
    b = [_key(s) for s in LogitDataset(store_path, 16, seed=1, block_positions=64)]
    c = LogitDataset(store_path, 16, seed=1, block_positions=64)
    c.set_epoch(1)
    assert a == b and Counter(a) == plain
    assert [_key(s) for s in c] != a and Counter(map(_key, c)) == plain


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_get_equal_counts_and_cover_everything(store_path: Path, workers: int) -> None:
    world, batch = 3, 4
    seen: Counter[tuple[int, ...]] = Counter()
    batches = []
    for rank in range(world):
        ds = LogitDataset(store_path, 16, seed=5, rank=rank, world_size=world, block_positions=64)
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
        got = list(loader)
        batches.append(len(got))
        for b in got:
            for i in range(len(b["input_ids"])):
                n = int(b["attention_mask"][i].sum())
                seen[tuple(b["input_ids"][i][:n].tolist())] += 1
    assert len(set(batches)) == 1, batches  # no rank waits for another at the epoch's end
    plain = Counter(map(_key, LogitDataset(store_path, 16, shuffle=False)))
    per_rank = len(LogitDataset(store_path, 16, rank=0, world_size=world))
    total = sum(seen.values())
    assert set(seen) == set(plain) and total == world * per_rank  # each rank: its share only
    repeats = total - sum(plain.values())
    assert 0 <= repeats < world  # only the few windows that fill the last ranks repeat


def test_workers_yield_the_same_samples_as_the_main_process(store_path: Path) -> None:
    ds = LogitDataset(store_path, 16, seed=2, block_positions=64)
    solo = Counter(_key(s) for s in ds)  # the main process has the store open now
    loader = DataLoader(ds, batch_size=None, num_workers=2)  # forked workers reopen it
    assert Counter(map(_key, loader)) == solo


def test_state_dict_resumes_exactly(store_path: Path) -> None:
    ds = LogitDataset(store_path, 16, seed=9, block_positions=64)
    full = [_key(s) for s in ds]
    first = LogitDataset(store_path, 16, seed=9, block_positions=64)
    it = iter(first)
    head = [_key(next(it)) for _ in range(7)]
    state = first.state_dict()
    resumed = LogitDataset(store_path, 16, seed=9, block_positions=64)
    resumed.load_state_dict(state)
    assert head + [_key(s) for s in resumed] == full
    with pytest.raises(logitstore.LogitStoreError, match="seed"):
        LogitDataset(store_path, 16, seed=10).load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(store_path: Path, workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        ds = LogitDataset(store_path, 16, seed=4, block_positions=64)
        return StatefulDataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate)

    reference = [b["input_ids"] for b in loader()]
    interrupted = loader()
    it = iter(interrupted)
    head = [next(it)["input_ids"] for _ in range(5)]
    state = interrupted.state_dict()
    del it, interrupted
    again = loader()
    again.load_state_dict(state)
    tail = [b["input_ids"] for b in again]
    got = head + tail
    assert len(got) == len(reference)
    for x, y in zip(got, reference, strict=True):
        assert torch.equal(x, y)


def test_collate_trims_to_the_longest_window(store_path: Path) -> None:
    ds = LogitDataset(store_path, 16, shuffle=False)
    samples = _all(ds)
    short = [s for s in samples if int(s["attention_mask"].sum()) < 10][:2]
    batch = collate(short)
    longest = max(int(s["attention_mask"].sum()) for s in short)
    assert batch["input_ids"].shape == (2, longest)
    assert batch["ids"].shape == (2, longest, 8) and batch["probs"].dtype == torch.float32


def test_bad_arguments(store_path: Path) -> None:
    with pytest.raises(logitstore.LogitStoreError, match="seq_len must be at least 2"):
        LogitDataset(store_path, 1)
    with pytest.raises(logitstore.LogitStoreError, match="tokenizer"):
        LogitDataset(store_path, 16, tokenizer_hash="sha256:other")
    LogitDataset(store_path, 16, tokenizer_hash="sha256:other", allow_tokenizer_mismatch=True)
    with pytest.raises(logitstore.LogitStoreError, match="rank 3"):
        LogitDataset(store_path, 16, rank=3, world_size=2)


def test_student_tokenizer_must_match_the_teachers(teacher, data_file: Path, tmp_path) -> None:
    from .conftest import make_teacher

    docs = logitstore.read_documents([data_file])
    seqs = logitstore.tokenize(docs, teacher.tokenizer, 32)
    out = logitstore.capture(
        teacher, seqs, tmp_path / "s", Encoding("topk", "u8", k=4), progress=False
    )
    LogitDataset(out, 16, tokenizer=teacher.tokenizer)  # the same tokenizer: accepted
    other = logitstore.load_teacher(str(make_teacher(tmp_path / "t2", vocab_size=290)), "cpu")
    with pytest.raises(logitstore.LogitStoreError, match="tokenizer"):
        LogitDataset(out, 16, tokenizer=other.tokenizer)


def test_resume_in_a_later_epoch_and_at_an_epochs_end(store_path: Path) -> None:
    def run(epoch: int) -> list[tuple[int, ...]]:
        ds = LogitDataset(store_path, 16, seed=9, block_positions=64)
        ds.set_epoch(epoch)
        return [_key(s) for s in ds]

    full = run(2)
    assert full != run(1)
    ds = LogitDataset(store_path, 16, seed=9, block_positions=64)
    ds.set_epoch(2)
    it = iter(ds)
    head = [_key(next(it)) for _ in range(11)]
    state = ds.state_dict()
    again = LogitDataset(store_path, 16, seed=9, block_positions=64)
    again.load_state_dict(state)
    assert again.epoch == 2 and head + [_key(s) for s in again] == full
    done = LogitDataset(store_path, 16, seed=9, block_positions=64)
    done.set_epoch(2)
    assert len(list(done)) == len(full)
    end = LogitDataset(store_path, 16, seed=9, block_positions=64)
    end.load_state_dict(done.state_dict())  # saved after the epoch's last sample
    assert list(end) == []  # nothing left of epoch 2; set_epoch(3) starts the next
    end.set_epoch(3)
    assert len(list(end)) == len(full)
