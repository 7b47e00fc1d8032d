"""Train a small GPT-2 teacher on source code already on disk, fully offline.

A byte-level BPE tokenizer and a small ``GPT2LMHeadModel`` are trained on the stdlib's
``*.py`` files (``--corpus stdlib``, the flat study teacher) or on the installed
transformers' ``modeling_*.py`` files (``--corpus hf-modeling``, the sharp one), the
distributions are evaluated on held-out files, and the result is saved as a directory that
loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any hub model, with a
report.json of its metrics. The work is done by benchlib.teacher (which the other
benchmarks import); this script is its command line.

    python benchmarks/teacher.py                      # the default teacher, cached (10 min)
    python benchmarks/teacher.py --corpus hf-modeling --steps 900   # the sharp study teacher
    python benchmarks/teacher.py --quick --out DIR    # a tiny teacher in seconds
    python benchmarks/teacher.py --export-held-out held_out.jsonl --max-docs 28
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchlib.corpus import SOURCES, export_held_out
from benchlib.report import QUICK_DIR, log, one_thread_if_quick
from benchlib.teacher import (
    QUICK_TEACHER,
    TeacherSettings,
    cached_report,
    default_out_dir,
    train_teacher,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults mirror :class:`TeacherSettings`."""
    d = TeacherSettings()
    parser = argparse.ArgumentParser(
        description=(
            "Train a small GPT-2 teacher on source code on disk (offline), "
            "evaluate its distributions on held-out files and save it as a Hugging Face model "
            "directory. A directory that already holds a report.json for the same settings "
            "is reused unless --force is given."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: benchmarks/.cache/teacher-v{vocab}-{layers}x{embd}; "
        "with --quick, out/benchmarks-quick/teacher)",
    )
    add("--force", action="store_true", help="retrain even if a matching teacher exists")
    add(
        "--quick",
        action="store_true",
        help="a tiny teacher trained for a few seconds on a few files (its settings replace "
        "the size and budget options): a smoke run that never touches the cache",
    )
    add("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    add("--n-layer", type=int, default=d.n_layer, help="transformer layers")
    add("--n-embd", type=int, default=d.n_embd, help="hidden size")
    add("--n-head", type=int, default=d.n_head, help="attention heads")
    add("--n-positions", type=int, default=d.n_positions, help="context / window length")
    add("--batch-size", type=int, default=d.batch_size, help="windows per step")
    add("--lr", type=float, default=d.lr, help="peak learning rate")
    add("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    add(
        "--minutes",
        type=float,
        default=None,
        help="training time budget (10 if neither --minutes nor --steps is given)",
    )
    add(
        "--steps",
        type=int,
        default=None,
        help="training step budget; with --minutes, whichever is reached first ends training",
    )
    add("--seed", type=int, default=d.seed, help="seed for init and window sampling")
    add(
        "--autocast",
        choices=("auto", "bf16", "off"),
        default=d.autocast,
        help="bf16 autocast; auto times both and uses the faster",
    )
    add(
        "--save-dtype",
        choices=("float16", "bfloat16", "float32"),
        default=d.save_dtype,
        help="dtype of the saved safetensors weights",
    )
    add("--eval-windows", type=int, default=d.eval_windows, help="held-out windows evaluated")
    add(
        "--limit-files",
        type=int,
        default=None,
        help="use only the first N files of each split (quick smoke runs)",
    )
    add("--skip-tests", action="store_true", help="leave out the stdlib's test packages")
    add(
        "--corpus",
        choices=sorted(SOURCES),
        default=d.corpus,
        help="the text: the Python standard library, or the installed transformers' model "
        "implementations (more predictable: the sharp study teacher)",
    )
    add(
        "--export-held-out",
        type=Path,
        metavar="FILE.jsonl",
        default=None,
        help='write held-out documents as JSON lines {"text": ...} and exit',
    )
    add("--max-docs", type=int, default=None, help="with --export-held-out: at most N documents")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_TEACHER, minutes=None)
    return args


def settings_from_args(args: argparse.Namespace) -> TeacherSettings:
    """Pick the TeacherSettings fields out of parsed arguments."""
    names = {f.name for f in dataclasses.fields(TeacherSettings)}
    return TeacherSettings(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    """Script entry point."""
    args = parse_args(argv)
    full_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if args.export_held_out is not None:
        count = export_held_out(args.export_held_out, args.max_docs, args.skip_tests)
        log("teacher", f"wrote {count} held-out documents to {args.export_held_out}")
        return 0
    settings = settings_from_args(args)
    one_thread_if_quick(args.quick)
    if args.out is not None:
        out_dir = args.out
    else:
        out_dir = QUICK_DIR / "teacher" if args.quick else default_out_dir(settings)
    report = None if args.force else cached_report(out_dir, settings)
    if report is not None:
        log("teacher", f"reusing trained teacher in {out_dir} (pass --force to retrain)")
    else:
        report = train_teacher(settings, out_dir, full_argv)
        log("teacher", f"saved teacher to {out_dir}")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
