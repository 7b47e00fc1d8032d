"""transformers.Trainer and TRL's SFTTrainer training a real (tiny, random) GPT-2 student from
a store on CPU: the loss, gradient accumulation, resume from a Trainer checkpoint, the split
across torchrun ranks, and examples/hf_trainer.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import logitstore
from logitstore import Encoding, losses
from logitstore.train.hf import (
    KDConfig,
    KDTrainer,
    collate_for_trainer,
    kd_loss,
    kd_trainer_class,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, teacher: Any) -> Path:
    """A top-8 store of 10 sequences of 70 tokens written by the tiny GPT-2 teacher (it keeps
    its tokenizer, which SFTTrainer needs): 30 windows of 32 positions, ragged last windows."""
    rng = np.random.default_rng(0)
    seqs = logitstore.sequences_from_token_ids(
        [rng.integers(0, teacher.vocab_size, 70) for _ in range(10)], 64
    )
    path = tmp_path_factory.mktemp("hf") / "teacher.zarr"
    return Path(
        logitstore.capture(teacher, seqs, path, Encoding("topk", "u8", k=8), progress=False)
    )


def student(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_layer=1,
        n_embd=16,
        n_head=1,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def targs_dict(out: Path, **kw: Any) -> dict[str, Any]:
    """The tests' training arguments (as keywords, for TrainingArguments or SFTConfig)."""
    base: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return base | kw


def targs(out: Path, **kw: Any) -> TrainingArguments:
    return TrainingArguments(**targs_dict(out, **kw))


