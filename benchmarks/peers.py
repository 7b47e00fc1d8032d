"""Peers measured, not computed: the same teacher distributions written in the layouts other
tools use (axolotl's Parquet KD columns, DistillKit's raw rows, Megatron-LM's offline-KD tar
shards, naive int32 + fp16 arrays) beside logitstore's own top-k u8 store and a raw ``.npy``
baseline, all in one run. For each layout:

- bytes per position of the teacher data on disk (ids, values, residual; not the input ids);
- fidelity of what the tool trains towards (benchlib.peer_targets: axolotl and DistillKit
  renormalise the top-k, Megatron adds the derived residual as a "ghost token", logitstore
  keeps the exact residual), against the teacher's exact distribution, both directions,
  over the named ids plus one bucket for the rest: KL(target ‖ teacher) is finite for every
  target (for a renormalised top-k it is −log Σ top-k); KL(teacher ‖ target), what a
  forward-KL loss minimises, is infinite where the target gives the tail no mass;
- write throughput (teacher logits → bytes on disk, each layout doing its own top-k) and
  read throughput (disk → torch tensors: int64 ids, float32 values), medians of
  ``--repeats`` runs, wall-clock and per CPU-second of this process, each beside the raw
  ``.npy`` baseline of the same run.

DistillKit's compressed form is not rebuilt here (it is not on PyPI and its layout is its
code): ``--dump-topk FILE`` saves the exact top-128 rows for a one-off run of its compressor
from its source, outside this repository, and ``--add-distillkit FILE`` records that run's
figures beside the teacher's section as a separate table, without measuring anything.

Results: benchmarks/results/peers_layouts.{md,json}, one section per teacher (a run on
another teacher adds its section, a rerun replaces it); peers_layouts_distillkit.json holds
the DistillKit figures, peers_layouts_notes.md hand-written notes appended to the page.

    python benchmarks/peers.py                           # the cached study teacher
    python benchmarks/peers.py --teacher benchmarks/.cache/OTHER
    python benchmarks/peers.py --quick                   # a tiny teacher, seconds
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
from benchlib.peer_layouts import LAYOUTS, Decoded, Layout, RunInfo, topk_logprobs
from benchlib.peer_targets import PEER_TARGETS
from benchlib.report import BENCH_DIR, log, md_table, one_thread_if_quick, run_meta
from benchlib.stores import teacher_logits
from benchlib.teacher import (
    CACHE_ROOT,
    QUICK_TEACHER,
    STUDY_TEACHER,
    TeacherSettings,
    default_out_dir,
    ensure_teacher,
)

import logitstore
from logitstore.write.inputs import Document

CHUNK = 2048  # positions per logits chunk handed to the writers


def bucket_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p / q) per row over the last axis (0 where p = 0; inf where q = 0 < p)."""
    ratio = torch.where(p > 0, p.log() - q.clamp_min(0).log(), torch.zeros_like(p))
    return torch.where(p > 0, p * ratio, torch.zeros_like(p)).sum(-1)


def joined(decoded: list[Decoded]) -> Decoded:
    """A layout's chunks as one ``(N, k)`` Decoded."""
    res = [d.residual for d in decoded]
    return Decoded(
        torch.cat([d.ids for d in decoded]),
        torch.cat([d.values for d in decoded]),
        None if res[0] is None else torch.cat([r for r in res if r is not None]),
        decoded[0].logprobs,
    )


