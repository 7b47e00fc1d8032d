"""Padding-free capture: the teacher's forward passes when a chat set's lengths spread wide.

A chat dataset mixes one-line exchanges with long multi-turn conversations. Batched in input
order (``--batching sequential``: ``batch_size`` consecutive sequences right-padded to the
longest), much of each forward pass is padding; batched by length (the default,
``logitstore.plan_batches``), little is. Both runs write a real top-64 u8 store with
``logitstore.capture`` from the same teacher and sequences in the same run, and report:

- padding fraction: padded tokens / tokens the teacher computed, from the batches each plan
  makes (what the forward passes actually process);
- teacher tokens/s: real (unpadded) positions written per second of wall time, end to end
  (forward, encode, host write, commits), and the ratio length/sequential.

Lengths are drawn from a log-normal (median ``--median`` tokens, ``--sigma`` in log space,
clipped to [8, ``--seq-len``]): with σ = 1 the 5th and 95th percentiles are ~0.19× and ~5.2×
the median, two orders of magnitude apart as in mixed chat data. Tokens are random ids; a
freshly initialised GPT-2 of the given size is the teacher (its cost per token is what
matters here, not what it predicts).

    python benchmarks/bench_batching.py            # default: a few minutes on 2 cores
    python benchmarks/bench_batching.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib.models import gpt2
from benchlib.report import md_table, one_thread_if_quick, results_dir, run_meta, write_results

from logitstore import Encoding, Teacher, capture, plan_batches, sequences_from_token_ids

BATCHINGS = ("sequential", "length")


def chat_lengths(n: int, median: float, sigma: float, seq_len: int, seed: int) -> np.ndarray:
    """``n`` sequence lengths, log-normal around ``median``, clipped to [8, seq_len]."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), sigma, n))
    return np.clip(np.round(lengths), 8, seq_len).astype(np.int64)


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[float, int]:
    """(padded / computed tokens, computed tokens) for the forward passes ``batches``."""
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - int(lengths.sum()) / computed, computed


def make_teacher(args: argparse.Namespace) -> Teacher:
    model = gpt2(
        args.vocab,
        n_positions=args.seq_len,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=max(1, args.embd // 64),
        seed=0,
    ).eval()

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)

    return Teacher(
        fn=fn,
        vocab_size=args.vocab,
        device=torch.device("cpu"),
        name=f"random GPT-2 {args.layers}x{args.embd}",
        max_length=args.seq_len,
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = chat_lengths(args.sequences, args.median, args.sigma, args.seq_len, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    seqs = sequences_from_token_ids(
        [rng.integers(1, args.vocab, int(n)) for n in lengths], args.seq_len
    )
    teacher = make_teacher(args)
    enc = Encoding("topk", "u8", k=64)
    print(
        f"[batching] {len(lengths)} sequences, {int(lengths.sum()):,} tokens, lengths "
        f"p5/p50/p95 = {np.percentile(lengths, [5, 50, 95]).round().astype(int).tolist()}",
        file=sys.stderr,
    )
    times: dict[str, list[float]] = {b: [] for b in BATCHINGS}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, torch.inference_mode():
        for rep in range(args.repeats):
            for batching in BATCHINGS:  # alternated, so drifting machine load hits both
                t0 = time.perf_counter()
                capture(
                    teacher,
                    seqs,
                    Path(tmp) / f"{batching}-{rep}.zarr",
                    enc,
                    batch_size=args.batch_size,
                    batching=batching,  # type: ignore[arg-type]
                    seq_len=args.seq_len,
                    progress=False,
                )
                times[batching].append(time.perf_counter() - t0)
                print(f"[batching] {batching}: {times[batching][-1]:.2f} s", file=sys.stderr)
    tokens = int(lengths.sum())
    base = statistics.median(times["sequential"])
    results = []
    for batching in BATCHINGS:
        batches = plan_batches(lengths, args.batch_size, batching)  # type: ignore[arg-type]
        pad, computed = padding_fraction(lengths, batches)
        t = statistics.median(times[batching])
        results.append(
            {
                "batching": batching,
                "sequences": len(lengths),
                "tokens": tokens,
                "forward_passes": len(batches),
                "computed_tokens": computed,
                "padding_fraction": pad,
                "seconds": t,
                "teacher_tokens_per_s": tokens / t,
                "speedup_vs_sequential": base / t,
            }
        )
    return results


def write_outputs(out: Path, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    body = [
        f"Teacher: random GPT-2 {args.layers}x{args.embd}, V = {args.vocab:,}, top-64 u8, "
        f"batch size {args.batch_size}, --seq-len {args.seq_len}. Lengths log-normal, median "
        f"{args.median:g}, σ = {args.sigma:g} (clipped to [8, {args.seq_len}]); "
        f"median of {args.repeats} run(s), the two batchings alternated in one process.",
        "",
        *md_table(
            [
                "batching",
                "sequences",
                "tokens",
                "forward passes",
                "computed tokens",
                "padding",
                "s",
                "teacher tokens/s",
                "vs sequential",
            ],
            [
                [
                    r["batching"],
                    f"{r['sequences']:,}",
                    f"{r['tokens']:,}",
                    f"{r['forward_passes']:,}",
                    f"{r['computed_tokens']:,}",
                    f"{r['padding_fraction']:.1%}",
                    f"{r['seconds']:.2f}",
                    f"{r['teacher_tokens_per_s']:,.0f}",
                    f"{r['speedup_vs_sequential']:.2f}",
                ]
                for r in results
            ],
        ),
    ]
    meta = run_meta("bench_batching.py", sys.argv[1:])
    write_results(out, "Capture batching", meta, {"results": results}, body)
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sequences", type=int, default=256, help="sequences (default 256)")
    p.add_argument("--median", type=float, default=200, help="median length in tokens")
    p.add_argument("--sigma", type=float, default=1.0, help="log-space spread of lengths")
    p.add_argument("--seq-len", type=int, default=2048, help="longest sequence")
    p.add_argument("--batch-size", type=int, default=8, help="the capture's --batch-size")
    p.add_argument("--vocab", type=int, default=8192, help="teacher vocabulary")
    p.add_argument("--layers", type=int, default=2, help="teacher layers")
    p.add_argument("--embd", type=int, default=128, help="teacher width")
    p.add_argument("--repeats", type=int, default=3, help="runs per batching (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", type=Path, default=None, help="scratch directory")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json; default benchmarks/results/batching, with --quick "
        "out/benchmarks-quick/results/batching)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.sequences, args.median, args.seq_len, args.repeats = 48, 40, 256, 1
        args.vocab, args.layers, args.embd = 1024, 1, 64
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "batching"
    one_thread_if_quick(args.quick)
    write_outputs(args.out, run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
