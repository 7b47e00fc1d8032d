"""Production vocabulary sizes end to end: Llama 3 (128,256), Qwen 2.5 7B (a head of 152,064
over a tokenizer of 151,936) and Gemma 3 (262,144). Randomly initialised one-layer GPT-2
teachers with a 16-wide hidden state, so the vocabulary is what costs: write, read, verify,
serve, Dataset and losses, with uint32 ids throughout. A student with the smaller Qwen
vocabulary is refused, or has the padded ids' mass folded into the residual on request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.read.dataset import LogitDataset, collate, fold_to_vocab
from logitstore.train.losses import forward_kl, reverse_kl

from .test_server import Server

# name: (output layer, tokenizer)
VOCABS = {"llama3": (128_256, 128_256), "qwen25": (152_064, 151_936), "gemma3": (262_144, 262_144)}
QWEN_STUDENT = 151_936
K = 32


def make_large_teacher(path: Path, model_vocab: int, tokenizer_size: int) -> Path:
    """A one-layer GPT-2 with ``model_vocab`` outputs and a word-level tokenizer of
    ``tokenizer_size`` tokens (``t2`` … ``t{size-1}``: text names its ids), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    vocab.update((f"t{i}", i) for i in range(2, tokenizer_size))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=model_vocab,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # peaked distributions, as a trained model's
        model.lm_head.weight.mul_(40.0)
        # Rows past the tokenizer were never trained and may hold anything: here, three
        # times the norm of the others, so the teacher predicts them at some positions.
        model.lm_head.weight[tokenizer_size:].mul_(3.0)
    model.save_pretrained(path)
    return path


class Large:
    """A teacher of one vocabulary size, its sequences and its top-k store."""

    def __init__(self, root: Path, name: str) -> None:
        model_vocab, tokenizer_size = VOCABS[name]
        self.teacher = logitstore.load_teacher(
            str(make_large_teacher(root / f"{name}-teacher", model_vocab, tokenizer_size)), "cpu"
        )
        rng = np.random.default_rng(1)
        # Ids from all over the tokenizer, the top of its range included.
        texts = [
            " ".join(f"t{i}" for i in [tokenizer_size - 1, *rng.integers(2, tokenizer_size, n)])
            for n in (40, 9, 23)
        ]
        tokenized = [self.teacher.tokenizer(t)["input_ids"] for t in texts]
        self.sequences = logitstore.sequences_from_token_ids(tokenized, 24)
        self.store = logitstore.capture(
            self.teacher,
            self.sequences,
            root / name,
            Encoding("topk", "u8", k=K),
            batch_size=4,
            progress=False,
        )

    def live(self, seq: np.ndarray) -> np.ndarray:
        """The teacher's probabilities ``(T, V)`` (float64) on one sequence alone."""
        with torch.no_grad():
            x = torch.from_numpy(seq)[None]
            return torch.softmax(self.teacher.fn(x, torch.ones_like(x))[0].double(), -1).numpy()


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Large]:
    root = tmp_path_factory.mktemp("large")
    return {name: Large(root, name) for name in VOCABS}


@pytest.fixture(scope="module")
def server(large: dict[str, Large]) -> Iterator[Server]:
    srv = Server([x.store for x in large.values()]).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", VOCABS)
