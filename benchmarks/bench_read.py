"""Read-path benchmark: how fast stored rows become training batches, beside the same-run
baselines that say what the speed is worth.

(a) A top-64 u8 store of real teacher rows (the shipped teacher on held-out stdlib text,
    tiled to ``--positions``) is read through ``LogitDataset`` + ``collate`` in a real
    ``DataLoader`` with 0 and 2 workers, four ways over the same windows in the same order:
    today's decoder (numba's compiled kernel where the ``fast`` extra is installed, else
    NumPy's); NumPy's decoder (``LOGITSTORE_DECODER=numpy``: what a plain install runs); the
    previous decoder (the same Dataset, its blocks decoded by the decoder this project
    shipped before, kept callable below as ``previous_decode_rows``); and raw ``np.memmap``
    files of the already-decoded arrays (the baseline: what is left is decompression,
    checksums and decoding).
(b) The client side of the compressed stream (PROTOCOL.md §2.1) without a network: the
    store's chunks framed as a server sends them, one stream per ``--block`` positions (what
    a remote LogitDataset requests), each parsed by its own ``ChunkParser`` and decoded, with
    today's decoder, NumPy's and the previous one; ``LogitStore.read`` of a local store
    (straight from the shards, decoding as it reads) with today's decoder and NumPy's; and
    the same blocks read through zarr's own reader and decoded (how ``LogitStore.read`` read
    before), for scale.
(c) One optimizer step of a small GPT-2 student on a batch from the store: cross-entropy
    alone, the fused ``losses.distillation_loss`` (CE + forward KL from one log-softmax), and
    the two unfused losses added up.

Every rate is given per wall-clock second and per CPU-second of the measuring process (its
threads, and its DataLoader workers): on a machine other work shares, the CPU-second figure
is what the work costs.

    python benchmarks/bench_read.py            # default: a few minutes on 2 cores
    python benchmarks/bench_read.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
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
from logitstore import Batch, LogitDataset, StoreMetadata, collate, losses
from logitstore.format import fused
from logitstore.format.chunks import (
    ChunkParser,
    ShardFiles,
    chunk_bytes,
    chunk_layout,
    chunk_plan,
    encode_chunk,
    encode_chunks_header,
    read_chunked,
)
from logitstore.format.codec import decode_rows, sqrt_table
from logitstore.format.metadata import SQRT_BINS
from logitstore.format.protocol import encode_end
from logitstore.format.schema import StoredRows, columns, rows_from_columns

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


# -- the previous decoder, kept callable to time beside today's ------------------------------


# the √-bin tables are the spec's (FORMAT.md §5.2), unchanged by the new decoder
_PREVIOUS_TABLES = {kind: sqrt_table(bins) for kind, bins in SQRT_BINS.items()}


def previous_decode_rows(md: StoreMetadata, rows: StoredRows, id_dtype: type = np.int64) -> Batch:
    """The decoder this project shipped before the one-pass decoder (format/codec.py at
    commit cf249ca), for top-k rows: whole-block passes (gaps' running sum, a padding mask,
    the table lookup, the row sum, the rescale), each into a fresh array. Same bits."""
    n = len(rows.input_ids)
    assert rows.gaps is not None and rows.residual is not None
    residual = rows.residual
    mask = rows.loss_mask.astype(bool) if rows.loss_mask is not None else np.ones(n, dtype=bool)
    input_ids = rows.input_ids.astype(np.int64)
    probs: np.ndarray = np.take(_PREVIOUS_TABLES[md.encoding.values], rows.values)
    ids: np.ndarray = np.empty(rows.gaps.shape, dtype=id_dtype)  # (n, m)
    np.add.accumulate(rows.gaps, axis=1, dtype=id_dtype, out=ids)
    top = int(ids[:, -1].max()) if ids.size else 0
    if top >= md.vocab_size:
        raise logitstore.CorruptStoreError(f"decoded token ids reach {top}")
    pad = rows.gaps == 0
    pad[:, 0] = False
    ids[:, 1:] *= ~pad[:, 1:]
    total = probs.sum(axis=1, dtype=np.float32)  # (n,)
    empty = total <= 0
    total[empty] = 1
    scale = np.divide(1.0 - residual, total, dtype=np.float32)
    scale[empty] = 0
    probs *= scale[:, None]
    return Batch(input_ids, ids, probs, residual, mask)


class PreviousDecoder(LogitDataset):
    """The same Dataset, its blocks read from the shards and decoded the previous way."""

    def _read_block(self, start: int, stop: int, alloc: Any = np.empty) -> Batch:
        layout = chunk_layout(Path(self.path), self.metadata)
        assert layout is not None
        rows = read_chunked(Path(self.path), self.metadata, layout, start, stop)
        return previous_decode_rows(self.metadata, rows, np.int32)


class MemmapWindows(LogitDataset):
    """The baseline: identical windows, order and sample code, read from raw memmaps of the
    decoded arrays instead of the store."""

    def __init__(self, store: Path, raw: Path, seq_len: int, **kw: Any) -> None:
        super().__init__(store, seq_len, **kw)
        self.raw = raw

    def _read_block(self, start: int, stop: int, alloc: Any = np.empty) -> Batch:
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


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children that have exited."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# -- (a) the Dataset -----------------------------------------------------------------------------


def loader_rate(ds: LogitDataset, workers: int, batch: int, limit: int) -> tuple[float, float]:
    """Positions per wall second and per CPU-second through a real DataLoader over up to
    ``limit`` positions, timed from the first request: worker start-up and the first blocks'
    reads are included, as they are in every epoch of a real run. The CPU time is this
    process's (main and read-ahead threads) plus its workers', which exit before it is read."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    gc.collect()
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    batches = iter(loader)
    for b in batches:
        n += int(b["attention_mask"].sum())
        if n >= limit:
            break
    wall = time.perf_counter() - t0
    del batches, b  # the workers exit (and are waited for) here
    gc.collect()
    return n / wall, n / (cpu_seconds() - c0)


