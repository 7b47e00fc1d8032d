"""Loss benchmark: what a KD step costs beside a cross-entropy step, and its peak memory.

One optimizer step of a GPT-2 student on top-64 teacher targets, three ways, measured in the
same run and interleaved (CE, KD, fused, CE, KD, fused, ...), medians reported:

- **CE only**: ``losses.cross_entropy`` (the baseline every ratio divides by);
- **CE + forward KL, unfused**: ``cross_entropy + forward_kl`` as v0.2 computed it (two
  log-softmaxes; the KL recomputed in backward by activation checkpointing);
- **fused**: ``losses.distillation_loss`` — both terms from one log-softmax, chunked over the
  positions, the gradient written during the forward pass.

(a) The benchmark student of bench_read.py (GPT-2 4×256, V = 4,096, batch 8×512), timed.
(b) Students with V = 32k and 128k heads (GPT-2 2×256, batch 2×512): each loss in a fresh
    subprocess, whose peak resident memory during three steps (above what it held before the
    first step, sampled by a thread) is the figure that matters there, beside the step time.

The teacher targets are synthetic (top-64 of a random teacher softmax, renormalised into
probs + residual, some positions masked, a few labels -100): the cost of a loss does not depend
on the values. Times are the process's CPU seconds per step (``time.process_time``) with one
torch thread by default (``--threads``): on a 2-core machine shared with other work, wall time
mostly measures the neighbours, and OpenMP threads spin while they wait for a core. Compare
ratios within a run.

    python benchmarks/bench_loss.py            # ~5 minutes on 2 cores
    python benchmarks/bench_loss.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from benchlib.models import gpt2
from benchlib.report import log, md_table, results_dir, run_meta, write_results

from logitstore import losses

LOSSES = ("CE only", "CE + forward KL, unfused", "fused (distillation_loss)")


def make_batch(vocab: int, batch: int, seq: int, k: int = 64, seed: int = 0) -> dict[str, Any]:
    """Token ids, labels, a loss mask and top-``k`` teacher targets ``(B, T, k)``."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.roll(input_ids, -1, 1)
    labels[:, -1] = -100
    # 32 positions at a time: a whole (B, T, V) teacher would set the process's peak memory
    # above what the step itself needs, hiding the step's peak.
    ids, vals = [], []
    for _ in range(0, batch * seq, 32):
        top = (torch.randn(32, vocab, generator=g) * 2).softmax(-1).topk(k, dim=-1)
        ids.append(top.indices)
        vals.append(top.values)
    probs = torch.cat(vals)[: batch * seq].reshape(batch, seq, k)  # (B, T, k)
    mask = torch.ones(batch, seq)
    mask[:, : seq // 16] = 0  # a prompt the loss skips
    return {
        "input_ids": input_ids,
        "labels": labels,
        "ids": torch.cat(ids)[: batch * seq].reshape(batch, seq, k).to(torch.int32),
        "probs": probs,
        "residual": (1 - probs.sum(-1)).clamp_min(0),
        "loss_mask": mask,
    }


def loss_fn(which: str, logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
    if which == LOSSES[0]:
        return losses.cross_entropy(logits, b["labels"], b["loss_mask"])
    if which == LOSSES[1]:
        ce = losses.cross_entropy(logits, b["labels"], b["loss_mask"])
        kl = losses.forward_kl(logits, b["ids"], b["probs"], b["residual"], b["loss_mask"])
        return 0.5 * kl + 0.5 * ce
    return losses.distillation_loss(
        logits, b["labels"], b["ids"], b["probs"], b["residual"], b["loss_mask"], alpha=0.5
    )


def make_step(vocab: int, layers: int, embd: int, batch: int, seq: int) -> Any:
    model = gpt2(vocab, n_positions=seq, n_layer=layers, n_embd=embd, n_head=embd // 64, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = make_batch(vocab, batch, seq)

    def step(which: str) -> float:
        t0 = time.process_time()  # CPU seconds of this process: what the step costs
        logits = model(input_ids=b["input_ids"]).logits  # (B, T, V)
        loss = loss_fn(which, logits, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.process_time() - t0

    return step


def bench_student(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(a): the three losses interleaved on one student; medians and ratios to CE."""
    step = make_step(args.vocab, args.layers, args.embd, args.batch, args.seq_len)
    times: dict[str, list[float]] = {w: [] for w in LOSSES}
    for w in LOSSES:
        step(w)  # warm-up
    for i in range(args.repeats):
        for w in LOSSES:
            times[w].append(step(w))
        log("loss", f"round {i + 1}/{args.repeats}")
    ce = statistics.median(times[LOSSES[0]])
    rows = []
    for w in LOSSES:
        med = statistics.median(times[w])
        rows.append(
            {
                "student": f"GPT-2 {args.layers}x{args.embd}",
                "vocab": args.vocab,
                "batch": f"{args.batch}x{args.seq_len}",
                "loss": w,
                "step_s": med,
                "ratio_vs_ce": med / ce,
                "samples_s": times[w],
            }
        )
        log("loss", f"V={args.vocab} {w}: {med * 1e3:.0f} ms ({med / ce:.2f}x CE)")
    return rows


def _rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_memory_run(vocab: int, which: str, layers: int, embd: int, batch: int, seq: int) -> None:
    """In a fresh process: the most resident memory three steps of one loss add (sampled every
    half millisecond by a thread; torch ops release the GIL), and their median CPU time."""
    step = make_step(vocab, layers, embd, batch, seq)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = [step(which) for _ in range(3)]
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": (peak[0] - base) / 2**20, "step_s": statistics.median(times)}))


def bench_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(b): each (vocabulary, loss) in its own subprocess, so peaks do not mix."""
    rows = []
    for vocab in args.big_vocab:
        ce_peak = ce_time = 0.0
        for w in LOSSES:
            cmd = [sys.executable, __file__, "--one", str(vocab), w]
            cmd += ["--layers", "2", "--embd", str(args.embd)]
            cmd += ["--batch", str(args.big_batch), "--seq-len", str(args.seq_len)]
            cmd += ["--threads", str(torch.get_num_threads())]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if w == LOSSES[0]:
                ce_peak, ce_time = r["peak_mib"], r["step_s"]
            rows.append(
                {
                    "student": f"GPT-2 2x{args.embd}",
                    "vocab": vocab,
                    "batch": f"{args.big_batch}x{args.seq_len}",
                    "positions": args.big_batch * args.seq_len,
                    "loss": w,
                    "step_s": r["step_s"],
                    "ratio_vs_ce": r["step_s"] / ce_time,
                    "peak_mib": r["peak_mib"],
                    "peak_vs_ce": r["peak_mib"] / max(ce_peak, 1e-9),
                }
            )
            log("loss", f"V={vocab} {w}: peak +{r['peak_mib']:.0f} MiB, {r['step_s']:.2f} s")
    return rows


def write_outputs(
    out: Path, a: list[dict[str, Any]], b: list[dict[str, Any]], argv: list[str]
) -> None:
    logits_mib = [r["vocab"] * r["positions"] * 4 / 2**20 for r in b]  # one (B, T, V) f32
    body = [
        "## (a) One optimizer step of the benchmark student (median CPU time, interleaved rounds)",
        "",
        *md_table(
            ["student", "vocab", "batch", "loss", "step (CPU ms)", "vs CE only"],
            [
                [
                    r["student"],
                    f"{r['vocab']:,}",
                    r["batch"],
                    r["loss"],
                    f"{r['step_s'] * 1e3:.0f}",
                    f"{r['ratio_vs_ce']:.2f}",
                ]
                for r in a
            ],
        ),
        "",
        "## (b) Large vocabularies: peak memory of a step (each loss in its own process)",
        "",
        "Peak = the most resident memory three steps add to the process (sampled every 0.5 ms; "
        "includes AdamW's state, the same for every loss); one float32 `(B, T, V)` tensor is "
        "the last column's unit.",
        "",
        *md_table(
            [
                "student",
                "vocab",
                "batch",
                "loss",
                "step (CPU s)",
                "vs CE only",
                "peak (MiB)",
                "peak vs CE",
                "(B,T,V) f32 (MiB)",
            ],
            [
                [
                    r["student"],
                    f"{r['vocab']:,}",
                    r["batch"],
                    r["loss"],
                    f"{r['step_s']:.2f}",
                    f"{r['ratio_vs_ce']:.2f}",
                    f"{r['peak_mib']:,.0f}",
                    f"{r['peak_vs_ce']:.2f}",
                    f"{mib:,.0f}",
                ]
                for r, mib in zip(b, logits_mib, strict=True)
            ],
        ),
    ]
    write_results(
        out, "Loss step", run_meta("bench_loss.py", argv), {"student": a, "vocab": b}, body
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one thread (a smoke run)")
    p.add_argument("--out", type=Path, help="results path without suffix (default: results/loss)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--big-vocab", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--big-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--one", nargs=2, metavar=("VOCAB", "LOSS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        one_memory_run(
            int(args.one[0]), args.one[1], args.layers, args.embd, args.batch, args.seq_len
        )
        return 0
    if args.quick:
        args.vocab, args.layers, args.embd, args.batch, args.seq_len = 512, 1, 64, 2, 64
        args.repeats, args.big_vocab, args.big_batch = 3, [2048], 1
    out = args.out or results_dir(args.quick) / "results" / "loss"
    a = bench_student(args)
    b = bench_memory(args)
    write_outputs(out, a, b, argv)
    log("loss", f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
