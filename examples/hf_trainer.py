"""Distil a student with Hugging Face ``transformers.Trainer`` (or TRL's ``SFTTrainer``) from a
logitstore store, local or served over HTTP.

    python examples/hf_trainer.py --store out/demo/teacher.zarr --out out/hf_student
    python examples/hf_trainer.py --store http://127.0.0.1:8000/v1/stores/teacher.zarr --trainer trl
    torchrun --nproc-per-node 2 examples/hf_trainer.py --store out/demo/teacher.zarr

Loss: ``alpha · KD + (1 − alpha) · CE``, KD the forward KL to the stored teacher with its
residual bucket (``--kd reverse_kl`` for the reverse). Every rank reads its own equal share of
the store's windows. Checkpoints go to ``--out`` every ``--save-every`` steps; ``--resume``
continues from the newest one with the same batches an uninterrupted run would have seen.
The student is ``--student`` (a local Hugging Face model directory) or, by default, a small
GPT-2 built from a config with the store's vocabulary (no download).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, TrainingArguments

import logitstore
from logitstore.train.hf import KDConfig, KDTrainer, kd_trainer_class


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="a store directory or http(s):// URL")
    p.add_argument("--out", default="out/hf_student", help="checkpoints and the final model")
    p.add_argument("--trainer", choices=["transformers", "trl"], default="transformers")
    p.add_argument("--student", help="a local Hugging Face model directory (default: a new GPT-2)")
    p.add_argument(
        "--tokenizer", help="a local tokenizer directory for --trainer trl (default: the store's)"
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of KD against CE (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="student temperature for KD")
    p.add_argument("--kd", choices=["forward_kl", "reverse_kl"], default="forward_kl")
    p.add_argument("--layers", type=int, default=2, help="layers of the default student")
    p.add_argument("--embd", type=int, default=96, help="width of the default student")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    return p.parse_args(argv)


def make_student(vocab: int, args: argparse.Namespace) -> PreTrainedModel:
    if args.student:
        from transformers import AutoModelForCausalLM

        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(args.student)
        return model
    torch.manual_seed(args.seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=args.seq_len,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=max(1, args.embd // 32),
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,  # no dropout: a resumed run then matches an uninterrupted one exactly
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def training_args(args: argparse.Namespace) -> TrainingArguments:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    common: dict[str, Any] = dict(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, args.steps // 10),
        logging_steps=10,
        save_steps=args.save_every,
        dataloader_num_workers=args.workers,
        seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        # torchrun on CPUs: gloo (NCCL needs GPUs)
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )
    if args.trainer == "trl":
        from trl import SFTConfig

        return SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
    return TrainingArguments(**common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kd = KDConfig(alpha=args.alpha, temperature=args.temperature, kd=args.kd)
    train_args = training_args(args)  # first: it starts torch.distributed under torchrun
    dataset = logitstore.LogitDataset(args.store, seq_len=args.seq_len, seed=args.seed)
    student = make_student(dataset.metadata.vocab_size, args)
    extra: dict[str, Any] = {}
    trainer_cls = KDTrainer
    if args.trainer == "trl":
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        from trl import SFTTrainer

        if args.tokenizer:
            extra["processing_class"] = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tok = logitstore.open(args.store).tokenizer()
            if tok is None:
                sys.exit(
                    f"{args.store} holds no tokenizer; SFTTrainer needs one: pass --tokenizer DIR"
                )
            extra["processing_class"] = PreTrainedTokenizerFast(tokenizer_object=tok)
        trainer_cls = kd_trainer_class(SFTTrainer)
    trainer = trainer_cls(model=student, args=train_args, train_dataset=dataset, kd=kd, **extra)
    resume = args.resume and any(Path(args.out).glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(Path(args.out) / "final"))
    if trainer.is_world_process_zero():
        print(f"trained {trainer.state.global_step} steps; final loss {result.training_loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
