"""The students of tradeoff.py and methods.py: one recipe, one training loop over the same
batches for every way of distilling, and one held-out evaluation."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import logitstore
from benchlib.corpus import held_out_documents
from benchlib.models import gpt2
from logitstore import LogitDataset, collate, losses
from logitstore.write.inputs import Document


@dataclass(frozen=True)
class StudentRecipe:
    """How every student of a study is built and trained (the options of
    :func:`add_student_args`)."""

    seq_len: int
    batch: int
    steps: int
    layers: int
    embd: int
    lr: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StudentRecipe:
        return cls(
            args.seq_len,
            args.batch,
            args.student_steps,
            args.student_layers,
            args.student_embd,
            args.lr,
        )


def add_student_args(p: argparse.ArgumentParser) -> None:
    """The student options tradeoff.py and methods.py share (defaults: the committed runs)."""
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=2)


def split_documents(quick: bool) -> tuple[list[Document], list[Document]]:
    """The held-out stdlib files as (student-train, evaluation) documents: the first eighth
    evaluates; a --quick run keeps 6 and 2 of them."""
    docs = [Document(t, "stdlib") for t in held_out_documents()]
    cut = max(1, len(docs) // 8)
    train_docs, eval_docs = docs[cut:], docs[:cut]
    if quick:
        train_docs, eval_docs = train_docs[:6], eval_docs[:2]
    return train_docs, eval_docs


def make_student(recipe: StudentRecipe, vocab: int, seed: int) -> Any:
    """The study's student (GPT-2, ``layers`` × ``embd``, heads of 32, no dropout)."""
    return gpt2(
        vocab,
        n_positions=recipe.seq_len,
        n_layer=recipe.layers,
        n_embd=recipe.embd,
        n_head=recipe.embd // 32,
        seed=seed,
    )


def lr_factor(step: int, steps: int) -> float:
    """20 steps of linear warm-up, then cosine decay to 0 (a factor of the base lr)."""
    return min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


def held_out_ce(model: Any, eval_store: Path, recipe: StudentRecipe) -> float:
    """Cross-entropy on the ground truth of ``eval_store``'s text."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(
            LogitDataset(eval_store, recipe.seq_len, shuffle=False),
            batch_size=recipe.batch,
            collate_fn=collate,
        ):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(losses.cross_entropy(logits, b["labels"], reduction="sum"))
            count += float((b["labels"] >= 0).sum())
    model.train()
    return total / count


def train_student(
    recipe: StudentRecipe,
    mode: str,
    store: Path | None,
    base: Path,
    eval_store: Path,
    teacher: logitstore.Teacher,
    seed: int,
) -> float:
    """Train the student for ``recipe.steps`` on the windows of ``base`` (the same batches
    for every mode; or of ``store`` where it holds other text) and return its held-out CE
    on ground truth.

    Modes: ``ce`` (ground-truth labels), ``hard`` (the stored teacher's argmax), ``online``
    (KL to the live teacher's full logits), ``store`` (forward KL to ``store``'s rows).
    """
    model = make_student(recipe, teacher.vocab_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1)
    data = LogitDataset(store or base, recipe.seq_len, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=recipe.batch, collate_fn=collate)
    step = epoch = 0
    while step < recipe.steps:
        data.set_epoch(epoch)
        for b in loader:
            lr = recipe.lr * lr_factor(step, recipe.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            mask = b["loss_mask"]
            if mode == "ce":
                loss = losses.cross_entropy(logits, b["labels"])
            elif mode == "hard":
                labels = torch.where(mask, losses.teacher_argmax(b["ids"], b["probs"]), -100)
                loss = losses.cross_entropy(logits, labels)
            elif mode == "online":
                with torch.no_grad():
                    t = teacher.fn(b["input_ids"], b["attention_mask"]).float()  # (B, T, V)
                p = torch.softmax(t, -1)
                kl = p * (torch.log_softmax(t, -1) - torch.log_softmax(logits.float(), -1))
                loss = (kl.sum(-1) * mask).sum() / mask.sum()
            else:
                loss = losses.forward_kl(logits, b["ids"], b["probs"], b["residual"], mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step >= recipe.steps:
                break
        epoch += 1
    return held_out_ce(model, eval_store, recipe)


def same_batches(recipe: StudentRecipe, base: Path, seed: int) -> list[dict[str, Any]]:
    """The batches :func:`train_student` feeds its students (same dataset, seed, epochs)."""
    data = LogitDataset(base, recipe.seq_len, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=recipe.batch, collate_fn=collate)
    out: list[dict[str, Any]] = []
    epoch = 0
    while len(out) < recipe.steps:
        data.set_epoch(epoch)
        for b in loader:
            out.append({k: b[k] for k in ("input_ids", "attention_mask", "labels", "loss_mask")})
            if len(out) == recipe.steps:
                break
        epoch += 1
    return out


def add_gap_closed(rows: list[dict[str, Any]]) -> None:
    """Each row's ``gap_closed``: how much of the way from the plain-CE student (mode
    ``ce``, 0) to the online-KD student (mode ``online``, 1) its held-out CE went — the
    ratio against the two baselines trained in the same run."""
    ce = next(r["held_out_ce"] for r in rows if r["mode"] == "ce")
    online = next(r["held_out_ce"] for r in rows if r["mode"] == "online")
    for r in rows:
        r["gap_closed"] = (ce - r["held_out_ce"]) / (ce - online) if ce != online else None