class Recorder(KDTrainer):  # type: ignore[misc, valid-type]
    """KDTrainer that records each micro-batch's input ids and loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[list[int]], float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        self.seen.append((step, inputs["input_ids"].tolist(), float(loss.detach())))
        return loss


class StopAt(TrainerCallback):
    """Stop a run after optimizer step ``step`` (after its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


# -- the loss --------------------------------------------------------------------------------


def test_kd_loss_is_the_alpha_mix_over_learned_positions(store: Path) -> None:
    ds = logitstore.LogitDataset(store, seq_len=32, shuffle=False)
    batch = collate_for_trainer([s for _, s in zip(range(4), ds, strict=False)])
    assert torch.equal(batch["shift_labels"], batch["labels"])
    torch.manual_seed(1)
    logits = torch.randn(*batch["input_ids"].shape, ds.metadata.vocab_size) * 2
    mask = batch["labels"] >= 0
    kd = losses.forward_kl(
        logits, batch["ids"], batch["probs"], batch["residual"], mask, temperature=2.0
    )
    ce = losses.cross_entropy(logits, batch["labels"])
    got = kd_loss(logits, batch, KDConfig(alpha=0.7, temperature=2.0))
    torch.testing.assert_close(got, 0.7 * kd + 0.3 * ce)
    # With the Trainer's count of the whole step, the sum is divided by it instead.
    n = int(mask.sum())
    torch.testing.assert_close(
        kd_loss(logits, batch, KDConfig(alpha=0.7, temperature=2.0), torch.tensor(2 * n)), got / 2
    )


def test_a_batch_without_learned_positions_has_loss_zero(store: Path) -> None:
    """Windows inside a prompt (labels all -100): 0, not 0 / 0 = NaN, with or without the
    Trainer's count."""
    ds = logitstore.LogitDataset(store, seq_len=32, shuffle=False)
    batch = collate_for_trainer([s for _, s in zip(range(2), ds, strict=False)])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    logits = torch.randn(*batch["input_ids"].shape, ds.metadata.vocab_size, requires_grad=True)
    for count in (None, torch.tensor(0), 0):
        for alpha in (1.0, 0.5):
            loss = kd_loss(logits, batch, KDConfig(alpha=alpha), count)
            assert float(loss.detach()) == 0.0
            (grad,) = torch.autograd.grad(loss, logits)
            assert not grad.any()


def test_reverse_kl_is_the_reverse_loss(store: Path) -> None:
    ds = logitstore.LogitDataset(store, seq_len=32, shuffle=False)
    batch = collate_for_trainer([s for _, s in zip(range(3), ds, strict=False)])
    logits = torch.randn(*batch["input_ids"].shape, ds.metadata.vocab_size)
    mask = batch["labels"] >= 0
    want = losses.reverse_kl(logits, batch["ids"], batch["probs"], batch["residual"], mask)
    torch.testing.assert_close(kd_loss(logits, batch, KDConfig(kd="reverse_kl")), want)


def test_persistent_workers_are_refused(store: Path, tmp_path: Path) -> None:
    ds = logitstore.LogitDataset(store, seq_len=32)
    args = targs(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)
    with pytest.raises(logitstore.LogitStoreError, match="persistent_workers=True keeps"):
        KDTrainer(model=student(ds.metadata.vocab_size), args=args, train_dataset=ds)


def test_evaluate_on_a_store(store: Path, tmp_path: Path) -> None:
    """`trainer.evaluate` on a LogitDataset: the mean of kd_loss over its batches."""
    ds = logitstore.LogitDataset(store, seq_len=32, shuffle=False)
    model = student(ds.metadata.vocab_size)
    config = KDConfig(alpha=0.5)
    trainer = KDTrainer(
        model=model,
        args=targs(tmp_path, per_device_eval_batch_size=8, prediction_loss_only=True),
        train_dataset=ds,
        kd=config,
    )
    got = trainer.evaluate(eval_dataset=ds)["eval_loss"]
    batches, samples = [], list(ds)
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            batch = collate_for_trainer(samples[i : i + 8])
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            batches.append((float(kd_loss(logits, batch, config)), len(batch["input_ids"])))
    # The Trainer weighs each batch's mean loss by its number of windows.
    want = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
    assert got == pytest.approx(want, rel=1e-5)


def test_bad_kd_settings_are_refused() -> None:
    with pytest.raises(logitstore.LogitStoreError, match=r"alpha must be in \[0, 1\]"):
        KDConfig(alpha=1.5)
    with pytest.raises(logitstore.LogitStoreError, match="temperature must be positive"):
        KDConfig(temperature=0)


def test_batch_without_teacher_targets_is_a_clear_error(store: Path, tmp_path: Path) -> None:
    ds = logitstore.LogitDataset(store, seq_len=32)
    trainer = KDTrainer(
        model=student(ds.metadata.vocab_size), args=targs(tmp_path), train_dataset=ds
    )
    with pytest.raises(logitstore.LogitStoreError, match="lacks ids, probs, residual, loss_mask"):
        trainer.compute_loss(
            trainer.model,
            {
                "input_ids": torch.zeros(1, 4, dtype=torch.long),
                "labels": torch.zeros(1, 4, dtype=torch.long),
            },
        )


def test_dataset_of_another_rank_is_refused(store: Path, tmp_path: Path) -> None:
    ds = logitstore.LogitDataset(store, seq_len=32, rank=1, world_size=2)
    trainer = KDTrainer(
        model=student(ds.metadata.vocab_size), args=targs(tmp_path), train_dataset=ds
    )
    with pytest.raises(logitstore.LogitStoreError, match="made for rank 1 of 2"):
        trainer.get_train_dataloader()


# -- training --------------------------------------------------------------------------------


def test_gradient_accumulation_gives_the_large_batch_gradient(store: Path, tmp_path: Path) -> None:
    """One step of 2 micro-batches of 2 windows = one step of 4 windows (windows differ in
    length, so this holds only when the sum is divided by the whole step's count)."""
    params = []
    for bs, ga in ((4, 1), (2, 2)):
        ds = logitstore.LogitDataset(store, seq_len=32, seed=3)
        model = student(ds.metadata.vocab_size)
        args = targs(
            tmp_path / f"{bs}",
            max_steps=1,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0,
        )
        KDTrainer(model=model, args=args, train_dataset=ds, kd=KDConfig(alpha=0.5)).train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "workers"), [(3, 0), (5, 1)])
