"""The memory/accuracy trade-off: bytes per position against fidelity and student quality.

1. A teacher trained offline on the standard library's source (benchmarks/teacher.py, cached;
   a --quick run trains a tiny one for a few seconds in its scratch directory).
2. Fidelity: real stores written by `logitstore.capture` over held-out text, for top-k,
   sampled and full encodings and several value types; each compared with the teacher's exact
   distribution at the same positions.
3. Students: the same small student trained for the same steps on the same batches with plain
   CE, hard labels (teacher argmax), online KD from the live teacher's full logits (the
   reference), and KD from several stores; held-out CE on ground truth.

Writes benchmarks/RESULTS.md, benchmarks/results.json and two plots (benchmarks/results/);
--out-dir writes them elsewhere (a --quick run: out/benchmarks-quick/ unless given).

    python benchmarks/tradeoff.py            # the committed run (tens of minutes on 2 cores)
    python benchmarks/tradeoff.py --quick    # a smoke run of about half a minute

Tail treatment for KL(teacher ‖ decoded) over the whole vocabulary: a top-k store's residual is
spread evenly over the tokens it does not name; a sampled store is smoothed with 1e-6 of mass
spread evenly (counts/n has zeros where p has not). The bucketed KL is what `forward_kl`
optimises: the stored ids plus one bucket for everything else (top-k and full only).
"""

from __future__ import annotations

import argparse
import json
import math
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
from benchlib.report import (
    compose_results_md,
    md_table,
    one_thread_if_quick,
    pyplot,
    results_dir,
    run_meta,
    write_results,
)
from benchlib.stores import teacher_bytes, teacher_logits
from benchlib.students import (
    StudentRecipe,
    add_gap_closed,
    add_student_args,
    split_documents,
    train_student,
)
from benchlib.teacher import study_teacher

import logitstore
from logitstore import Encoding
from logitstore.write.inputs import Document

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


def order0_bytes(store: logitstore.LogitStore) -> float:
    """Order-0 empirical entropy of the stored fields, bytes per position: the floor of a
    coder that codes each stored number on its own (context coders can go below it)."""
    rows = store.read_stored(0, len(store))
    total = 0.0
    for a in (rows.gaps, rows.values, rows.residual):
        if a is None:
            continue
        symbols = a.view(np.uint8) if a.dtype == np.float32 else a  # residual: its bytes
        _, counts = np.unique(symbols, return_counts=True)
        p = counts / counts.sum()
        total += float(-(counts * np.log2(p)).sum()) / 8
    return total / len(store)


def fidelity(
    store: logitstore.LogitStore, logits: torch.Tensor, temperature: float
) -> dict[str, float]:
    """KL to the exact distribution (whole vocabulary, stated tail), bucketed KL, top-1
    agreement and the mean residual, over every position."""
    n, vocab = logits.shape
    kl_full, kl_bucket, top1, residual, stored = [], [], [], [], []
    kind = store.encoding.kind
    for a in range(0, n, 1024):
        b = min(a + 1024, n)
        batch = store.read(a, b)
        p = torch.softmax(logits[a:b].double() / temperature, -1)  # (c, V)
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids))
        probs = torch.from_numpy(batch.probs).double()
        real = probs > 0
        q = torch.zeros_like(p).scatter_add_(-1, ids, probs)  # (c, V) stored mass
        named = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, ids, real)
        if kind == "sampled":
            q = q * (1 - 1e-6) + 1e-6 / vocab
        else:
            rest = (~named).sum(-1, keepdim=True).clamp_min(1)
            q = torch.where(named, q, torch.from_numpy(batch.residual).double()[:, None] / rest)
        kl = torch.where(p > 0, p * (p.log() - q.clamp_min(1e-300).log()), 0).sum(-1)
        kl_full.append(kl)
        if kind != "sampled":
            p_named = torch.where(named, p, 0)
            r = (1 - p_named.sum(-1)).clamp_min(0)
            r_hat = torch.from_numpy(batch.residual).double()
            bucket = torch.where(named & (p > 0), p * (p.log() - q.clamp_min(1e-300).log()), 0)
            tail = torch.where(r > 0, r * (r.log() - r_hat.clamp_min(1e-300).log()), 0)
            kl_bucket.append(bucket.sum(-1) + tail)
            residual.append(r)
        top1.append((q.argmax(-1) == p.argmax(-1)).double())
        stored.append(real.sum(-1).double())
    cat = lambda xs: float(torch.cat(xs).mean()) if xs else float("nan")  # noqa: E731
    return {
        "kl": cat(kl_full),
        "bucketed_kl": cat(kl_bucket),
        "top1_agreement": cat(top1),
        "residual_mass": cat(residual),
        "entries_per_position": cat(stored),
    }