SOURCES = ("logitstore", "NumPy decoder", "previous decoder", "memmap")


@contextlib.contextmanager
def _setting(numpy_only: bool) -> Iterator[None]:
    """``LOGITSTORE_DECODER=numpy`` inside the block when ``numpy_only`` (DataLoader workers
    forked there inherit it), the setting as it was after."""
    before = os.environ.get(fused.DECODER_ENV)
    if numpy_only:
        os.environ[fused.DECODER_ENV] = "numpy"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(fused.DECODER_ENV, None)
        else:
            os.environ[fused.DECODER_ENV] = before


def bench_loading(args: argparse.Namespace, store: Path, raw: Path) -> list[dict[str, Any]]:
    rows = []
    for workers in (0, 2):
        rates: dict[str, list[tuple[float, float]]] = {s: [] for s in SOURCES}
        for rep in range(args.repeats):
            for source in SOURCES:  # interleaved: each repeat sees the machine alike
                kw = {"seed": rep, "block_positions": args.block}
                ds = (
                    LogitDataset(store, args.seq_len, **kw)
                    if source in ("logitstore", "NumPy decoder")
                    else PreviousDecoder(store, args.seq_len, **kw)
                    if source == "previous decoder"
                    else MemmapWindows(store, raw, args.seq_len, **kw)
                )
                with _setting(source == "NumPy decoder"):
                    rates[source].append(loader_rate(ds, workers, args.batch, args.limit))
        for source in SOURCES:
            wall = statistics.median(r[0] for r in rates[source])
            cpu = statistics.median(r[1] for r in rates[source])
            rows.append(
                {
                    "workers": workers,
                    "source": source,
                    "positions_per_s": wall,
                    "positions_per_cpu_s": cpu,
                }
            )
            print(
                f"[load] workers={workers} {source}: {wall:,.0f} pos/s, {cpu:,.0f} pos/CPU-s",
                file=sys.stderr,
            )
    return rows


# -- (b) the client of the compressed stream -----------------------------------------------------