def test_resume_from_checkpoint_sees_the_same_batches_and_losses(
    store: Path, tmp_path: Path, stop: int, workers: int
) -> None:
    """An uninterrupted 6-step run against one stopped after step ``stop`` (at 4 steps an
    epoch: inside epoch 0 or 1) and resumed from its checkpoint by a new trainer."""

    def run(out: Path, callbacks: list[Any], resume: str | None = None) -> Recorder:
        ds = logitstore.LogitDataset(store, seq_len=32, seed=7)
        args = targs(
            out,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=stop,
            dataloader_num_workers=workers,
        )
        trainer = Recorder(
            model=student(ds.metadata.vocab_size),
            args=args,
            train_dataset=ds,
            kd=KDConfig(alpha=0.8, temperature=1.5),
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", [])
    assert full.state.global_step == 6 and len(full.seen) == 12
    first = run(tmp_path / "stopped", [StopAt(stop)])
    assert first.state.global_step == stop
    resumed = run(tmp_path / "stopped", [], resume=str(tmp_path / "stopped" / f"checkpoint-{stop}"))
    assert resumed.state.global_step == 6
    assert [s[1] for s in first.seen + resumed.seen] == [s[1] for s in full.seen]  # same batches
    torch.testing.assert_close(
        [s[2] for s in first.seen + resumed.seen], [s[2] for s in full.seen], rtol=1e-5, atol=1e-6
    )
    # An epoch is every window once: 30 windows, 8 micro-batches (the last one of 2 windows).
    epoch0 = [row for _, rows, _ in full.seen[:8] for row in rows]
    assert len(epoch0) == len(logitstore.LogitDataset(store, seq_len=32))


@pytest.mark.slow
def test_a_served_store_trains_like_the_local_one(store: Path, tmp_path: Path) -> None:
    """The same run from the store's URL (a real `logitstore serve` process) and from disk."""
    from .test_server import Server

    srv = Server([store]).start()
    try:
        runs = []
        for source in (str(store), srv.url(store.name)):
            ds = logitstore.LogitDataset(source, seq_len=32, seed=2)
            trainer = Recorder(
                model=student(ds.metadata.vocab_size),
                args=targs(tmp_path / str(len(runs)), max_steps=3),
                train_dataset=ds,
                kd=KDConfig(alpha=0.7),
            )
            trainer.train()
            runs.append(trainer.seen)
    finally:
        srv.stop()
    assert [s[1] for s in runs[0]] == [s[1] for s in runs[1]]
    assert [s[2] for s in runs[0]] == pytest.approx([s[2] for s in runs[1]], rel=1e-6)


@pytest.mark.slow
def test_sft_trainer_trains_on_the_store_like_trainer(store: Path, tmp_path: Path) -> None:
    """TRL's SFTTrainer with the mixin computes the same losses as KDTrainer on the same data."""
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tok = logitstore.open(store).tokenizer()
    assert tok is not None
    losses_by = {}
    for name in ("transformers", "trl"):
        ds = logitstore.LogitDataset(store, seq_len=32, seed=1)
        model = student(ds.metadata.vocab_size)
        common = targs_dict(tmp_path / name, max_steps=3)
        if name == "trl":
            trainer = kd_trainer_class(SFTTrainer)(
                # SFTConfig defaults to bf16 and activation checkpointing: the same numerics here
                model=model,
                args=SFTConfig(**common, bf16=False, gradient_checkpointing=False),
                train_dataset=ds,
                kd=KDConfig(alpha=0.5),
                processing_class=PreTrainedTokenizerFast(tokenizer_object=tok),
            )
        else:
            trainer = KDTrainer(
                model=model,
                args=TrainingArguments(**common),
                train_dataset=ds,
                kd=KDConfig(alpha=0.5),
            )
        trainer.train()
        losses_by[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses_by["trl"]) == 3
    assert losses_by["trl"] == pytest.approx(losses_by["transformers"], rel=1e-5)


TORCHRUN_SCRIPT = """
import json, os, sys
import torch
from transformers import TrainingArguments
import logitstore
from logitstore.train.hf import KDConfig, KDTrainer
sys.path.insert(0, {tests!r})
from test_hf_trainer import student

class Rec(KDTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.rows = getattr(self, "rows", []) + [inputs["input_ids"].tolist()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

args = TrainingArguments(output_dir={out!r}, max_steps=4, per_device_train_batch_size=3,
    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
    seed=0, disable_tqdm=True)
ds = logitstore.LogitDataset({store!r}, seq_len=32, seed=5)  # made after the process group
trainer = Rec(model=student(ds.metadata.vocab_size), args=args, train_dataset=ds, kd=KDConfig())
trainer.train()
rank = int(os.environ["RANK"])
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"rows": trainer.rows, "world": trainer.args.world_size}}, f)
"""


@pytest.mark.slow
def test_torchrun_ranks_get_equal_disjoint_shares(store: Path, tmp_path: Path) -> None:
    """Two real torchrun processes (gloo on CPU): each trains on its own equal share."""
    script = tmp_path / "run.py"
    script.write_text(
        TORCHRUN_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path), store=str(store))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["world"] for g in got] == [2, 2]
    assert len(got[0]["rows"]) == len(got[1]["rows"]) == 4  # every rank: every step
    assert [len(b) for b in got[0]["rows"]] == [len(b) for b in got[1]["rows"]]
    # 30 windows, 15 per rank: the first 12 windows of each rank are different windows.
    windows = [tuple(r) for g in got for b in g["rows"] for r in b]
    assert len(set(windows)) == len(windows) == 24
    # And exactly the windows a LogitDataset of that rank yields, in its order.
    for rank in (0, 1):
        ds = logitstore.LogitDataset(store, seq_len=32, seed=5, rank=rank, world_size=2)
        expect = [s["input_ids"][: int(s["attention_mask"].sum())].tolist() for s in ds][:12]
        seen = [r for b in got[rank]["rows"] for r in b]  # rows padded to their batch's longest
        assert [r[: len(e)] for r, e in zip(seen, expect, strict=True)] == expect


