"""The students of tradeoff.py and methods.py: one recipe, one training loop over the same
batches for every way of distilling, one held-out evaluation, a pool that trains seeds in
parallel processes, and the 95 % confidence intervals the tables report."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
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


def split_documents(quick: bool, source: str = "stdlib") -> tuple[list[Document], list[Document]]:
    """The teacher's held-out files as (student-train, evaluation) documents: the first eighth
    evaluates; a --quick run keeps 6 and 2 of them."""
    docs = [Document(t, source) for t in held_out_documents(source=source)]
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


#: Student modes: ``ce`` (ground truth), ``hard`` (the stored teacher's argmax), ``online``
#: (the live teacher's full distribution), ``store`` (a store's rows with their residual, as
#: logitstore's losses use them) and ``renorm`` (a top-k store's candidates renormalised to sum
#: to 1 with no residual: the target axolotl and DistillKit train towards,
#: benchlib.peer_targets).
MODES = ("ce", "hard", "online", "store", "renorm")


def _loss(
    mode: str, alpha: float, logits: Any, b: dict[str, Any], teacher: logitstore.Teacher
) -> Any:
    """``alpha`` · KD + (1 − ``alpha``) · CE on ground truth, for one batch."""
    mask = b["loss_mask"]
    if mode == "ce":
        return losses.cross_entropy(logits, b["labels"])
    if mode == "hard":
        labels = torch.where(mask, losses.teacher_argmax(b["ids"], b["probs"]), -100)
        return losses.cross_entropy(logits, labels)
    if mode == "online":
        with torch.no_grad():
            t = teacher.fn(b["input_ids"], b["attention_mask"]).float()  # (B, T, V)
        p = torch.softmax(t, -1)
        kl = p * (torch.log_softmax(t, -1) - torch.log_softmax(logits.float(), -1))
        loss = (kl.sum(-1) * mask).sum() / mask.sum()
        if alpha < 1.0:
            loss = alpha * loss + (1.0 - alpha) * losses.cross_entropy(logits, b["labels"])
        return loss
    ids, probs, residual = b["ids"], b["probs"], b["residual"]
    if mode == "renorm":
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
        residual = torch.zeros_like(residual)
    return losses.distillation_loss(logits, b["labels"], ids, probs, residual, mask, alpha=alpha)


def train_student(
    recipe: StudentRecipe,
    mode: str,
    store: Path | None,
    base: Path,
    eval_store: Path,
    teacher: logitstore.Teacher,
    seed: int,
    alpha: float = 1.0,
) -> float:
    """Train the student for ``recipe.steps`` on the windows of ``base`` (the same batches
    for every mode; or of ``store`` where it holds other text) and return its held-out CE
    on ground truth. ``alpha`` weighs the KD term against CE on ground truth (:data:`MODES`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown student mode {mode!r}; expected one of {MODES}")
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
            loss = _loss(mode, alpha, logits, b, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step >= recipe.steps:
                break
        epoch += 1
    return held_out_ce(model, eval_store, recipe)


@dataclass(frozen=True)
class StudentJob:
    """One student run of a study: everything a worker process needs to train it."""

    recipe: StudentRecipe
    mode: str
    store: Path | None
    base: Path
    eval_store: Path
    teacher_dir: Path
    seed: int
    alpha: float = 1.0


_TEACHERS: dict[Path, logitstore.Teacher] = {}


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_job(job: StudentJob) -> float:
    """Train one student (in a pool worker: the teacher is loaded once per process)."""
    teacher = _TEACHERS.get(job.teacher_dir)
    if teacher is None:
        teacher = _TEACHERS[job.teacher_dir] = logitstore.load_teacher(str(job.teacher_dir), "cpu")
    return train_student(
        job.recipe, job.mode, job.store, job.base, job.eval_store, teacher, job.seed, job.alpha
    )


def run_jobs(jobs: Sequence[StudentJob], processes: int) -> list[float]:
    """Held-out CE of every job, in order; ``processes`` > 1 trains that many students at
    once, each on one thread (small models use two cores better that way than one process
    with two threads; every run is still deterministic given its seed)."""
    if processes <= 1:
        return [run_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_one_thread) as pool:
        return list(pool.map(run_job, jobs))


#: Two-sided 95 % Student-t quantiles by degrees of freedom (n − 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean of ``values`` (Student t;
    NaN for a single value)."""
    n = len(values)
    if n < 2:
        return float("nan")
    t = _T975.get(n - 1, 1.96 + 2.4 / (n - 1))  # beyond the table: close to the exact value
    return t * statistics.stdev(values) / math.sqrt(n)


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
    ``ce``, 0) to the online-KD student (mode ``online``, 1; the one with the row's
    ``alpha`` where there is one) its held-out CE went — the ratio against the two
    baselines trained in the same run. With per-seed results (``seeds``, same seeds for
    every row) also the paired difference to plain CE and its 95 % interval."""
    ce_row = next(r for r in rows if r["mode"] == "ce")
    ce = ce_row["held_out_ce"]
    online_rows = [x for x in rows if x["mode"] == "online"]
    for r in rows:
        same = [x for x in online_rows if x.get("alpha") == r.get("alpha")]
        online = (same or online_rows)[0]["held_out_ce"] if online_rows else ce
        r["gap_closed"] = (ce - r["held_out_ce"]) / (ce - online) if ce != online else None
        if len(r.get("seeds", [])) == len(ce_row.get("seeds", [])) > 1:
            diff = [a - b for a, b in zip(r["seeds"], ce_row["seeds"], strict=True)]
            r["delta_vs_ce"] = statistics.mean(diff)
            r["delta_vs_ce_ci95"] = ci95(diff)