def stream_bytes(store: Path, start: int, stop: int) -> bytes:
    """Positions ``[start, stop)`` as a server's compressed stream carries them."""
    md = logitstore.open(store).metadata
    layout = chunk_layout(store, md)
    assert layout is not None
    wire = [{"name": c.name, "rows": c.rows, "codec": c.codec} for c in layout]
    parts = [encode_chunks_header(md, start, stop, wire)]
    with ShardFiles() as files:  # (the descriptors were left open before)
        for first, i, k in chunk_plan(layout, start, stop):
            data = chunk_bytes(store, layout[i], k, files)
            parts += encode_chunk(i, first, layout[i].rows, data)
    parts.append(encode_end(stop, stop - start))
    return b"".join(parts)


def client_rate(
    streams: list[tuple[int, int, bytes]], md: StoreMetadata, decode: Callable[..., Batch]
) -> tuple[float, float]:
    """Decoded positions per wall and CPU second: parse each ``(start, stop, stream)``
    (copied out of memory as a socket read copies it) with its own parser, as RemoteStore
    reads one block, and decode every run the parser hands over."""
    t0, c0 = time.perf_counter(), time.process_time()
    got = 0
    for a, b, stream in streams:
        buf = io.BytesIO(stream)
        for _, rows in ChunkParser(buf.read, md, a, b).rows():
            got += len(decode(md, rows, np.int32).input_ids)
    n = streams[-1][1] - streams[0][0]
    assert got == n
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def bench_client(args: argparse.Namespace, store: Path) -> list[dict[str, Any]]:
    s = logitstore.open(store)
    md, n = s.metadata, min(len(s), args.limit)
    # One stream per LogitDataset block, as a remote Dataset requests them.
    streams = [
        (a, min(a + args.block, n), stream_bytes(store, a, min(a + args.block, n)))
        for a in range(0, n, args.block)
    ]
    stream_nbytes = sum(len(x[2]) for x in streams)
    decoders: dict[str, Callable[..., Batch]] = {
        "ChunkParser + decode_rows (today)": decode_rows,
        "ChunkParser + decode_rows (NumPy decoder)": decode_rows,
        "ChunkParser + previous decoder": previous_decode_rows,
    }
    group = zarr.open_group(str(store), mode="r")
    arrays = {c.name: group[c.name] for c in columns(md)}

    def zarr_read(a: int, b: int) -> Batch:
        got = {name: np.asarray(arr[a:b]) for name, arr in arrays.items()}
        return decode_rows(md, rows_from_columns(md, got, b - a), np.int32)

    def local_read(a: int, b: int) -> Batch:
        return s.read(a, b, id_dtype=np.int32)

    readers = {
        "LogitStore.read (local shards, blocks)": local_read,
        "LogitStore.read (local shards, blocks, NumPy decoder)": local_read,
        "zarr's reader + decode_rows (blocks)": zarr_read,
    }
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in [*decoders, *readers]}
    for _ in range(args.repeats):
        for name, decode in decoders.items():
            with _setting("NumPy" in name):
                rates[name].append(client_rate(streams, md, decode))
        for name, read in readers.items():
            with _setting("NumPy" in name):
                t0, c0 = time.perf_counter(), time.process_time()
                for a in range(0, n, args.block):
                    read(a, min(a + args.block, n))
                rate = (n / (time.perf_counter() - t0), n / (time.process_time() - c0))
            rates[name].append(rate)
    out = []
    for label, r in rates.items():
        out.append(
            {
                "path": label,
                "positions_per_s": statistics.median(x[0] for x in r),
                "positions_per_cpu_s": statistics.median(x[1] for x in r),
                "stream_bytes_per_position": stream_nbytes / n,
            }
        )
        print(
            f"[client] {label}: {out[-1]['positions_per_s']:,.0f} pos/s, "
            f"{out[-1]['positions_per_cpu_s']:,.0f} pos/CPU-s",
            file=sys.stderr,
        )
    return out


# -- (c) the training step -----------------------------------------------------------------------