EVAL_SCRIPT = """
import json, os, sys
from transformers import TrainingArguments
import logitstore
from logitstore.train.hf import KDConfig, KDTrainer
sys.path.insert(0, {tests!r})
from test_hf_trainer import student

args = TrainingArguments(output_dir={out!r}, per_device_eval_batch_size=4, report_to=[],
    use_cpu=True, ddp_backend="gloo", prediction_loss_only=True, disable_tqdm=True)
ds = logitstore.LogitDataset({store!r}, seq_len=32, shuffle=False)
trainer = KDTrainer(model=student(ds.metadata.vocab_size), args=args, train_dataset=ds,
    kd=KDConfig(alpha=0.5))
loss = trainer.evaluate(eval_dataset=ds)["eval_loss"]
if os.environ["RANK"] == "0":
    with open(os.path.join({out!r}, "eval.json"), "w") as f:
        json.dump(loss, f)
# Left to interpreter exit, gloo's teardown aborted a rank once in a loaded CI run
# ("terminate called without an active exception"): end the group as a training script should.
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_evaluate_on_two_ranks_counts_every_ranks_batches(store: Path, tmp_path: Path) -> None:
    """Two torchrun ranks evaluating a store (15 windows each: batches of 4, 4, 4, 3): each
    step's loss is its token mean over both ranks (the Trainer's count), and the last step
    counts both ranks' 3 windows (accelerate's gather_for_metrics kept rank 0's alone)."""
    script = tmp_path / "run.py"
    script.write_text(
        EVAL_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path), store=str(store))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    model = student(logitstore.open(store).metadata.vocab_size)
    config = KDConfig(alpha=0.5)
    shares = [
        list(logitstore.LogitDataset(store, seq_len=32, shuffle=False, rank=r, world_size=2))
        for r in (0, 1)
    ]
    steps = []
    with torch.no_grad():
        for i in range(0, len(shares[0]), 4):
            sums, count = 0.0, 0
            for share in shares:
                batch = collate_for_trainer(share[i : i + 4])
                n = int((batch["labels"] >= 0).sum())
                mask = batch["attention_mask"]
                logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
                sums += float(kd_loss(logits, batch, config)) * n
                count += n
            steps.append((sums / count, len(shares[0][i : i + 4])))
    want = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
    assert got == pytest.approx(want, rel=1e-5)


# -- the example -----------------------------------------------------------------------------


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples/hf_trainer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_trains_and_resumes(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _example()
    out = tmp_path / "student"
    argv = [
        "--store",
        str(store),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--save-every",
        "1",
        "--layers",
        "1",
        "--embd",
        "32",
    ]
    assert example.main(argv) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "final" / "config.json").is_file()
    assert "trained 2 steps" in capsys.readouterr().out
    # Resuming a finished run trains nothing more; a longer one continues from step 2.
    assert example.main([*argv[:5], "3", *argv[6:], "--resume", "--trainer", "trl"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out


@pytest.mark.parametrize(("alpha", "temperature"), [(1.0, 1.0), (0.5, 2.0), (0.3, 1.0)])
def test_the_fused_kd_loss_equals_the_separate_losses(alpha: float, temperature: float) -> None:
    # kd_loss computes forward KL + CE fused (train/fused.py); value and gradient must be
    # those of losses.forward_kl + losses.cross_entropy over the learned positions.
    from logitstore import losses
    from logitstore.train.hf import KDConfig, kd_loss

    g = torch.Generator().manual_seed(0)
    b, t, v, k = 2, 7, 50, 5
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k].sort().values for _ in range(b * t)])
    ids = ids.view(b, t, k)
    probs = torch.rand(b, t, k, generator=g)
    probs = probs / probs.sum(-1, keepdim=True) * 0.8
    residual = torch.full((b, t), 0.2)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    batch = {"labels": labels, "ids": ids, "probs": probs, "residual": residual}
    fused = kd_loss(logits, batch, KDConfig(alpha=alpha, temperature=temperature))
    (g_fused,) = torch.autograd.grad(fused, logits)
    mask = labels >= 0
    kl = losses.forward_kl(
        logits, ids, probs, residual, mask, temperature=temperature, reduction="sum"
    )
    ce = losses.cross_entropy(logits, labels, reduction="sum")
    plain = (alpha * kl + (1 - alpha) * ce) / mask.sum()
    (g_plain,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-7)