def test_write_read_verify_with_uint32_ids(large: dict[str, Large], name: str) -> None:
    x = large[name]
    model_vocab, tokenizer_size = VOCABS[name]
    store = logitstore.open(x.store)
    md = store.metadata
    assert (md.vocab_size, md.tokenizer["size"]) == (model_vocab, tokenizer_size)  # type: ignore[index]
    assert md.layout.id_dtype == "uint32"
    got = store.read(0, len(store))
    assert got.input_ids.max() == tokenizer_size - 1  # input ids above 65535 round-trip
    assert got.ids.max() > 65535
    for i in range(store.num_sequences):
        s0, s1 = int(store.offsets[i]), int(store.offsets[i + 1])
        p = x.live(got.input_ids[s0:s1])  # (T, V)
        top = np.argsort(-p, axis=1)[:, :K]
        assert (got.ids[s0:s1] == np.sort(top, axis=1)).all()
        tail = 1 - np.take_along_axis(p, top, 1).sum(1)
        np.testing.assert_allclose(got.residual[s0:s1], tail, rtol=1e-3, atol=1e-6)
        stored = np.take_along_axis(p, got.ids[s0:s1], 1)
        np.testing.assert_allclose(got.probs[s0:s1], stored, atol=4e-3)  # u8: 255 sqrt bins
    assert logitstore.verify(x.store).ok


def test_served_stores_read_and_load_bit_identically(
    large: dict[str, Large], server: Server
) -> None:
    for x in large.values():
        remote, local = logitstore.open(server.url(x.store.name)), logitstore.open(x.store)
        assert remote.metadata == local.metadata
        a, b = remote.read(0, len(local)), local.read(0, len(local))
        assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
        over_http = LogitDataset(server.url(x.store.name), 16, seed=1)
        for got, want in zip(over_http, LogitDataset(x.store, 16, seed=1), strict=True):
            assert all(torch.equal(got[k], want[k]) for k in got)


def _bucket_kl(p: np.ndarray, ids: np.ndarray, logits: torch.Tensor) -> float:
    """Forward KL with one residual bucket, from the teacher's full probabilities ``p``
    ``(n, V)`` over candidates ``ids`` ``(n, m)`` (float64, written out independently)."""
    q = torch.softmax(logits.double(), -1).numpy()
    p_s, q_s = np.take_along_axis(p, ids, 1), np.take_along_axis(q, ids, 1)
    r, q_r = 1 - p_s.sum(1), 1 - q_s.sum(1)
    return float(np.mean((p_s * np.log(p_s / q_s)).sum(1) + r * np.log(r / q_r)))


@pytest.mark.parametrize("name", ["llama3", "gemma3"])
def test_dataset_and_losses_match_the_live_teacher(large: dict[str, Large], name: str) -> None:
    x = large[name]
    vocab = VOCABS[name][0]
    ds = LogitDataset(x.store, 16, shuffle=False)
    batch = collate([next(iter(ds))])
    assert batch["ids"].dtype == torch.int32 and int(batch["ids"].max()) < vocab
    n = int(batch["attention_mask"].sum())
    student = torch.randn(1, 16, vocab, generator=torch.Generator().manual_seed(0)) * 4
    student.requires_grad_(True)
    args = (batch["ids"], batch["probs"], batch["residual"], batch["attention_mask"])
    loss = forward_kl(student, *args, chunk_size=8)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    p = x.live(batch["input_ids"][0, :n].numpy())
    ref = _bucket_kl(p, batch["ids"][0, :n].long().numpy(), student[0, :n].detach())
    assert abs(loss.detach().item() - ref) < 2e-3 * max(1.0, ref)  # u8 values against exact ones
    assert torch.isfinite(reverse_kl(student.detach(), *args))


def test_a_student_without_the_padded_ids_is_refused(large: dict[str, Large]) -> None:
    # Qwen 2.5 7B's head has 128 ids past its tokenizer; a random head predicts them as
    # often as any other id, so some stored candidates are there.
    x = large["qwen25"]
    assert (
        int(logitstore.open(x.store).read(0, len(x.sequences.input_ids)).ids.max()) >= QWEN_STUDENT
    )
    batch = collate(list(LogitDataset(x.store, 16, shuffle=False)))
    student = torch.zeros(*batch["ids"].shape[:2], QWEN_STUDENT)
    args = (batch["ids"], batch["probs"], batch["residual"], batch["attention_mask"])
    for loss in (forward_kl, reverse_kl):
        with pytest.raises(logitstore.LogitStoreError, match="student_vocab_size=151936"):
            loss(student, *args)


