"""Read-path benchmark: LogitDataset throughput beside np.memmap of the same decoded data, and
the cost of a KD loss step over a plain cross-entropy step.

(a) A top-64 u8 store of real teacher rows (the shipped teacher on held-out stdlib text,
    tiled to ``--positions``) is read through ``LogitDataset`` + ``collate`` in a real
    ``DataLoader`` with 0, 1 and 2 workers. The baseline is the same dataset class reading the
    same windows, in the same order, from raw ``np.memmap`` files of the already-decoded arrays:
    the difference is exactly decompression, checksums and decoding.
(b) One optimizer step of a small GPT-2 student on a batch from the store: cross-entropy
    alone, then cross-entropy + forward KL with the residual bucket.

    python benchmarks/bench_read.py            # default: a few minutes on 2 cores
    python benchmarks/bench_read.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib.models import gpt2
from benchlib.report import (
    md_table,
    one_thread_if_quick,
    pyplot,
    results_dir,
    run_meta,
    write_results,
)
from benchlib.stores import add_store_args, build_store
from torch.utils.data import DataLoader

import logitstore
from logitstore import Batch, LogitDataset, collate, losses

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


class MemmapWindows(LogitDataset):
    """The baseline: identical windows, order and sample code, read from raw memmaps of the
    decoded arrays instead of the store."""

    def __init__(self, store: Path, raw: Path, seq_len: int, **kw: Any) -> None:
        super().__init__(store, seq_len, **kw)
        self.raw = raw

    def _read_block(self, start: int, stop: int) -> Batch:
        # Every field the store's reader returns, loss_mask included (format 1.1).
        arrays = [np.load(self.raw / f"{k}.npy", mmap_mode="r") for k in Batch._fields]
        return Batch(*(np.array(a[start:stop]) for a in arrays))  # page-cache read


def write_raw(store: Path, raw: Path) -> None:
    """Decode the whole store once and keep it as .npy files (the memmap baseline's input)."""
    s = logitstore.open(store)
    raw.mkdir(parents=True, exist_ok=True)
    outs = {}
    for start in range(0, len(s), 1 << 18):
        b = s.read(start, min(start + (1 << 18), len(s)), id_dtype=np.int32)
        for key, value in b._asdict().items():
            if key not in outs:
                shape = (len(s), *value.shape[1:])
                outs[key] = np.lib.format.open_memmap(
                    raw / f"{key}.npy", mode="w+", dtype=value.dtype, shape=shape
                )
            outs[key][start : start + len(value)] = value
    for m in outs.values():
        m.flush()


def loader_rate(ds: LogitDataset, workers: int, batch: int, limit: int) -> float:
    """Positions per second through a real DataLoader over up to ``limit`` positions, timed
    from the first request: worker start-up and the first blocks' reads are included, as
    they are in every epoch of a real run."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for b in loader:
        n += int(b["attention_mask"].sum())
        if n >= limit:
            break
    # With 0 workers, the process's CPU time (main thread + read-ahead thread) is the whole
    # cost: positions per CPU-second is the rate on an idle core, whatever the neighbours do.
    if workers == 0:
        CPU_RATES.append(n / (time.process_time() - c0))
    return n / (time.perf_counter() - t0)


CPU_RATES: list[float] = []  # loader_rate's positions per CPU-second of its 0-worker runs


def bench_loading(args: argparse.Namespace, store: Path, raw: Path) -> list[dict[str, Any]]:
    rows = []
    for workers in (0, 1, 2):
        for source in ("logitstore", "memmap"):
            rates = []
            for rep in range(args.repeats):
                kw = {"seed": rep, "block_positions": args.block}
                ds = (
                    LogitDataset(store, args.seq_len, **kw)
                    if source == "logitstore"
                    else MemmapWindows(store, raw, args.seq_len, **kw)
                )
                rates.append(loader_rate(ds, workers, args.batch, args.limit))
            rows.append(
                {"workers": workers, "source": source, "positions_per_s": statistics.median(rates)}
            )
            if workers == 0:
                rows[-1]["positions_per_cpu_s"] = statistics.median(CPU_RATES)
                CPU_RATES.clear()
            print(
                f"[load] workers={workers} {source}: {rows[-1]['positions_per_s']:,.0f} pos/s",
                file=sys.stderr,
            )
    read = []
    s = logitstore.open(store)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for start in range(0, min(len(s), args.limit), args.block):
            s.read(start, min(start + args.block, len(s)), id_dtype=np.int32)
        read.append(min(len(s), args.limit) / (time.perf_counter() - t0))
    rows.append(
        {
            "workers": 0,
            "source": "LogitStore.read (blocks, no Dataset)",
            "positions_per_s": statistics.median(read),
        }
    )
    return rows


def bench_step(args: argparse.Namespace, store: Path) -> list[dict[str, Any]]:
    vocab = logitstore.open(store).vocab_size
    model = gpt2(
        vocab,
        n_positions=args.seq_len,
        n_layer=args.student_layers,
        n_embd=args.student_embd,
        n_head=args.student_embd // 64,
        dropout=0.1,  # GPT2Config's default, which this step has always been timed with
        seed=0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(
        iter(
            DataLoader(
                LogitDataset(store, args.seq_len, seed=0),
                batch_size=args.step_batch,
                collate_fn=collate,
            )
        )
    )

    def step(kd: bool) -> None:
        logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        loss = losses.cross_entropy(logits, batch["labels"])
        if kd:
            loss = loss + losses.forward_kl(
                logits, batch["ids"], batch["probs"], batch["residual"], batch["loss_mask"]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = []
    for kd in (False, True):
        step(kd)  # warm-up
        times = []
        for _ in range(args.repeats * 2):
            t0 = time.perf_counter()
            step(kd)
            times.append(time.perf_counter() - t0)
        out.append(
            {
                "loss": "CE + forward KL (top-64)" if kd else "CE only",
                "step_s": statistics.median(times),
            }
        )
    out[1]["ratio_vs_ce"] = out[1]["step_s"] / out[0]["step_s"]
    out[0]["ratio_vs_ce"] = 1.0
    for r in out:
        r |= {
            "student": f"GPT-2 {args.student_layers}x{args.student_embd}",
            "vocab": vocab,
            "batch": f"{args.step_batch}x{args.seq_len}",
        }
        print(
            f"[step] {r['loss']}: {r['step_s'] * 1e3:.0f} ms ({r['ratio_vs_ce']:.2f}x)",
            file=sys.stderr,
        )
    return out


def write_outputs(
    out: Path, load: list[dict[str, Any]], steps: list[dict[str, Any]], argv: list[str]
) -> None:
    memmap = {r["workers"]: r["positions_per_s"] for r in load if r["source"] == "memmap"}
    body = [
        "## (a) LogitDataset + collate through a DataLoader (top-64 u8, windows of "
        f"{steps[0]['batch'].split('x')[1]} positions)",
        "",
        *md_table(
            ["workers", "source", "positions/s", "positions per CPU s", "vs memmap, same workers"],
            [
                [
                    str(r["workers"]),
                    r["source"],
                    f"{r['positions_per_s']:,.0f}",
                    f"{r['positions_per_cpu_s']:,.0f}" if "positions_per_cpu_s" in r else "",
                    f"{r['positions_per_s'] / memmap[r['workers']]:.2f}"
                    if r["source"] == "logitstore"
                    else "",
                ]
                for r in load
            ],
        ),
        "",
        "## (b) One optimizer step of the student",
        "",
        *md_table(
            ["student", "vocab", "batch", "loss", "step (ms)", "vs CE only"],
            [
                [
                    r["student"],
                    f"{r['vocab']:,}",
                    r["batch"],
                    r["loss"],
                    f"{r['step_s'] * 1e3:.0f}",
                    f"{r['ratio_vs_ce']:.2f}",
                ]
                for r in steps
            ],
        ),
    ]
    write_results(
        out, "Read path", run_meta("bench_read.py", argv), {"loading": load, "step": steps}, body
    )
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, source in enumerate(("logitstore", "memmap")):
        xs = [r["workers"] + (i - 0.5) * 0.35 for r in load if r["source"] == source]
        ys = [r["positions_per_s"] for r in load if r["source"] == source]
        ax.bar(xs, ys, 0.35, label="LogitDataset (store)" if i == 0 else "np.memmap, decoded")
    ax.axhline(1e6, color="k", ls=":", lw=1, label="1M positions/s")
    ax.set_xticks([0, 1, 2], ["0 workers", "1 worker", "2 workers"])
    ax.set_ylabel("positions / s")
    ax.set_title("Loading top-64 u8 windows (2 cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--batch", type=int, default=16, help="windows per batch")
    p.add_argument("--block", type=int, default=1 << 16, help="LogitDataset block_positions")
    p.add_argument("--limit", type=int, default=1 << 21, help="positions timed per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-embd", type=int, default=256)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--tmp", type=Path, default=None, help="scratch directory")
    p.add_argument("--store", type=Path, help="read this top-64 store instead of building one")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json/.png; default benchmarks/results/read, with --quick "
        "out/benchmarks-quick/results/read)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.positions = args.limit = 1 << 18
        args.sample_positions, args.repeats, args.student_layers = 1 << 13, 1, 1
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "read"
    one_thread_if_quick(args.quick)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = args.store or build_store(args, Path(tmp))
        write_raw(store, Path(tmp) / "raw")
        load = bench_loading(args, store, Path(tmp) / "raw")
        steps = bench_step(args, store)
    write_outputs(args.out, load, steps, argv)
    print(f"wrote {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
