"""The memory/accuracy trade-off: bytes per position against fidelity and student quality.

1. Two teachers trained offline (benchmarks/teacher.py, cached): a sharp one on transformers'
   model implementations (held-out entropy ~1.9 nats, like production teachers on natural
   text) and a flat one on the standard library (~4.6 nats); a --quick run trains tiny ones
   for a few seconds in its scratch directory.
2. Fidelity: real stores written by `logitstore.capture` over held-out text, for top-k,
   sampled and full encodings and several value types; each compared with the teacher's exact
   distribution at the same positions.
3. Students: the same small student trained for the same steps on the same batches with plain
   CE, hard labels (teacher argmax), online KD from the live teacher's full logits (the
   reference), KD from several stores and from the peers' renormalised top-k, at α = 1 and
   0.5 (KD + CE), over 5 seeds; held-out CE on ground truth with 95 % intervals.

Writes benchmarks/RESULTS.md, benchmarks/results.json and two plots (benchmarks/results/);
--out-dir writes them elsewhere (a --quick run: out/benchmarks-quick/ unless given).

    python benchmarks/tradeoff.py            # the committed run (~1.5 hours on 2 cores)
    python benchmarks/tradeoff.py --quick    # a smoke run of a minute or two
    python benchmarks/tradeoff.py --report-only out/tradeoff.raw.json --sweep-only
    # the committed run, one teacher at a time, then one page from both:
    python benchmarks/tradeoff.py --teachers sharp --raw out/tradeoff-sharp.raw.json
    python benchmarks/tradeoff.py --teachers flat --alphas 1 --temperatures 1 \
        --positions 8192 --without online --raw out/tradeoff-flat.raw.json
    python benchmarks/tradeoff.py --report-only out/tradeoff-sharp.raw.json \
        out/tradeoff-flat.raw.json

How KL to the teacher is computed (tails, buckets): benchlib.fidelity. Tables and plots:
benchlib.tradeoff_report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib.corpus import held_out_documents
from benchlib.fidelity import fidelity, order0_bytes
from benchlib.report import one_thread_if_quick, results_dir
from benchlib.stores import teacher_bytes, teacher_logits
from benchlib.students import (
    StudentJob,
    StudentRecipe,
    add_gap_closed,
    add_student_args,
    ci95,
    run_jobs,
    split_documents,
)
from benchlib.teacher import study_teacher
from benchlib.tradeoff_report import plot, report

import logitstore
from logitstore import Encoding
from logitstore.write.inputs import Document

#: The options a report states (restored by --report-only).
STUDY_OPTIONS = {"seq_len", "batch", "student_steps", "student_layers", "student_embd", "lr"}
STUDY_OPTIONS |= {"seeds", "processes"}
#: Where every run leaves its raw measurements (git-ignored), for --report-only.
RAW_DIR = Path(__file__).resolve().parent.parent / "out"
SWEEP: list[tuple[str, Encoding]] = (
    [(f"topk-{k} u8", Encoding("topk", "u8", k=k)) for k in (1, 4, 8, 16, 32, 64, 128)]
    + [
        (f"topk-64 {v}", Encoding("topk", v, k=64))
        for v in ("fp16", "bf16", "u7", "u6", "u5", "u4")
    ]
    + [(f"sampled-{n}", Encoding("sampled", "count", samples=n)) for n in (8, 16, 32, 64, 256)]
    + [("full fp16", Encoding("full", "fp16")), ("full u8", Encoding("full", "u8"))]
)
SHARPER = ["topk-8 u8", "topk-64 u8", "sampled-64"]  # repeated at T = 0.7 and 0.5
STUDENT_STORES = ["topk-8 u8", "topk-64 u8", "topk-64 u6", "sampled-16", "sampled-64"]
QUICK_CONFIGS = {"topk-8 u8", "topk-64 u8", "sampled-16", "full fp16", *STUDENT_STORES}


def sweep(
    args: argparse.Namespace, teacher: logitstore.Teacher, seqs: logitstore.Sequences, root: Path
) -> list[dict[str, Any]]:
    """Fidelity of every encoding of :data:`SWEEP` (--quick: a few) on ``seqs``."""
    logits = teacher_logits(teacher, seqs)
    n, vocab = logits.shape
    rows = []
    plan = [(name, enc) for name, enc in SWEEP if not args.quick or name in QUICK_CONFIGS]
    for temperature in args.temperatures:
        for name, enc in plan:
            if temperature != 1.0 and name not in SHARPER:
                continue
            enc = Encoding(
                enc.kind, enc.values, temperature=temperature, k=enc.k, samples=enc.samples
            )
            path = root / f"{name.replace(' ', '_')}-T{temperature}"
            t0 = time.perf_counter()
            logitstore.capture(teacher, seqs, path, enc, batch_size=8, progress=False, seed=0)
            write_s = time.perf_counter() - t0
            store = logitstore.open(path)
            assert isinstance(store, logitstore.LogitStore)
            size = teacher_bytes(path)
            fid = fidelity(store, logits, temperature)
            entries = fid["entries_per_position"]
            rows.append(
                {
                    "config": name,
                    "temperature": temperature,
                    "encoding": enc.kind,
                    "k": enc.k,
                    "samples": enc.samples,
                    "values": enc.values,
                    "positions": n,
                    "bytes_per_position": size / n,
                    "bytes_per_entry": size / n / entries,
                    "order0_floor_bytes_per_position": order0_bytes(store),
                    "write_positions_per_s": n / write_s,
                    **fid,
                }
            )
            r = rows[-1]
            print(
                f"[sweep] T={temperature} {name}: {r['bytes_per_position']:.1f} B/pos, "
                f"{r['bytes_per_entry']:.2f} B/entry, KL {r['kl']:.4f}, bucketed "
                f"{r['bucketed_kl']:.4f}, top-1 {r['top1_agreement']:.3f}",
                file=sys.stderr,
            )
            shutil.rmtree(path)
    # Naive layouts of the same top-64 content, computed (not written).
    for name, per_entry in (("int32 ids + fp16 values", 6.0), ("17-bit ids + fp16", 33 / 8)):
        rows.append(
            {
                "config": name,
                "temperature": 1.0,
                "encoding": "naive",
                "k": 64,
                "samples": None,
                "values": "fp16",
                "bytes_per_position": 64 * per_entry + 4,
                "bytes_per_entry": per_entry,
                "kl": None,
                "positions": n,
            }
        )
    rows.append(
        {
            "config": "full vocabulary bf16",
            "temperature": 1.0,
            "encoding": "naive",
            "k": None,
            "samples": None,
            "values": "bf16",
            "bytes_per_position": 2 * vocab,
            "bytes_per_entry": 2.0,
            "kl": None,
            "positions": n,
        }
    )
    return rows


#: The student study's rows: (label, mode, the store it reads, the alphas it runs at). The
#: flat teacher runs FLAT_STUDENTS only (its point is how the picture changes with sharpness).
STUDENT_PLAN: list[tuple[str, str, str | None, tuple[float, ...]]] = [
    ("plain CE", "ce", None, (0.0,)),
    ("hard labels (teacher argmax)", "hard", "topk-64 u8", (0.0,)),
    ("online KD, full logits", "online", None, (1.0, 0.5)),
    ("KD from topk-64 u8", "store", "topk-64 u8", (1.0, 0.5)),
    ("renormalised top-64 (axolotl/DistillKit target)", "renorm", "topk-64 u8", (1.0, 0.5)),
    ("KD from sampled-64", "store", "sampled-64", (1.0, 0.5)),
    ("KD from topk-8 u8", "store", "topk-8 u8", (1.0,)),
    ("KD from sampled-16", "store", "sampled-16", (1.0,)),
]
#: A --quick run trains these rows only (the pool, the intervals and every mode still run).
QUICK_STUDENTS = {"plain CE", "hard labels (teacher argmax)", "KD from topk-64 u8"}
QUICK_STUDENTS |= {"renormalised top-64 (axolotl/DistillKit target)", "online KD, full logits"}
FLAT_STUDENTS = {
    "plain CE",
    "online KD, full logits",
    "KD from topk-64 u8",
    "renormalised top-64 (axolotl/DistillKit target)",
    "KD from sampled-64",
}


def students(
    args: argparse.Namespace, teacher_dir: Path, source: str, sharp: bool, root: Path
) -> list[dict[str, Any]]:
    recipe = StudentRecipe.from_args(args)
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    train_docs, eval_docs = split_documents(args.quick, source)
    seqs = logitstore.tokenize(train_docs, teacher.tokenizer, args.seq_len)
    eval_seqs = logitstore.tokenize(eval_docs, teacher.tokenizer, args.seq_len)
    eval_store = logitstore.capture(
        teacher, eval_seqs, root / "eval", Encoding("topk", "u8", k=1), progress=False
    )
    plan = [p for p in STUDENT_PLAN if sharp or p[0] in FLAT_STUDENTS]
    if args.quick:
        keep = QUICK_STUDENTS if sharp else {"plain CE", "online KD, full logits"}
        plan = [p for p in plan if p[0] in keep or (not sharp and p[0] == "KD from topk-64 u8")]
    stores: dict[str, Path] = {}
    for name in sorted({p[2] for p in plan if p[2]} | {"topk-64 u8"}):
        stores[name] = logitstore.capture(
            teacher,
            seqs,
            root / f"train-{name.replace(' ', '_')}",
            dict(SWEEP)[name],
            batch_size=8,
            progress=False,
        )
    base = stores["topk-64 u8"]
    cells = [
        (label, mode, store, alpha)
        for label, mode, store, alphas in plan
        for alpha in alphas
        if (mode in ("ce", "hard") or alpha in args.alphas) and mode not in args.without
    ]
    jobs = [
        StudentJob(
            recipe,
            mode,
            stores[store] if store and mode != "hard" else None,
            base,
            eval_store,
            teacher_dir,
            seed,
            alpha if mode not in ("ce", "hard") else 1.0,
        )
        for label, mode, store, alpha in cells
        for seed in range(args.seeds)
    ]
    print(f"[student] {len(jobs)} runs on {args.processes} process(es)", file=sys.stderr)
    t0 = time.perf_counter()
    held_all = run_jobs(jobs, args.processes)
    seconds = time.perf_counter() - t0
    rows = []
    for i, (label, mode, store, alpha) in enumerate(cells):
        held = held_all[i * args.seeds : (i + 1) * args.seeds]
        row = {
            "student": label,
            "mode": mode,
            "alpha": alpha if mode not in ("ce", "hard") else None,
            "store": store,
            "held_out_ce": statistics.mean(held),
            "ci95": ci95(held),
            "seeds": held,
            "train_positions": len(seqs.input_ids),
        }
        rows.append(row)
        print(
            f"[student] {label} alpha={row['alpha']}: held-out CE {row['held_out_ce']:.4f} "
            f"± {row['ci95']:.4f}",
            file=sys.stderr,
        )
    add_gap_closed(rows)
    for r in rows:
        r["seconds_per_run"] = seconds * args.processes / len(jobs)
    return rows


def sweep_sequences(
    args: argparse.Namespace, teacher: logitstore.Teacher, source: str
) -> logitstore.Sequences:
    """The sweep's text: the first ``args.positions`` positions (whole 256-token windows) of
    the teacher's held-out files."""
    docs = [Document(t, source) for t in held_out_documents(source=source)]
    seqs = logitstore.tokenize(docs, teacher.tokenizer, 256)
    keep = int(np.searchsorted(seqs.offsets, args.positions, side="right"))
    return logitstore.Sequences(seqs.input_ids[: seqs.offsets[keep - 1]], seqs.offsets[:keep])