def test_folding_moves_exactly_the_padded_ids_mass_into_the_residual(
    large: dict[str, Large],
) -> None:
    x = large["qwen25"]
    store = logitstore.open(x.store)
    ds = LogitDataset(x.store, 16, shuffle=False, student_vocab_size=QWEN_STUDENT)
    assert ds.vocab_size == QWEN_STUDENT
    dropped_rows = 0
    for w, sample in enumerate(ds):
        a, e = int(ds._starts[w]), int(ds._ends[w])
        n = e - a
        raw = store.read(a, e)
        ids, probs, res = (
            sample["ids"][:n].numpy(),
            sample["probs"][:n].numpy(),
            sample["residual"][:n].numpy(),
        )
        assert ids.max() < QWEN_STUDENT
        out = raw.ids >= QWEN_STUDENT  # (n, m) what the student lacks
        dropped = np.where(out, raw.probs, 0).sum(1, dtype=np.float64)
        dropped_rows += int((dropped > 0).sum())
        # the folded mass is the dropped ids' mass (one float32 rounding of the residual)
        np.testing.assert_allclose(res.astype(np.float64) - raw.residual, dropped, atol=6e-8)
        # nothing else moves: kept candidates as stored, dropped ones now padding
        assert (probs[~out] == raw.probs[~out]).all() and (ids[~out] == raw.ids[~out]).all()
        assert (probs[out] == 0).all() and (ids[out] == 0).all()
        np.testing.assert_allclose(probs.sum(1, dtype=np.float64) + res, 1.0, atol=2e-6)
    assert dropped_rows > 0
    # the losses accept the folded targets, and score them as the residual bucket says
    batch = collate(list(ds))
    student = torch.randn(
        *batch["ids"].shape[:2], QWEN_STUDENT, generator=torch.Generator().manual_seed(2)
    )
    args = (batch["ids"], batch["probs"], batch["residual"], batch["attention_mask"])
    assert torch.isfinite(forward_kl(student, *args)) and torch.isfinite(reverse_kl(student, *args))


def test_folding_a_full_store_cuts_its_columns(large: dict[str, Large], tmp_path: Path) -> None:
    x = large["qwen25"]
    one = logitstore.sequences_from_token_ids([x.sequences.input_ids[:6]], 6)
    out = logitstore.capture(
        x.teacher, one, tmp_path / "full", Encoding("full", "fp16"), progress=False
    )
    raw = logitstore.open(out).read(0, 6)
    folded = fold_to_vocab(raw, QWEN_STUDENT, full=True)
    assert folded.ids.shape == folded.probs.shape == (6, QWEN_STUDENT)
    assert (folded.ids[0] == np.arange(QWEN_STUDENT)).all()
    dropped = raw.probs[:, QWEN_STUDENT:].sum(1, dtype=np.float64)
    assert (dropped > 0).all()
    np.testing.assert_allclose(folded.residual, dropped, rtol=1e-6)
    np.testing.assert_allclose(
        folded.probs.sum(1, dtype=np.float64) + folded.residual, 1, atol=1e-5
    )
    sample = next(iter(LogitDataset(out, 6, shuffle=False, student_vocab_size=QWEN_STUDENT)))
    assert sample["ids"].shape == (6, QWEN_STUDENT)
    assert torch.equal(sample["residual"], torch.from_numpy(folded.residual))


def test_input_tokens_a_student_cannot_read_are_refused(large: dict[str, Large]) -> None:
    ds = LogitDataset(large["qwen25"].store, 16, shuffle=False, student_vocab_size=1000)
    with pytest.raises(
        logitstore.LogitStoreError, match="outside the student's vocabulary of 1000"
    ):
        list(ds)
    with pytest.raises(logitstore.LogitStoreError, match="positive"):
        LogitDataset(large["qwen25"].store, 16, student_vocab_size=0)
