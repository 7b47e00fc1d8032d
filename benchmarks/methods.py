"""The three ways to distil, side by side, at equal student steps (issue 6's evidence).

On the trade-off study's corpus and teacher (benchmarks/tradeoff.py: the cached GPT-2
4×256 trained on the standard library's source; held-out files split into student-train and
evaluation text), the same student (GPT-2 2×128) is trained for the same number of steps of
the same batch shape and evaluated by held-out cross-entropy on ground truth:

- plain CE on the ground-truth text (the floor);
- online KD from the live teacher's full logits (the reference ceiling);
- soft labels from a store over the ground-truth text (top-64 u8, sampled-64);
- hard labels: CE on text the teacher generated (`logitstore generate`: prompts are the
  first tokens of the student-train sequences, completions sampled at T = 1), prompt tokens
  masked; and the same text with the teacher's soft labels (top-64 u8) at the completions;
- co-distillation: the pre-trained teacher keeps training on CE beside the student (α = 1),
  and a teacher of the same shape trained from scratch together with the student (α rising
  0 → 0.5).

Writes benchmarks/results/methods.{md,json} and its section of benchmarks/RESULTS.md;
--out-dir writes them elsewhere (a --quick run: out/benchmarks-quick/ unless given).

    python benchmarks/methods.py           # the committed run
    python benchmarks/methods.py --quick   # a tiny teacher, short runs: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib.report import (
    compose_results_md,
    log,
    md_table,
    one_thread_if_quick,
    results_dir,
    run_meta,
    write_results,
)
from benchlib.students import (
    StudentRecipe,
    add_gap_closed,
    add_student_args,
    held_out_ce,
    lr_factor,
    make_student,
    same_batches,
    split_documents,
    train_student,
)
from benchlib.teacher import study_teacher

import logitstore
from logitstore import Encoding, GenerationSettings, losses


def codistilled(
    recipe: StudentRecipe,
    teacher_lr: float,
    teacher_dir: Path,
    base: Path,
    eval_store: Path,
    seed: int,
    scratch: bool,
) -> dict[str, float]:
    """Co-distil on the same batches as the other students; held-out CE of both models."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    if scratch:
        torch.manual_seed(1000 + seed)
        teacher = AutoModelForCausalLM.from_config(teacher.config)
    for m in teacher.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    student = make_student(recipe, int(teacher.config.vocab_size), seed)
    steps = recipe.steps
    t_opt = torch.optim.AdamW(
        teacher.parameters(), lr=recipe.lr if scratch else teacher_lr, weight_decay=0.1
    )
    s_opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.1)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps)) for o in (t_opt, s_opt)
    ]
    batches = same_batches(recipe, base, seed)
    alpha = losses.LinearWarmup(0.0, 0.5, steps) if scratch else losses.ConstantSchedule(1.0)
    t0 = time.perf_counter()
    logitstore.codistill(
        teacher,
        student,
        t_opt,
        s_opt,
        lambda step: batches[step],
        steps,
        alpha=alpha,
        schedulers=schedulers,
        progress=False,
    )
    elapsed = time.perf_counter() - t0
    return {
        "student": held_out_ce(student, eval_store, recipe),
        "teacher": held_out_ce(teacher, eval_store, recipe),
        "seconds": elapsed,
    }