def fidelity(
    layouts: list[Layout], decoded: list[Decoded], logits: torch.Tensor
) -> list[dict[str, Any]]:
    """For each layout: both KLs between its training target and the teacher's exact
    float64 distribution, over the target's ids plus one bucket for the rest, averaged over
    positions; and the fraction of positions where the forward KL is finite. One softmax of
    the logits serves every layout."""
    fwd: list[list[torch.Tensor]] = [[] for _ in layouts]
    rev: list[list[torch.Tensor]] = [[] for _ in layouts]
    for a in range(0, len(logits), CHUNK):
        p_all = torch.softmax(logits[a : a + CHUNK].double(), -1)  # (c, V)
        for j, (layout, d) in enumerate(zip(layouts, decoded, strict=True)):
            c = d.ids[a : a + CHUNK]
            stored = torch.zeros(len(c)) if d.residual is None else d.residual[a : a + CHUNK]
            chunk = Decoded(c, d.values[a : a + CHUNK], None, d.logprobs)
            ids, q, r_q = PEER_TARGETS[layout.target](c, chunk.probs(), stored.double())
            p = p_all.gather(-1, ids)  # (c, m)
            # the tail: float64 sums of a float64 softmax, exact to ~1e-15 (no (c, V) copy)
            r_p = (1.0 - p.sum(-1)).clamp_min(0.0)  # (c,)
            P = torch.cat([p, r_p[:, None]], -1)  # (c, m + 1)
            Q = torch.cat([q.double(), r_q.double()[:, None]], -1)
            fwd[j].append(bucket_kl(P, Q))
            rev[j].append(bucket_kl(Q, P))
    out = []
    for f_parts, r_parts in zip(fwd, rev, strict=True):
        f, r = torch.cat(f_parts), torch.cat(r_parts)
        finite = torch.isfinite(f)
        out.append(
            {
                "kl_target_teacher": float(r.mean()),
                "kl_teacher_target": float(f.mean()) if bool(finite.all()) else math.inf,
                "kl_teacher_target_where_finite": float(f[finite].mean())
                if bool(finite.any())
                else math.nan,
                "forward_kl_finite_fraction": float(finite.double().mean()),
            }
        )
    return out


def timed(fn: Any, repeats: int, warm_up: bool) -> tuple[float, float, Any]:
    """Median wall-clock and CPU seconds of ``fn()`` over ``repeats`` calls (after one
    untimed call if ``warm_up``), and the last result. CPU time is this process's (all its
    threads: the store writer's too)."""
    walls, cpus, out = [], [], fn() if warm_up else None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def measure(
    layout: Layout, logits: torch.Tensor, info: RunInfo, root: Path, repeats: int
) -> tuple[dict[str, Any], Decoded]:
    """Write ``logits`` in ``layout`` ``repeats`` times, read it back ``repeats`` times
    (after a warm-up read): the row of figures and what was read."""
    path = root / layout.name.replace(" ", "_").replace("/", "_")
    n = len(logits)

    def write() -> None:
        shutil.rmtree(path, ignore_errors=True)
        layout.write((logits[a : a + CHUNK] for a in range(0, n, CHUNK)), info, path)

    # warm-up: the layout's first write of a few positions (library set-up, first-call costs)
    m = min(n, CHUNK)
    cut = info.offsets[info.offsets < m]
    head = RunInfo(info.k, info.vocab, info.input_ids[:m], np.append(cut, m))
    layout.write(iter([logits[:m]]), head, root / "warm-up")
    shutil.rmtree(root / "warm-up")
    w_wall, w_cpu, _ = timed(write, repeats, warm_up=False)
    r_wall, r_cpu, decoded = timed(lambda: layout.read(path, info), repeats, warm_up=True)
    got = joined(decoded)
    if len(got.ids) != n:
        raise RuntimeError(f"{layout.name}: read {len(got.ids)} positions back, wrote {n}")
    row = {
        "layout": layout.name,
        "stores": layout.stores,
        "target": layout.target,
        "positions": n,
        "bytes_per_position": layout.teacher_bytes(path) / n,
        "write_positions_per_s": n / w_wall,
        "write_positions_per_cpu_s": n / w_cpu,
        "read_positions_per_s": n / r_wall,
        "read_positions_per_cpu_s": n / r_cpu,
    }
    shutil.rmtree(path)
    log(
        "peers",
        f"{layout.name}: {row['bytes_per_position']:.1f} B/pos, write "
        f"{row['write_positions_per_cpu_s']:,.0f} / read {row['read_positions_per_cpu_s']:,.0f} "
        "positions per CPU-s",
    )
    return row, got