def sweep(
    args: argparse.Namespace, teacher: logitstore.Teacher, seqs: logitstore.Sequences, root: Path
) -> list[dict[str, Any]]:
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


def students(
    args: argparse.Namespace, teacher: logitstore.Teacher, root: Path
) -> list[dict[str, Any]]:
    recipe = StudentRecipe.from_args(args)
    train_docs, eval_docs = split_documents(args.quick)
    seqs = logitstore.tokenize(train_docs, teacher.tokenizer, args.seq_len)
    eval_seqs = logitstore.tokenize(eval_docs, teacher.tokenizer, args.seq_len)
    eval_store = logitstore.capture(
        teacher, eval_seqs, root / "eval", Encoding("topk", "u8", k=1), progress=False
    )
    stores: dict[str, Path] = {}
    for name in STUDENT_STORES:
        enc = dict(SWEEP)[name]
        stores[name] = logitstore.capture(
            teacher,
            seqs,
            root / f"train-{name.replace(' ', '_')}",
            enc,
            batch_size=8,
            progress=False,
        )
    base = stores["topk-64 u8"]
    # (row label, mode, store, the store's config name): hard labels read topk-64 u8's ids
    plan: list[tuple[str, str, Any, str | None]] = [
        ("plain CE", "ce", None, None),
        ("hard labels (teacher argmax)", "hard", base, "topk-64 u8"),
        ("online KD, full logits", "online", None, None),
    ]
    plan += [(f"KD from {n}", "store", stores[n], n) for n in STUDENT_STORES]
    rows = []
    for label, mode, store, store_name in plan:
        held = [
            train_student(recipe, mode, store, base, eval_store, teacher, seed)
            for seed in range(args.seeds)
        ]
        row = {
            "student": label,
            "mode": mode,
            "store": store_name,
            "held_out_ce": statistics.mean(held),
            "seeds": held,
            "train_positions": len(seqs.input_ids),
        }
        if store is not None and mode == "store":
            row["bytes_per_position"] = teacher_bytes(store) / len(seqs.input_ids)
        rows.append(row)
        print(f"[student] {label}: held-out CE {row['held_out_ce']:.4f} ({held})", file=sys.stderr)
    add_gap_closed(rows)
    return rows


