"""The trade-off study's tables, plots and result files (tradeoff.py measures; this writes)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchlib.report import compose_results_md, md_table, pyplot, run_meta, write_results
from benchlib.students import StudentRecipe


def plot(out: Path, studies: list[dict[str, Any]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for study, colour in zip(studies, ("tab:blue", "tab:orange"), strict=False):
        for kind, marker in (("topk", "o"), ("sampled", "s"), ("full", "^")):
            pts = [
                r
                for r in study["fidelity"]
                if r["encoding"] == kind and r["temperature"] == 1.0 and r["kl"]
            ]
            ax.scatter(
                [r["bytes_per_position"] for r in pts],
                [r["kl"] for r in pts],
                marker=marker,
                color=colour,
                label=f"{kind} ({study['teacher']} teacher)",
            )
            for r in pts:
                ax.annotate(r["config"], (r["bytes_per_position"], r["kl"]), fontsize=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per position on disk")
    ax.set_ylabel("KL(teacher ‖ decoded), nats (tail: see RESULTS.md)")
    ax.set_title("Fidelity frontier, T = 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff_kl.png", dpi=120)
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4.5), squeeze=False)
    for ax, study in zip(axes[0], studies, strict=True):
        for r in study["students"]:
            x = r.get("bytes_per_position")
            marker = "o" if r.get("alpha") == 1.0 else "s"
            label = (
                f"{r['student']} (α={r['alpha']})" if r.get("alpha") is not None else r["student"]
            )
            if x:
                ax.errorbar([x], [r["held_out_ce"]], yerr=[r["ci95"]], fmt=marker, capsize=3)
                ax.annotate(label, (x, r["held_out_ce"]), fontsize=6)
            else:
                ax.axhline(r["held_out_ce"], ls=":", lw=1, color="gray")
                ax.text(
                    0.01,
                    r["held_out_ce"],
                    label,
                    fontsize=6,
                    color="gray",
                    va="bottom",
                    transform=ax.get_yaxis_transform(),
                )  # x in axes units
        ax.set_xscale("log")
        ax.set_xlabel("bytes per position of the store")
        ax.set_ylabel("student held-out CE (nats), mean ± 95% CI")
        ax.set_title(f"Students of the {study['teacher']} teacher (○ α=1, □ α=0.5)")
    fig.tight_layout()
    fig.savefig(out / "tradeoff_student.png", dpi=120)


def _fmt(x: Any, f: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f.format(x)


def fidelity_table(rows: list[dict[str, Any]]) -> list[str]:
    return md_table(
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
                _fmt(r.get("order0_floor_bytes_per_position"), "{:.1f}"),
                _fmt(r.get("kl"), "{:.4f}"),
                _fmt(r.get("bucketed_kl"), "{:.4f}"),
                _fmt(r.get("top1_agreement"), "{:.3f}"),
                _fmt(r.get("residual_mass"), "{:.3f}"),
                _fmt(r.get("write_positions_per_s"), "{:,.0f}"),
            ]
            for r in rows
        ],
    )


def store_bytes(study: dict[str, Any]) -> None:
    """Each store-trained student row's ``bytes_per_position``: its store's at T = 1 in the
    study's fidelity sweep (the same encoding of the same teacher, measured with the writer
    the sweep ran; a --sweep-only rerun so updates both tables)."""
    sizes = {
        r["config"]: r["bytes_per_position"] for r in study["fidelity"] if r["temperature"] == 1.0
    }
    for s in study["students"]:
        if s.get("store") is not None and s["mode"] in ("store", "renorm"):
            s["bytes_per_position"] = sizes.get(s["store"], s.get("bytes_per_position"))


def student_table(rows: list[dict[str, Any]]) -> list[str]:
    return md_table(
        [
            "student",
            "α",
            "held-out CE (mean ± 95% CI)",
            "Δ vs plain CE (paired, ± 95% CI)",
            "gap closed (CE → online KD)",
            "store B/position (sweep)",
            "per seed",
        ],
        [
            [
                r["student"],
                _fmt(r.get("alpha"), "{:g}"),
                f"{r['held_out_ce']:.4f} ± {_fmt(r['ci95'], '{:.4f}')}",
                _fmt(r.get("delta_vs_ce"), "{:+.4f}")
                + _fmt(r.get("delta_vs_ce_ci95"), " ± {:.4f}"),
                _fmt(r.get("gap_closed"), "{:.0%}"),
                _fmt(r.get("bytes_per_position"), "{:.1f}"),
                ", ".join(f"{x:.3f}" for x in r["seeds"]),
            ]
            for r in rows
        ],
    )


def report(args: argparse.Namespace, argv: list[str], studies: list[dict[str, Any]]) -> None:
    """results/tradeoff.{md,json}, RESULTS.md and results.json in ``args.out_dir``."""
    recipe = StudentRecipe.from_args(args)
    for st in studies:
        store_bytes(st)
    body = [
        "Teachers: "
        + "; ".join(f"**{st['teacher']}** {st['name']} — {st['summary']}" for st in studies)
        + ".",
        "",
        f"Students: GPT-2 {recipe.layers}×{recipe.embd}, {recipe.steps} steps × "
        f"{recipe.batch}×{recipe.seq_len} tokens, lr {recipe.lr}, {args.seeds} seeds "
        "(seed s: the same initial weights and the same batches for every row), trained on "
        "the teacher's held-out text and evaluated on ground truth of text neither saw. "
        "Loss = α·KD + (1 − α)·CE on ground truth, KD at temperature 1 (the stores are written "
        "at T = 1). Intervals: Student-t 95 % over seeds; Δ vs plain CE is paired by seed.",
    ]
    for st in studies:
        body += [
            "",
            f"## {st['teacher'].capitalize()} teacher: fidelity (real stores of the real writer)",
            "",
            *fidelity_table(st["fidelity"]),
            "",
            f"## {st['teacher'].capitalize()} teacher: students",
            "",
            *student_table(st["students"]),
        ]
    body += [
        "",
        "KL (full vocab): top-k residual spread evenly over unnamed tokens; sampled stores "
        "smoothed with 1e-6 of mass spread evenly. Bucketed KL: stored ids plus one bucket "
        "for the rest, as `forward_kl` sees it. Order-0 entropy: the empirical entropy of the "
        "stored numbers taken one at a time — the floor for a coder that codes each number "
        "alone; zstd/blosc beat it where neighbouring numbers are correlated (sorted-id gaps). "
        "The renormalised top-64 row trains on the same store with its candidates scaled to "
        "sum to 1 and no residual bucket: what axolotl and DistillKit (default) train towards.",
    ]
    meta = run_meta("tradeoff.py", argv)
    write_results(
        args.out_dir / "results" / "tradeoff",
        "Trade-off study",
        meta,
        {"studies": studies},
        body,
    )
    # The named outputs: RESULTS.md and results.json beside the scripts.
    compose_results_md(args.out_dir)
    keys = (
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
    teachers = []
    for st in studies:
        flat = [{k: r.get(k) for k in keys} for r in st["fidelity"]]
        for s in st["students"]:
            if s["mode"] != "store" or s.get("alpha") != 1.0:
                continue
            for r in flat:
                if r["config"] == s["store"] and r["temperature"] == 1.0:
                    r["student_loss"] = s["held_out_ce"]
        teachers.append(
            {
                "teacher": st["teacher"],
                "name": st["name"],
                "metrics": st["metrics"],
                "configs": flat,
                "students": st["students"],
            }
        )
    (args.out_dir / "results.json").write_text(json.dumps({**meta, "teachers": teachers}, indent=2))