def measure_all(
    logits: torch.Tensor, info: RunInfo, root: Path, repeats: int
) -> list[dict[str, Any]]:
    """Every layout of :data:`LAYOUTS`: sizes, rates, then the fidelity of its target.

    Timed with one torch thread, as a DataLoader worker reads: on a loaded machine a second
    OpenMP thread spin-waits at every small op and its CPU time would be charged to the
    layout (a Megatron read measured 55k positions per CPU-s on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, decoded = [], []
    try:
        for layout in LAYOUTS:
            row, got = measure(layout, logits, info, root, repeats)
            rows.append(row)
            decoded.append(got)
    finally:
        torch.set_num_threads(threads)
    log("peers", "fidelity of each layout's training target")
    for row, fid in zip(rows, fidelity(LAYOUTS, decoded, logits), strict=True):
        row.update(fid)
    return rows


def teacher_corpus(teacher_dir: Path) -> str:
    """The text a cached teacher was trained on (its report.json), whose held-out split it
    is measured on: ``stdlib`` unless the report names another source."""
    report = teacher_dir / "report.json"
    if not report.is_file():
        return "stdlib"
    return str(json.loads(report.read_text()).get("settings", {}).get("corpus", "stdlib"))


def held_out_rows(teacher_dir: Path, positions: int, k: int) -> tuple[torch.Tensor, RunInfo]:
    """The teacher's ``(N, V)`` logits on the first ``positions`` positions of its corpus's
    held-out text (256-token windows, as the trade-off study reads them) and the sequences
    they belong to."""
    teacher = logitstore.load_teacher(str(teacher_dir), "cpu")
    corpus = teacher_corpus(teacher_dir)
    texts = held_out_documents() if corpus == "stdlib" else held_out_documents(source=corpus)
    docs = [Document(t, corpus) for t in texts]
    seqs = logitstore.tokenize(docs, teacher.tokenizer, 256)
    logits = teacher_logits(teacher, seqs, positions)  # (N, V)
    n = len(logits)
    keep = int(np.searchsorted(seqs.offsets, n, side="left"))
    offsets = np.append(seqs.offsets[:keep], n).astype(np.int64)
    info = RunInfo(k, logits.shape[1], seqs.input_ids[:n].astype(np.int64), offsets)
    return logits, info


def teacher_summary(logits: torch.Tensor, k: int) -> dict[str, float]:
    """Mean entropy (nats) and mean mass outside the top-k of the teacher on these rows."""
    ent, res = [], []
    for a in range(0, len(logits), CHUNK):
        logp = torch.log_softmax(logits[a : a + CHUNK].double(), -1)
        ent.append(-(logp.exp() * logp).sum(-1))
        res.append(1 - logp.topk(k, -1).values.exp().sum(-1))
    return {"entropy": float(torch.cat(ent).mean()), "residual": float(torch.cat(res).mean())}


def dump_topk(logits: torch.Tensor, k: int, out: Path) -> None:
    """The exact top-``k`` rows (ids most likely first, fp32 log-probs, fp32 residual) as an
    .npz: the input of the one-off DistillKit compressor run."""
    ids, logp, res = [], [], []
    for a in range(0, len(logits), CHUNK):
        i, lp = topk_logprobs(logits[a : a + CHUNK], k)
        p = torch.softmax(logits[a : a + CHUNK].double(), -1)  # (c, V)
        tail = p.scatter(-1, i, 0.0).sum(-1)  # (c,) exact mass outside the top-k
        ids.append(i.numpy().astype(np.int32))
        logp.append(lp.numpy())
        res.append(tail.float().numpy())
    np.savez(
        out,
        ids=np.concatenate(ids),
        logprobs=np.concatenate(logp),
        residual=np.concatenate(res),
        vocab=np.int64(logits.shape[1]),
    )
    log("peers", f"wrote the exact top-{k} rows to {out}")


def fmt_kl(x: float) -> str:
    """A KL in nats; a tiny negative one (float32 values that do not sum to exactly 1) as 0."""
    return "∞" if math.isinf(x) else f"{max(x, 0.0):.2e}"


def section(run: dict[str, Any], dk: dict[str, Any] | None) -> list[str]:
    """One teacher's tables; ``dk``: the one-off DistillKit figures on that teacher."""
    rows = run["layouts"]
    base = next(r for r in rows if r["layout"].startswith("raw .npy"))
    t = run["teacher"]
    body = [
        f"## Teacher `{t['name']}`: V = {t['vocab']}, top-{run['k']}, {run['positions']:,} "
        f"held-out positions of its corpus ({t.get('corpus', 'stdlib')}); mean entropy "
        f"{t['entropy']:.2f} nats, mean mass outside the top-{run['k']} {t['residual']:.3f}",
        "",
        f"`{run['command']}` ({run['date']}; {run['machine']}; median of {run['repeats']}).",
        "",
        *md_table(
            [
                "layout",
                "stored",
                "B/position",
                "training target",
                "KL(target ‖ teacher)",
                "KL(teacher ‖ target)",
                "finite at",
                "write pos/s (wall)",
                "write pos/CPU-s",
                "read pos/s (wall)",
                "read pos/CPU-s",
                "read vs .npy (CPU-s)",
            ],
            [
                [
                    r["layout"],
                    r["stores"],
                    f"{r['bytes_per_position']:.1f}",
                    r["target"],
                    fmt_kl(r["kl_target_teacher"]),
                    fmt_kl(r["kl_teacher_target"]),
                    f"{r['forward_kl_finite_fraction']:.1%}",
                    f"{r['write_positions_per_s']:,.0f}",
                    f"{r['write_positions_per_cpu_s']:,.0f}",
                    f"{r['read_positions_per_s']:,.0f}",
                    f"{r['read_positions_per_cpu_s']:,.0f}",
                    f"{r['read_positions_per_cpu_s'] / base['read_positions_per_cpu_s']:.2f}",
                ]
                for r in rows
            ],
        ),
        "",
    ]
    if dk:
        body += [
            f"DistillKit's compressed form, its own compressor run once from its source "
            f"(github.com/arcee-ai/DistillKit at `{dk['commit']}`) in a separate environment "
            f"outside this repository, on this teacher's exact top-{dk['k_input']} rows "
            "(`--dump-topk`); none of its code is committed here:",
            "",
            *md_table(
                [
                    "DistillKit config",
                    "B/position (bytes columns)",
                    "B/position (Parquet file)",
                    "training target",
                    "KL(target ‖ teacher)",
                    "KL(teacher ‖ target)",
                    "finite at",
                ],
                [
                    [
                        c["config"],
                        f"{c['bytes_per_position']:.1f}",
                        f"{c['parquet_bytes_per_position']:.1f}",
                        c["target"],
                        fmt_kl(c["kl_target_teacher"]),
                        fmt_kl(c["kl_teacher_target"]),
                        f"{c['forward_kl_finite_fraction']:.1%}",
                    ]
                    for c in dk["configs"]
                ],
            ),
            "",
            f"Command: `{dk['command']}`.",
            "",
        ]
    return body