def resweep(args: argparse.Namespace, sharp: bool, tmp: Path) -> list[dict[str, Any]]:
    """The fidelity sweep alone, on a cached teacher of the study (--sweep-only)."""
    teacher_dir = study_teacher(args.quick, tmp, sharp=sharp)
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    seqs = sweep_sequences(args, teacher, "hf-modeling" if sharp else "stdlib")
    work = tmp / ("sharp" if sharp else "flat")
    work.mkdir()
    return sweep(args, teacher, seqs, work)


def run(args: argparse.Namespace, sharp: bool, tmp: Path) -> dict[str, Any]:
    """The sweep and the students on one of the study's teachers."""
    # A cached teacher that must be trained uses every core; the study itself, two.
    teacher_dir = study_teacher(args.quick, tmp, sharp=sharp)
    if not args.quick:
        torch.set_num_threads(2)
    source = "hf-modeling" if sharp else "stdlib"
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    metrics: dict[str, Any] = {}
    summary = "?"
    report_json = teacher_dir / "report.json"
    if report_json.exists():
        metrics = json.loads(report_json.read_text())["metrics"]
        summary = (
            f"held-out loss {metrics['held_out_loss']:.2f} nats, entropy "
            + ", ".join(f"{v:.2f} at T={t}" for t, v in metrics["entropy"].items())
            + f", top-64 mass {metrics['top64_mass']['1.0']:.3f} at T=1"
        )
    seqs = sweep_sequences(args, teacher, source)
    work = tmp / ("sharp" if sharp else "flat")
    work.mkdir()
    return {
        "teacher": "sharp" if sharp else "flat",
        "name": teacher_dir.name,
        "metrics": metrics,
        "summary": summary,
        "fidelity": sweep(args, teacher, seqs, work),
        "students": students(args, teacher_dir, source, sharp, work),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--positions", type=int, default=16384, help="sweep positions")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    p.add_argument(
        "--teachers",
        nargs="+",
        choices=["sharp", "flat"],
        default=["sharp", "flat"],
        help="which of the study's teachers to run (default both)",
    )
    add_student_args(p)
    p.set_defaults(seeds=5)
    p.add_argument(
        "--processes",
        type=int,
        default=2,
        help="students trained at once, one thread each (default 2)",
    )
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where RESULTS.md, results.json and results/ go (default benchmarks/; with "
        "--quick out/benchmarks-quick/)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny teachers trained in seconds, 4096 positions, a few configs, short students",
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="with --report-only: measure the fidelity sweep again on the same cached "
        "teachers (e.g. after a codec change) and keep the saved students",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        nargs="+",
        default=None,
        metavar="RAW.json",
        help="rewrite the tables and plots from runs' saved measurements (the --raw file "
        "every run leaves) without measuring again; several files are one study (e.g. the "
        "teachers run separately)",
    )
    p.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="where this run saves its measurements (default out/tradeoff.raw.json; "
        "--quick: out/tradeoff-quick.raw.json)",
    )
    p.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=["hard", "online", "renorm"],
        help="student modes to leave out (plain CE and KD from stores always run)",
    )
    p.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="KD weights α the KD students run at (default 1 and 0.5)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.student_steps, args.seeds, args.temperatures = 4096, 10, 2, [1.0]
    if args.out_dir is None:
        args.out_dir = results_dir(args.quick)
    one_thread_if_quick(args.quick)
    if args.report_only is not None:
        saved = [json.loads(path.read_text()) for path in args.report_only]
        vars(args).update({k: v for k, v in saved[0]["options"].items() if k in STUDY_OPTIONS})
        if args.sweep_only:
            for path, raw in zip(args.report_only, saved, strict=True):
                with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                    for st in raw["studies"]:
                        st["fidelity"] = resweep(args, st["teacher"] == "sharp", Path(tmp))
                raw["argv"] = [*raw["argv"], "# fidelity sweep rerun:", *sys.argv[1:]]
                path.write_text(json.dumps(raw, indent=1))
        studies = [st for raw in saved for st in raw["studies"]]
        argv = list(saved[0]["argv"])
        for raw in saved[1:]:
            argv += ["&&", "python", "benchmarks/tradeoff.py", *raw["argv"]]
        if len(saved) > 1:
            argv += ["&&", "python", "benchmarks/tradeoff.py", *sys.argv[1:]]
    else:
        studies = []
        raw_path = args.raw or RAW_DIR / (
            "tradeoff-quick.raw.json" if args.quick else "tradeoff.raw.json"
        )
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            for t in args.teachers:
                studies.append(run(args, t == "sharp", Path(tmp)))
                # Each teacher's measurements are saved as soon as they exist (an hour of
                # work must not be lost to a failure in what follows).
                raw_path.parent.mkdir(parents=True, exist_ok=True)
                options = {k: v for k, v in vars(args).items() if k in STUDY_OPTIONS}
                raw_path.write_text(
                    json.dumps({"argv": argv, "options": options, "studies": studies}, indent=1)
                )
    (args.out_dir / "results").mkdir(parents=True, exist_ok=True)
    plot(args.out_dir / "results", studies)
    report(args, argv, studies)
    print(f"wrote {args.out_dir / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