LOSSES = ("CE only", "fused distillation_loss (CE + forward KL)", "CE + forward_kl, unfused")


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
    b = batch

    def step(kind: str) -> None:
        logits = model(input_ids=b["input_ids"]).logits  # (B, T, V)
        if kind == LOSSES[0]:
            loss = losses.cross_entropy(logits, b["labels"])
        elif kind == LOSSES[1]:
            loss = losses.distillation_loss(
                logits, b["labels"], b["ids"], b["probs"], b["residual"], b["loss_mask"]
            )
        else:
            loss = 0.5 * losses.cross_entropy(logits, b["labels"]) + 0.5 * losses.forward_kl(
                logits, b["ids"], b["probs"], b["residual"], b["loss_mask"]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in LOSSES}
    for kind in LOSSES:
        step(kind)  # warm-up
    for _ in range(args.repeats * 2):
        for kind in LOSSES:  # interleaved
            t0, c0 = time.perf_counter(), time.process_time()
            step(kind)
            times[kind].append((time.perf_counter() - t0, time.process_time() - c0))
    out = []
    for kind in LOSSES:
        out.append(
            {
                "loss": kind,
                "step_s": statistics.median(t[0] for t in times[kind]),
                "step_cpu_s": statistics.median(t[1] for t in times[kind]),
                "student": f"GPT-2 {args.student_layers}x{args.student_embd}",
                "vocab": vocab,
                "batch": f"{args.step_batch}x{args.seq_len}",
            }
        )
    for r in out:
        r["ratio_vs_ce"] = r["step_s"] / out[0]["step_s"]
        r["cpu_ratio_vs_ce"] = r["step_cpu_s"] / out[0]["step_cpu_s"]
        print(
            f"[step] {r['loss']}: {r['step_s'] * 1e3:.0f} ms ({r['ratio_vs_ce']:.2f}x), "
            f"{r['step_cpu_s'] * 1e3:.0f} CPU ms ({r['cpu_ratio_vs_ce']:.2f}x)",
            file=sys.stderr,
        )
    return out