NOTES = [
    "# Peers measured: the layouts other tools store teacher distributions in",
    "",
    "Written and read back by `benchmarks/peers.py` (layouts: `benchmarks/benchlib/"
    "peer_layouts.py`; training targets: `benchmarks/benchlib/peer_targets.py`, each citing "
    "the peer's source). B/position: the per-position teacher data on disk (ids, values, "
    "residual; Parquet: the compressed column chunks of the id and value columns; tar and "
    "npy/npz: whole files). Both KLs are over the target's ids plus one bucket for the rest "
    "of the vocabulary, against the teacher's exact float64 distribution at T = 1: a "
    "renormalised top-k gives the tail no mass, so KL(teacher ‖ target), what a forward-KL "
    "loss minimises, is infinite, and KL(target ‖ teacher) = −log Σ top-k. Write: teacher "
    "logits (float32, 2,048 positions a chunk) → files, each layout doing its own top-k; "
    "read: files → torch tensors (int64 ids, float32 values; log-probs where the layout "
    "stores log-probs), one torch thread (as in a DataLoader worker). The machine is shared "
    "with a long CPU study: the CPU-second rates "
    "(time.process_time of this process, all its threads) are the ones to judge speed by; "
    "wall-clock rates are beside them.",
    "",
]


def render(out: Path) -> None:
    """``out``.md from ``out``.json (the measured runs), ``out``_distillkit.json (the one-off
    DistillKit figures per teacher) and ``out``_notes.md (hand-written: the shared sample)."""
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    dk_path = out.parent / f"{out.name}_distillkit.json"
    dk = json.loads(dk_path.read_text()) if dk_path.exists() else {}
    body = list(NOTES)
    for name in sorted(runs):
        body += section(runs[name], dk.get(name))
    notes = out.parent / f"{out.name}_notes.md"
    if notes.exists():
        body += [notes.read_text()]
    out.with_suffix(".md").write_text("\n".join(body).rstrip() + "\n")