def plot(out: Path, rows: list[dict[str, Any]], student_rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("topk", "o"), ("sampled", "s"), ("full", "^")):
        pts = [r for r in rows if r["encoding"] == kind and r["temperature"] == 1.0 and r["kl"]]
        ax.scatter(
            [r["bytes_per_position"] for r in pts],
            [r["kl"] for r in pts],
            marker=marker,
            label=kind,
        )
        for r in pts:
            ax.annotate(r["config"], (r["bytes_per_position"], r["kl"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per position on disk")
    ax.set_ylabel("KL(teacher ‖ decoded), nats (tail: see RESULTS.md)")
    ax.set_title("Fidelity frontier, T = 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tradeoff_kl.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in student_rows:
        x = r.get("bytes_per_position")
        if x:
            ax.scatter([x], [r["held_out_ce"]])
            ax.annotate(r["student"], (x, r["held_out_ce"]), fontsize=7)
        else:
            ax.axhline(r["held_out_ce"], ls=":", lw=1, color="gray")
            ax.text(
                0.01,
                r["held_out_ce"],
                r["student"],
                fontsize=7,
                color="gray",
                va="bottom",
                transform=ax.get_yaxis_transform(),
            )  # x in axes units
    ax.set_xscale("log")
    ax.set_xlabel("bytes per position of the store")
    ax.set_ylabel("student held-out CE (nats)")
    ax.set_title("Student outcome")
    fig.tight_layout()
    fig.savefig(out / "tradeoff_student.png", dpi=120)


def report(
    args: argparse.Namespace,
    argv: list[str],
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    student_rows: list[dict[str, Any]],
) -> None:
    fmt = lambda x, f: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f.format(x)  # noqa: E731
    body = [
        f"Teacher: {info['name']} — {info['report']}.",
        "",
        "## Fidelity (real stores of the real writer)",
        "",
        *md_table(
            [
                "config",
                "T",
                "B/position",
                "B/entry",
                "order-0 entropy B/pos",
                "KL (full vocab)",
                "bucketed KL",
                "top-1 agreement",
                "residual mass",
                "write pos/s",
            ],
            [
                [
                    r["config"],
                    f"{r['temperature']}",
                    f"{r['bytes_per_position']:.1f}",
                    f"{r['bytes_per_entry']:.2f}",
                    fmt(r.get("order0_floor_bytes_per_position"), "{:.1f}"),
                    fmt(r.get("kl"), "{:.4f}"),
                    fmt(r.get("bucketed_kl"), "{:.4f}"),
                    fmt(r.get("top1_agreement"), "{:.3f}"),
                    fmt(r.get("residual_mass"), "{:.3f}"),
                    fmt(r.get("write_positions_per_s"), "{:,.0f}"),
                ]
                for r in rows
            ],
        ),
        "",
        "KL (full vocab): top-k residual spread evenly over unnamed tokens; sampled stores "
        "smoothed with 1e-6 of mass spread evenly. Bucketed KL: stored ids plus one bucket "
        "for the rest, as `forward_kl` sees it. Order-0 entropy: the empirical entropy of the "
        "stored numbers taken one at a time — the floor for a coder that codes each number "
        "alone; zstd/blosc beat it where neighbouring numbers are correlated (sorted-id gaps).",
        "",
        "## Students (same student, same steps, same batches)",
        "",
        *md_table(
            [
                "student",
                "held-out CE (mean)",
                "per seed",
                "store B/position",
                "gap closed (CE → online KD)",
            ],
            [
                [
                    r["student"],
                    f"{r['held_out_ce']:.4f}",
                    ", ".join(f"{x:.4f}" for x in r["seeds"]),
                    fmt(r.get("bytes_per_position"), "{:.1f}"),
                    fmt(r.get("gap_closed"), "{:.0%}"),
                ]
                for r in student_rows
            ],
        ),
    ]
    meta = run_meta("tradeoff.py", argv)
    write_results(
        args.out_dir / "results" / "tradeoff",
        "Trade-off study",
        meta,
        {"fidelity": rows, "students": student_rows},
        body,
    )
    # The named outputs: RESULTS.md and results.json beside the scripts.
    compose_results_md(args.out_dir)
    flat = [
        {
            k: r.get(k)
            for k in (
                "config",
                "temperature",
                "encoding",
                "k",
                "samples",
                "values",
                "bytes_per_position",
                "bytes_per_entry",
                "kl",
                "bucketed_kl",
                "top1_agreement",
            )
        }
        for r in rows
    ]
    for s in student_rows:
        match = next(
            (
                r
                for r in flat
                if s["mode"] == "store" and r["config"] == s["store"] and r["temperature"] == 1.0
            ),
            None,
        )
        if match is not None:
            match["student_loss"] = s["held_out_ce"]
    (args.out_dir / "results.json").write_text(
        json.dumps({**meta, "configs": flat, "students": student_rows}, indent=2)
    )


def run(
    args: argparse.Namespace, teacher_dir: Path, tmp: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The sweep and the students, on the teacher in ``teacher_dir``; also a line on the
    teacher from its report.json."""
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    teacher_report = "?"
    report_json = teacher_dir / "report.json"
    if report_json.exists():
        m = json.loads(report_json.read_text())["metrics"]
        teacher_report = f"held-out loss {m['held_out_loss']:.2f} nats, entropy " + ", ".join(
            f"{v:.2f} at T={t}" for t, v in m["entropy"].items()
        )
    docs = [Document(t, "stdlib") for t in held_out_documents()]
    seqs = logitstore.tokenize(docs, teacher.tokenizer, 256)
    keep = int(np.searchsorted(seqs.offsets, args.positions, side="right"))
    seqs = logitstore.Sequences(seqs.input_ids[: seqs.offsets[keep - 1]], seqs.offsets[:keep])
    return sweep(args, teacher, seqs, tmp), students(args, teacher, tmp), teacher_report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--positions", type=int, default=16384, help="sweep positions")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    add_student_args(p)
    p.add_argument(
        "--teacher-minutes",
        type=float,
        default=9.0,
        help="training budget of the cached teacher (if it must be trained)",
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
        help="a tiny teacher trained in seconds, 4096 positions, a few configs, short students",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.student_steps, args.seeds, args.temperatures = 4096, 10, 1, [1.0]
    if args.out_dir is None:
        args.out_dir = results_dir(args.quick)
    one_thread_if_quick(args.quick)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        # A cached teacher that must be trained uses every core; the study itself, two.
        teacher_dir = study_teacher(args.quick, Path(tmp), args.teacher_minutes)
        if not args.quick:
            torch.set_num_threads(2)
        rows, student_rows, teacher = run(args, teacher_dir, Path(tmp))
    (args.out_dir / "results").mkdir(parents=True, exist_ok=True)
    plot(args.out_dir / "results", rows, student_rows)
    report(args, argv, {"name": teacher_dir.name, "report": teacher}, rows, student_rows)
    print(f"wrote {args.out_dir / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