# -- results -------------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    load: list[dict[str, Any]],
    client: list[dict[str, Any]],
    steps: list[dict[str, Any]],
    argv: list[str],
) -> None:
    base = {
        (r["workers"], k): r[k]
        for r in load
        if r["source"] == "memmap"
        for k in ("positions_per_s", "positions_per_cpu_s")
    }
    prev = {
        (r["workers"], k): r[k]
        for r in load
        if r["source"] == "previous decoder"
        for k in ("positions_per_s", "positions_per_cpu_s")
    }
    plain = {
        (r["workers"], k): r[k]
        for r in load
        if r["source"] == "NumPy decoder"
        for k in ("positions_per_s", "positions_per_cpu_s")
    }

    def ratio(r: dict[str, Any], to: dict[tuple[int, str], float], key: str) -> str:
        return "" if r["source"] == "memmap" else f"{r[key] / to[(r['workers'], key)]:.2f}"

    body = [
        "## (a) LogitDataset + collate through a DataLoader (top-64 u8, windows of "
        f"{steps[0]['batch'].split('x')[1]} positions, batches of {_BATCH[0]})",
        "",
        *md_table(
            [
                "workers",
                "source",
                "positions/s",
                "positions per CPU s",
                "per CPU s vs previous decoder",
                "per CPU s vs NumPy decoder",
                "per CPU s vs memmap",
                "wall vs memmap",
            ],
            [
                [
                    str(r["workers"]),
                    r["source"],
                    f"{r['positions_per_s']:,.0f}",
                    f"{r['positions_per_cpu_s']:,.0f}",
                    ratio(r, prev, "positions_per_cpu_s")
                    if r["source"] in ("logitstore", "NumPy decoder")
                    else "",
                    ratio(r, plain, "positions_per_cpu_s") if r["source"] == "logitstore" else "",
                    ratio(r, base, "positions_per_cpu_s"),
                    ratio(r, base, "positions_per_s"),
                ]
                for r in load
            ],
        ),
        "",
        "## (b) The compressed stream's client: stored chunks parsed and decoded (no network)",
        "",
        "One stream per block of `--block` positions, as a remote LogitDataset requests them, "
        "each parsed by its own ChunkParser (which decodes the chunks into that block's "
        "arrays) and decoded; for scale, `LogitStore.read` of the same blocks from the local "
        "store (straight from its shards, decoding each inner chunk as it is read) and the "
        "same blocks read through zarr's own reader and decoded (how `LogitStore.read` read "
        "until 2026-12-03).",
        "",
        *md_table(
            ["path", "positions/s", "positions per CPU s", "stream B/position"],
            [
                [
                    r["path"],
                    f"{r['positions_per_s']:,.0f}",
                    f"{r['positions_per_cpu_s']:,.0f}",
                    f"{r['stream_bytes_per_position']:.1f}" if "ChunkParser" in r["path"] else "",
                ]
                for r in client
            ],
        ),
        "",
        f"Today's decoder in this run: **{_DECODER[0]}** (`{fused.DECODER_ENV}` unset). "
        "NumPy's decoder needs nothing beyond the base install; numba's compiled kernel is "
        "the `fast` extra (`pip install 'logitstore[fast]'`: numba and llvmlite, ~210 MB on "
        "disk; a one-off compile of ~1.5 s per machine, cached, then ~0.4-0.7 s per process "
        "to import numba and load the kernel, outside these timings as outside a training "
        "step). Load average during the run (1 min, at its start and end): "
        f"{_LOAD[0]:.1f} and {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: wall-clock "
        "rates are a share of the cores; the rates per CPU-second are what the work costs, "
        "and the positions/s targets are judged on them when the machine is loaded.",
        "",
        "## (c) One optimizer step of the student",
        "",
        *md_table(
            ["student", "vocab", "batch", "loss", "step (ms)", "vs CE", "CPU ms", "CPU vs CE"],
            [
                [
                    r["student"],
                    f"{r['vocab']:,}",
                    r["batch"],
                    r["loss"],
                    f"{r['step_s'] * 1e3:.0f}",
                    f"{r['ratio_vs_ce']:.2f}",
                    f"{r['step_cpu_s'] * 1e3:.0f}",
                    f"{r['cpu_ratio_vs_ce']:.2f}",
                ]
                for r in steps
            ],
        ),
    ]
    write_results(
        out,
        "Read path",
        run_meta("bench_read.py", argv),
        {"loading": load, "client": client, "step": steps},
        body,
    )
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in (
        (axes[0], "positions_per_s", "per wall second"),
        (axes[1], "positions_per_cpu_s", "per CPU second"),
    ):
        for i, source in enumerate(SOURCES):
            xs = [r["workers"] / 2 + (i - 1.5) * 0.2 for r in load if r["source"] == source]
            ys = [r[key] for r in load if r["source"] == source]
            ax.bar(xs, ys, 0.2, label=source)
        ax.axhline(1e6, color="k", ls=":", lw=1, label="1M positions/s")
        ax.set_xticks([0, 1], ["0 workers", "2 workers"])
        ax.set_title(f"LogitDataset, top-64 u8: {title}", fontsize=9)
    axes[0].set_ylabel("positions")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


_BATCH = [16]
_DECODER = ["numpy"]
_LOAD = [os.getloadavg()[0]]  # at the start of the run


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
        args.positions = args.limit = args.block = 1 << 16
        args.sample_positions, args.repeats, args.student_layers = 1 << 12, 1, 1
        args.step_batch = 2
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "read"
    _BATCH[0] = args.batch
    _DECODER[0] = fused.decoder()
    one_thread_if_quick(args.quick)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = args.store or build_store(args, Path(tmp))
        write_raw(store, Path(tmp) / "raw")  # also loads the decoder (int32 ids) before the clock
        load = bench_loading(args, store, Path(tmp) / "raw")
        client = bench_client(args, store)
        steps = bench_step(args, store)
    write_outputs(args.out, load, client, steps, argv)
    print(f"wrote {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
