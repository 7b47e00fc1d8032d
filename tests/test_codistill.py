"""Co-distillation with real Hugging Face models: gradients stay apart, and a resumed run
equals an uninterrupted one."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import logitstore
from logitstore import Encoding, losses
from logitstore.write.inputs import Document

from .conftest import CORPUS

ROOT = Path(__file__).resolve().parent.parent


def _student(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _models(teacher_dir: Path) -> tuple[Any, GPT2LMHeadModel]:
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    for m in t.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return t, _student(int(t.config.vocab_size))


@pytest.fixture(scope="module")
def corpus(teacher) -> logitstore.Sequences:  # type: ignore[no-untyped-def]
    docs = [Document(t * 3, "corpus") for t in CORPUS]
    return logitstore.tokenize(docs, teacher.tokenizer, None)


def test_the_students_gradient_does_not_reach_the_teacher(teacher_dir: Path, corpus) -> None:
    teacher, student = _models(teacher_dir)
    reference = copy.deepcopy(teacher).train()  # the mode codistillation_step trains in
    batch = logitstore.window_batches(corpus, 4, 24, seed=0)(0)
    # lr 0: the teacher's weights stay, so its gradient can be compared afterwards
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.0)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = copy.deepcopy(student.state_dict())
    logitstore.codistillation_step(
        teacher, student, batch, 1.0, t_opt, s_opt, max_grad_norm=None
    )  # alpha 1: the student learns from the teacher alone
    # the teacher's gradient is exactly that of its own cross-entropy
    ce = losses.cross_entropy(
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    ce.backward()  # type: ignore[no-untyped-call]
    for (name, p), q in zip(teacher.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        # equal up to float rounding (two model copies may take differently aligned kernels);
        # the student's KD gradient, had it leaked, would be of the order of the CE's own
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
    # and the student did learn from it
    after = student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_logit_kl_is_the_full_vocabulary_kl() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    t[0, 0, 3] = float("-inf")  # an impossible token counts 0·log 0 = 0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    got = losses.logit_kl(s, t, mask, reduction="none")
    p = torch.softmax(t, -1)
    want = torch.nn.functional.kl_div(torch.log_softmax(s, -1), p, reduction="none").sum(-1) * mask
    torch.testing.assert_close(got, want)
    s.requires_grad_(True)
    t.requires_grad_(True)
    losses.logit_kl(s, t).backward()  # type: ignore[no-untyped-call]
    assert s.grad is not None and t.grad is None  # the teacher side is detached


def _run(
    teacher_dir: Path, corpus: logitstore.Sequences, out: Path, **kw: Any
) -> tuple[list[logitstore.CodistillStep], Any, GPT2LMHeadModel]:
    teacher, student = _models(teacher_dir)
    t_opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    s_opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (t_opt, s_opt)
    ]
    held = logitstore.Sequences(corpus.input_ids[:60], np.array([0, 60], dtype=np.int64))
    steps = logitstore.codistill(
        teacher,
        student,
        t_opt,
        s_opt,
        logitstore.window_batches(corpus, 3, 20, seed=4),
        7,
        alpha=losses.LinearWarmup(0.0, 0.8, 5),
        schedulers=schedulers,
        checkpoint=out / "ckpt.pt",
        checkpoint_every=2,
        record=logitstore.Recording(held, out / "records", Encoding("topk", "u8", k=8), every=3),
        progress=False,
        **kw,
    )
    return steps, teacher, student


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but the writers' lock files (who held them, and when)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_a_diverged_loss_stops_before_the_update(teacher_dir: Path, corpus) -> None:
    teacher, student = _models(teacher_dir)
    t_opt, s_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (teacher, student))
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")
    before = copy.deepcopy(teacher.state_dict())
    batch = logitstore.window_batches(corpus, 2, 16)(0)
    with pytest.raises(logitstore.LogitStoreError, match="teacher's loss is nan at step 0"):
        logitstore.codistillation_step(teacher, student, batch, 0.5, t_opt, s_opt)
    after = teacher.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Bit-for-bit comparisons need a bit-reproducible forward: with two intra-op threads,
    torch's CPU kernels are not always (see conftest.deterministic_env)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_equals_an_uninterrupted_one(
    teacher_dir: Path, corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    whole, t_a, s_a = _run(teacher_dir, corpus, tmp_path / "a")
    assert [r.step for r in whole] == list(range(7))
    first, _, _ = _run(teacher_dir, corpus, tmp_path / "b", stop_after=3)
    assert [r.step for r in first] == [0, 1, 2]
    rest, t_b, s_b = _run(teacher_dir, corpus, tmp_path / "b")  # fresh models: from the checkpoint
    assert [r.step for r in rest] == [3, 4, 5, 6]
    assert first + rest == whole  # every loss and alpha, bit for bit
    for a, b in ((t_a, t_b), (s_a, s_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # (each store's writer flock, .NAME.lock, stays beside it: write/lock.py)
    records = sorted(p.name for p in (tmp_path / "a" / "records").iterdir() if p.name[0] != ".")
    assert records == [
        "teacher-step000003.zarr",
        "teacher-step000006.zarr",
        "teacher-step000007.zarr",
    ]
    assert _files(tmp_path / "a" / "records") == _files(tmp_path / "b" / "records")
    # the recorded store holds the final teacher's distributions
    final = logitstore.open(tmp_path / "a" / "records" / records[-1])
    assert final.metadata.teacher["step"] == 7
    ids = torch.from_numpy(final.read(0, 60).input_ids)[None]
    with torch.no_grad():
        p = torch.softmax(t_a(input_ids=ids).logits[0], -1)
    stored = final.read(0, 60)
    got = torch.gather(p, 1, torch.from_numpy(stored.ids))
    torch.testing.assert_close(got, torch.from_numpy(stored.probs), atol=2e-3, rtol=0)


def test_a_checkpoint_of_another_run_is_refused(teacher_dir: Path, corpus, tmp_path: Path) -> None:
    _run(teacher_dir, corpus, tmp_path / "a", stop_after=2)
    teacher, student = _models(teacher_dir)
    opts = [torch.optim.AdamW(m.parameters()) for m in (teacher, student)]
    with pytest.raises(logitstore.LogitStoreError, match="run of 7 steps, not 9"):
        logitstore.codistill(
            teacher, student, *opts, logitstore.window_batches(corpus, 2, 16), 9,
            checkpoint=tmp_path / "a" / "ckpt.pt", progress=False,
        )  # fmt: skip
    with pytest.raises(logitstore.LogitStoreError, match="float16 weights"):
        logitstore.codistill(
            teacher.half(), student, *opts, logitstore.window_batches(corpus, 2, 16), 9,
            progress=False,
        )  # fmt: skip
    teacher.float()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(logitstore.LogitStoreError, match="remove it to start again"):
        logitstore.codistill(
            teacher, student, *opts, logitstore.window_batches(corpus, 2, 16), 9,
            checkpoint=tmp_path / "junk.pt", progress=False,
        )  # fmt: skip


def test_a_refused_checkpoint_leaves_models_and_optimizers_untouched(
    teacher_dir: Path, corpus, tmp_path: Path
) -> None:
    _run(teacher_dir, corpus, tmp_path / "a", stop_after=2)  # saved with no LR scheduler
    teacher, student = _models(teacher_dir)
    opts = [torch.optim.AdamW(m.parameters()) for m in (teacher, student)]
    sched = torch.optim.lr_scheduler.LambdaLR(opts[1], lambda step: 1.0)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, student)]
    with pytest.raises(logitstore.LogitStoreError, match="LR scheduler"):
        logitstore.codistill(
            teacher, student, *opts, logitstore.window_batches(corpus, 2, 16), 7,
            schedulers=[sched], checkpoint=tmp_path / "a" / "ckpt.pt", progress=False,
        )  # fmt: skip
    for m, saved in zip((teacher, student), before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, saved[k]), k  # nothing was half-loaded before the refusal
    assert all(not o.state for o in opts)


def test_a_checkpoint_of_another_student_is_refused_before_anything_loads(
    teacher_dir: Path, corpus, tmp_path: Path
) -> None:
    _run(teacher_dir, corpus, tmp_path / "a", stop_after=2)
    teacher, _ = _models(teacher_dir)
    torch.manual_seed(2)
    wider = GPT2LMHeadModel(
        GPT2Config(vocab_size=int(teacher.config.vocab_size), n_positions=32, n_embd=32,
                   n_layer=1, n_head=2)
    )  # fmt: skip
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (teacher, wider)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, wider)]
    with pytest.raises(logitstore.LogitStoreError, match=r"the student's .* is \(\d+, 16\)"):
        logitstore.codistill(
            teacher, wider, *opts, logitstore.window_batches(corpus, 3, 20, seed=4), 7,
            schedulers=scheds, checkpoint=tmp_path / "a" / "ckpt.pt", progress=False,
        )  # fmt: skip
    for m, saved in zip((teacher, wider), before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, saved[k]), k  # the teacher was not loaded either


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_example_stops_and_resumes_to_the_same_log(teacher_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("codistill", ROOT / "examples/codistill.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t * 4}) + "\n" for t in CORPUS))
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"text": CORPUS[0] * 2}) + "\n")
    common = [
        "--data", str(data), "--eval-data", str(held), "--teacher", str(teacher_dir),
        "--steps", "8", "--batch-size", "2", "--seq-len", "24", "--layers", "1", "--embd", "32",
        "--checkpoint-every", "3", "--record-every", "4", "--no-progress",
    ]  # fmt: skip
    assert example.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert example.main([*common, "--out", str(tmp_path / "b"), "--stop-at", "5"]) == 0
    assert example.main([*common, "--out", str(tmp_path / "b")]) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "a" / "summary.json").read_text())
    assert logitstore.verify(tmp_path / "b" / "records" / "teacher-step000008.zarr").ok
