"""Capture throughput with 1 process vs 2 torchrun ranks on this machine (host side).

The same capture — a GPT-2 teacher (4 layers × 256, V = 8192, random weights with a scaled
head, built from a seed, so every rank holds the same model), top-64 u8, over held-out
standard-library source as byte ids — runs as:

- ``1 process × 1 thread``: the baseline;
- ``1 process × 2 threads``: the same process given both cores;
- ``2 ranks × 1 thread``: ``torchrun --standalone --nproc-per-node 2`` (gloo), each rank
  writing its half of the shards into the one store.

Timed is ``capture()`` itself, from the first rank's start to the last rank's return (the
store complete), so interpreter start and imports are not in it; the whole command's wall
time is reported beside it. The 2-rank store is checked byte for byte against the 1-thread
one. The ranks share this machine's cores with each other (and with anything else running):
efficiency = speedup / 2 says how much of a second core a second rank turned into work.

    python benchmarks/bench_ranks.py            # default: a few minutes on 2 cores
    python benchmarks/bench_ranks.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib.corpus import held_out_documents
from benchlib.models import gpt2
from benchlib.report import md_table, results_dir, run_meta, write_results

import logitstore

VOCAB, LAYERS, EMBD, HEADS = 8192, 4, 256, 4
CONFIGS = [  # name, ranks, threads per rank
    ("1 process × 1 thread", 1, 1),
    ("1 process × 2 threads", 1, 2),
    ("2 ranks × 1 thread", 2, 1),
]


def worker(args: argparse.Namespace) -> int:
    """One process (or torchrun rank) of a measured run: capture, timed."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = gpt2(VOCAB, n_positions=args.seq_len, n_layer=LAYERS, n_embd=EMBD, n_head=HEADS)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked, trained-looking distribution
    model.eval()

    calls = [0, 0]  # forward passes, tokens computed (padding included)

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        calls[1] += ids.numel()
        out: torch.Tensor = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return out

    teacher = logitstore.Teacher(fn=fn, vocab_size=VOCAB, device=torch.device("cpu"))
    text = "".join(held_out_documents(limit_files=400, skip_tests=True)).encode()
    ids = np.frombuffer(text[: args.positions], dtype=np.uint8).astype(np.int64)
    seqs = logitstore.sequences_from_token_ids([ids], args.seq_len)
    start = time.time()
    logitstore.capture(
        teacher,
        seqs,
        args.store,
        logitstore.Encoding("topk", "u8", k=64),
        batch_size=args.batch_size,
        shard_positions=args.shard_positions,
        chunk_positions=args.shard_positions // 8,
        progress=False,
    )
    rank = os.environ.get("RANK", "0")
    Path(args.timing, f"rank{rank}.json").write_text(
        json.dumps({"start": start, "end": time.time(), "passes": calls[0], "tokens": calls[1]})
    )
    return 0


def measure(args: argparse.Namespace, ranks: int, threads: int, scratch: Path) -> dict[str, Any]:
    store, timing = scratch / "store.zarr", scratch / "timing"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(timing, ignore_errors=True)
    timing.mkdir(parents=True)
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        "--threads",
        str(threads),
        "--store",
        str(store),
        "--timing",
        str(timing),
        "--positions",
        str(args.positions),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--shard-positions",
        str(args.shard_positions),
    ]
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SOURCE_DATE_EPOCH": "1700000000"}
    t0 = time.perf_counter()
    proc = subprocess.run([*launch, *script], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run with {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    spans = [json.loads(p.read_text()) for p in timing.glob("rank*.json")]
    span = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    passes = sum(s["passes"] for s in spans)
    tokens = sum(s["tokens"] for s in spans)
    return {"capture_s": span, "wall_s": wall, "store": store, "passes": passes, "tokens": tokens}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--positions", type=int, default=1 << 16, help="positions captured")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--shard-positions", type=int, default=4096, help="positions per shard (8 chunks)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--out", type=Path, default=None, help="results stem (.md/.json)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timing", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.positions, args.seq_len, args.shard_positions, args.repeats = 2048, 256, 512, 1
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "ranks"
    # --quick: the baseline and the ranks only (each run pays a process start).
    configs = [c for c in CONFIGS if not (args.quick and c[2] > 1)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        reference: dict[str, bytes] | None = None
        # Rounds of every configuration in turn, so a change in the machine's load between
        # rounds touches each configuration alike; speedups are taken within a round.
        for _ in range(args.repeats):
            for name, ranks, threads in configs:
                run = measure(args, ranks, threads, Path(tmp, f"{ranks}x{threads}"))
                if reference is None:
                    reference = files(run["store"])
                run["identical"] = files(run["store"]) == reference
                runs[name].append(run)
                print(f"{name}: {run['capture_s']:.2f} s", file=sys.stderr)
    base_name = configs[0][0]
    rows: list[dict[str, Any]] = []
    for name, ranks, threads in configs:
        rs = runs[name]
        capture_s = statistics.median(r["capture_s"] for r in rs)
        speedups = [
            b["capture_s"] / r["capture_s"] for b, r in zip(runs[base_name], rs, strict=True)
        ]
        rows.append(
            {
                "config": name,
                "ranks": ranks,
                "threads": threads,
                "capture_s": capture_s,
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "positions_per_s": args.positions / capture_s,
                "speedup": statistics.median(speedups),
                "efficiency": statistics.median(speedups) / (ranks * threads),
                "identical": all(r["identical"] for r in rs),
                "forward_passes": rs[0]["passes"],
                "tokens_computed": rs[0]["tokens"],
                "runs_s": [round(r["capture_s"], 3) for r in rs],
            }
        )
    table = md_table(
        [
            "config",
            "capture s (median)",
            "positions/s",
            "vs 1 × 1",
            "per core",
            "command wall s",
            "forward passes (all ranks)",
            "bytes = 1 × 1",
        ],
        [
            [
                r["config"],
                f"{r['capture_s']:.2f}",
                f"{r['positions_per_s']:,.0f}",
                f"{r['speedup']:.2f}",
                f"{r['efficiency']:.2f}",
                f"{r['wall_s']:.1f}",
                f"{r['forward_passes']}",
                "yes" if r["identical"] else "NO",
            ]
            for r in rows
        ],
    )
    load = os.getloadavg()[0]
    body = [
        f"{args.positions:,} positions, sequences of {args.seq_len}, batch {args.batch_size}, "
        f"shards of {args.shard_positions} positions; GPT-2 {LAYERS}×{EMBD}, V = {VOCAB}, "
        f"top-64 u8; median of {args.repeats}. {os.cpu_count()} cores, load average "
        f"{load:.1f} at the end of the run (other processes share the cores).",
        "",
        *table,
        "",
        "`vs 1 × 1` is the median, over rounds, of the speedup over one process with one "
        "thread in the same round (each round runs every configuration in turn); `per core` "
        "divides it by the cores the configuration uses (ranks × threads). `command wall s` "
        "adds process start, imports and model construction, paid once per rank. `forward "
        "passes` counts the teacher's batches over all ranks: the ranks split the work, they "
        "do not repeat it (at most the batch of a sequence crossing the cut between two ranks "
        "runs twice).",
    ]
    meta = run_meta("bench_ranks.py", argv)
    write_results(args.out, "Capture: 1 process vs 2 torchrun ranks", meta, {"rows": rows}, body)
    print("\n".join(body), file=sys.stderr)
    print(f"wrote {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