def prompts_from(seqs: logitstore.Sequences, tokenizer: Any, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of each sequence, as text."""
    out = []
    for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:], strict=True):
        if b - a > n_tokens:
            out.append(tokenizer.decode(seqs.input_ids[a : a + n_tokens].tolist()))
    return out


def run(
    args: argparse.Namespace, teacher_dir: Path, tmp: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stores, generated text and every student, on the teacher in ``teacher_dir``."""
    recipe = StudentRecipe.from_args(args)
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    tok = teacher.tokenizer
    train_docs, eval_docs = split_documents(args.quick)  # the split of tradeoff.py's students
    seqs = logitstore.tokenize(train_docs, tok, args.seq_len)
    eval_seqs = logitstore.tokenize(eval_docs, tok, args.seq_len)
    facts: dict[str, Any] = {"train_positions": len(seqs.input_ids)}
    eval_store = logitstore.capture(
        teacher, eval_seqs, tmp / "eval", Encoding("topk", "u8", k=1), progress=False
    )
    stores = {
        name: logitstore.capture(teacher, seqs, tmp / name.replace(" ", "_"), enc, progress=False)
        for name, enc in (
            ("topk-64 u8", Encoding("topk", "u8", k=64)),
            ("sampled-64", Encoding("sampled", "count", samples=64)),
        )
    }
    base = stores["topk-64 u8"]
    prompts = prompts_from(seqs, tok, args.prompt_tokens)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        num_samples=args.num_samples,
        batch_size=args.gen_batch,
        seed=0,
    )
    log("methods", f"generating {len(prompts)} prompts × {args.num_samples}")
    t0 = time.perf_counter()
    generated = logitstore.generate(teacher, prompts, tmp / "generated", settings, progress=False)
    gen_s = time.perf_counter() - t0
    gstore = logitstore.open(generated)
    ids, mask = gstore.read_tokens(0, len(gstore))
    facts.update(
        prompts=len(prompts),
        generated_tokens=int(mask.sum()),
        generated_positions=len(gstore),
        generate_seconds=gen_s,
        generated_tokens_per_s=int(mask.sum()) / gen_s,
    )
    log("methods", f"generated {int(mask.sum())} tokens in {gen_s:.0f} s")
    t0 = time.perf_counter()
    soft_generated = logitstore.capture(
        teacher,
        logitstore.Sequences(ids, gstore.offsets),
        tmp / "generated-soft",
        Encoding("topk", "u8", k=64),
        loss_mask=mask,
        generation=gstore.metadata.generation,
        progress=False,
    )
    facts["soft_capture_seconds"] = time.perf_counter() - t0
    plan: list[tuple[str, str, Path | None]] = [
        ("plain CE (ground-truth text)", "ce", None),
        ("online KD, full logits (reference)", "online", None),
        ("soft labels: store topk-64 u8", "store", stores["topk-64 u8"]),
        ("soft labels: store sampled-64", "store", stores["sampled-64"]),
        ("hard labels: CE on teacher-generated text", "ce", generated),
        ("generated text + soft labels (topk-64 u8)", "store", soft_generated),
        ("co-distilled, pre-trained teacher keeps training (α = 1)", "codistill", None),
        ("co-distilled, teacher from scratch (α 0 → 0.5)", "codistill-scratch", None),
    ]
    rows = []
    for label, mode, store in plan:
        held, teacher_after, secs = [], [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            if mode.startswith("codistill"):
                r = codistilled(
                    recipe,
                    args.teacher_lr,
                    teacher_dir,
                    base,
                    eval_store,
                    seed,
                    mode == "codistill-scratch",
                )
                held.append(r["student"])
                teacher_after.append(r["teacher"])
            else:
                held.append(train_student(recipe, mode, store, base, eval_store, teacher, seed))
            secs.append(time.perf_counter() - t0)
        row: dict[str, Any] = {
            "method": label,
            "mode": mode,
            "held_out_ce": statistics.mean(held),
            "seeds": held,
            "seconds_per_run": statistics.median(secs),
        }
        if teacher_after:
            row["teacher_held_out_ce"] = statistics.mean(teacher_after)
        if store is not None:
            row["bytes_per_position"] = sum(
                f.stat().st_size for f in store.rglob("*") if f.is_file()
            ) / len(logitstore.open(store))
        rows.append(row)
        log("methods", f"{label}: held-out CE {row['held_out_ce']:.4f} {held}")
    facts["teacher_held_out_ce"] = held_out_ce(teacher.model, eval_store, recipe)
    add_gap_closed(rows)
    return facts, rows


def report(
    args: argparse.Namespace,
    argv: list[str],
    teacher_name: str,
    facts: dict[str, Any],
    rows: list[dict[str, Any]],
) -> None:
    fmt = lambda x, f: "" if x is None else f.format(x)  # noqa: E731
    body = [
        f"Teacher {teacher_name} (held-out CE {facts['teacher_held_out_ce']:.4f} on the "
        f"evaluation text); student GPT-2 {args.student_layers}×{args.student_embd}, "
        f"{args.student_steps} steps × {args.batch}×{args.seq_len} tokens, lr {args.lr}, "
        f"{args.seeds} seed(s); every row is held-out CE on ground truth (lower is better). "
        f"Student-train text: {facts['train_positions']:,} positions. Generated: "
        f"{facts['prompts']} prompts of {args.prompt_tokens} tokens × {args.num_samples} "
        f"samples, ≤ {args.max_new_tokens} new tokens at T = 1: {facts['generated_tokens']:,} "
        f"completion tokens in {facts['generate_seconds']:.0f} s "
        f"({facts['generated_tokens_per_s']:,.0f} tokens/s, batch {args.gen_batch}, KV cache, "
        f"2 CPU cores); their top-64 soft labels took {facts['soft_capture_seconds']:.0f} s more.",
        "",
        *md_table(
            [
                "method",
                "held-out CE (mean)",
                "per seed",
                "gap closed (CE → online KD)",
                "store B/position",
                "co-trained teacher CE",
                "s/run",
            ],
            [
                [
                    r["method"],
                    f"{r['held_out_ce']:.4f}",
                    ", ".join(f"{x:.4f}" for x in r["seeds"]),
                    fmt(r.get("gap_closed"), "{:.0%}"),
                    fmt(r.get("bytes_per_position"), "{:.1f}"),
                    fmt(r.get("teacher_held_out_ce"), "{:.4f}"),
                    f"{r['seconds_per_run']:.0f}",
                ]
                for r in rows
            ],
        ),
    ]
    write_results(
        args.out_dir / "results" / "methods",
        "Distillation methods at equal student steps",
        run_meta("methods.py", argv),
        {"facts": facts, "methods": rows},
        body,
    )
    compose_results_md(args.out_dir)
    print(f"wrote {args.out_dir / 'results' / 'methods.md'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_student_args(p)
    p.add_argument(
        "--teacher-lr", type=float, default=3e-4, help="co-distilled pre-trained teacher"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--num-samples", type=int, default=2, help="completions per prompt")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where results/methods.* and RESULTS.md go (default benchmarks/; with --quick "
        "out/benchmarks-quick/)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny teacher trained in seconds, 10 steps, 1 seed, short completions",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.student_steps, args.seeds, args.max_new_tokens, args.num_samples = 10, 1, 16, 1
    if args.out_dir is None:
        args.out_dir = results_dir(args.quick)
    one_thread_if_quick(args.quick)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        # A cached teacher that must be trained uses every core; the study itself, two.
        teacher_dir = study_teacher(args.quick, tmp)
        if not args.quick:
            torch.set_num_threads(2)
        facts, rows = run(args, teacher_dir, tmp)
    report(args, argv, teacher_dir.name, facts, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