def write_results(out: Path, key: str, run: dict[str, Any]) -> None:
    """Merge ``run`` into ``out``.json under ``key`` (a rerun on the same teacher replaces
    it) and rewrite ``out``.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs: dict[str, Any] = {}
    if path.exists():
        runs = json.loads(path.read_text()).get("runs", {})
    runs[key] = run
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    render(out)


def add_distillkit(out: Path, key: str, figures: Path) -> None:
    """Record the one-off DistillKit run's ``figures`` for teacher ``key`` and re-render."""
    path = out.parent / f"{out.name}_distillkit.json"
    have = json.loads(path.read_text()) if path.exists() else {}
    have[key] = json.loads(figures.read_text())
    path.write_text(json.dumps(have, indent=2) + "\n")
    render(out)


def default_teacher() -> Path:
    return default_out_dir(TeacherSettings(**STUDY_TEACHER))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help=f"teacher directory (default: the cached study teacher, {default_teacher()})",
    )
    p.add_argument("--positions", type=int, default=32768, help="held-out positions")
    p.add_argument("--k", type=int, default=64, help="top-k of every layout (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per layout (median)")
    p.add_argument("--dump-topk", type=Path, default=None, help="also save top-128 rows here")
    p.add_argument(
        "--add-distillkit",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: record the one-off DistillKit compressor run's figures on "
        "--teacher (its directory name is the key) and re-render the results",
    )
    p.add_argument("--tmp", type=Path, default=None, help="scratch directory")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="results go to OUT/results/peers_layouts.{md,json} (default benchmarks/; "
        "with --quick out/benchmarks-quick/)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny teacher trained in seconds, 2,048 positions"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.repeats = min(args.positions, 2048), 1
    if args.out_dir is None:
        args.out_dir = BENCH_DIR if not args.quick else BENCH_DIR.parent / "out/benchmarks-quick"
    one_thread_if_quick(args.quick)
    out = args.out_dir / "results" / "peers_layouts"
    if args.add_distillkit is not None:
        if not out.with_suffix(".json").exists():
            p.error(f"{out.with_suffix('.json')} does not exist: run a measurement first")
        add_distillkit(out, (args.teacher or default_teacher()).name, args.add_distillkit)
        print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        if args.quick:
            teacher_dir = ensure_teacher(root / "quick-teacher", **QUICK_TEACHER)
        else:
            teacher_dir = args.teacher or default_teacher()
            if not (teacher_dir / "config.json").is_file():
                have = sorted(d.name for d in CACHE_ROOT.glob("*") if d.is_dir())
                p.error(
                    f"no teacher in {teacher_dir} (no config.json). Pass --teacher DIR: a "
                    f"model directory; cached ones under {CACHE_ROOT}: {have or 'none'} "
                    "(python benchmarks/teacher.py trains the study teacher)"
                )
        log("peers", f"teacher {teacher_dir}: logits of {args.positions:,} held-out positions")
        logits, info = held_out_rows(teacher_dir, args.positions, args.k)
        n, vocab = logits.shape
        if vocab < args.k:
            p.error(f"--k {args.k} is wider than the teacher's vocabulary ({vocab})")
        if args.dump_topk is not None:
            dump_topk(logits, min(128, vocab), args.dump_topk)
        rows = measure_all(logits, info, root, args.repeats)
        summary = teacher_summary(logits, args.k)
    meta = run_meta("peers.py", argv)
    name = "quick-teacher" if args.quick else teacher_dir.name
    run = {
        **meta,
        "teacher": {
            "name": name,
            "path": str(teacher_dir),
            "corpus": teacher_corpus(teacher_dir),
            "vocab": vocab,
            **summary,
        },
        "k": args.k,
        "positions": n,
        "repeats": args.repeats,
        "layouts": rows,
    }
    write_results(out, name, run)
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
