"""Write-path benchmark: the host pipeline beside a raw np.memmap write, and the on-device
encode beside the teacher's forward pass.

(a) Host side. Rows a real teacher produced (the shipped small teacher over held-out stdlib
    text) are encoded once, then handed to ``StoreWriter`` in teacher-sized batches, tiled
    to ``--positions``: what is timed is device→host copy, validation, shard assembly,
    compression, checksums and commits. The baseline writes the same uncompressed bytes
    into an ``np.memmap`` in the same run. Also reported: bytes/position on disk.
(b) Device side. ``encode_rows`` (log-softmax, temperature, top-k or sampling, quantise)
    on logits of a GPT-2-shaped model at a realistic vocabulary, as a fraction of that
    model's forward pass, on CPU (and CUDA when present).
(c) Codec layouts. Top-64 u8 rows of the benchmark teachers (benchmarks/.cache; --quick
    trains a tiny one) stored with the codec chains of format 1.1 and of 1.2 in the same
    run: bytes/entry against the 1.15 target and the order-0 entropy floor, added KL (0:
    asserted lossless), and the encode rate, wall and per CPU-second, against 500k
    positions/s; then the candidate codecs that were weighed (benchlib/codec_layouts.py).

    python benchmarks/bench_write.py            # default: ~3 minutes on 2 cores
    python benchmarks/bench_write.py --quick    # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib.codec_layouts import (
    candidates,
    codec_body,
    codec_plot,
    codec_teachers,
    measure_layouts,
    teacher_rows,
    teacher_vocab,
)
from benchlib.models import gpt2
from benchlib.report import (
    md_table,
    one_thread_if_quick,
    pyplot,
    results_dir,
    run_meta,
    write_results,
)
from benchlib.stores import (
    SHIPPED_TEACHER,
    held_out_logits,
    spread_rows,
    teacher_bytes,
    tile_rows,
)

import logitstore
from logitstore import EncodedRows, Encoding, encode_rows

HOST_CONFIGS: dict[str, Encoding] = {
    "topk-64 u8": Encoding("topk", "u8", k=64),
    "topk-64 fp16": Encoding("topk", "fp16", k=64),
    "topk-8 u8": Encoding("topk", "u8", k=8),
    "sampled-64": Encoding("sampled", "count", samples=64),
    "full fp16": Encoding("full", "fp16"),
}
#: host configs also measured with the ids spread over larger vocabularies
SPREAD_CONFIGS = ("topk-64 u8", "sampled-64")
DEVICE_CONFIGS: dict[str, Encoding] = {
    "topk-64 u8": Encoding("topk", "u8", k=64),
    "sampled-64": Encoding("sampled", "count", samples=64),
    "full bf16": Encoding("full", "bf16"),
}


def median_time(
    fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None
) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- (a) host side ------------------------------------------------------------------------


def host_write(
    rows: EncodedRows, enc: Encoding, vocab: int, n: int, batch: int, root: Path, fsync: bool = True
) -> dict[str, Any]:
    """Time one store write of ``n`` positions from pre-encoded ``rows`` (``fsync``: each
    commit forced to disk, the writer's default)."""
    seqs = logitstore.sequences_from_token_ids([np.zeros(n, dtype=np.int64)], 4096)
    batches = [tile_rows(rows, s, min(batch, n - s)) for s in range(0, n, batch)]
    path = root / "store"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    writer = logitstore.StoreWriter(
        path,
        encoding=enc,
        vocab_size=vocab,
        input_ids=seqs.input_ids,
        offsets=seqs.offsets,
        fsync=fsync,
    )
    t1 = time.perf_counter()
    with writer:
        for i, b in enumerate(batches):
            writer.write(i * batch, b)
    t2 = time.perf_counter()
    per_position = teacher_bytes(path, metadata=False)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "create_s": t1 - t0,
        "stream_s": t2 - t1,
        "teacher_bytes": per_position,
        "store_bytes": total,
    }


def memmap_write(rows: EncodedRows, n: int, batch: int, root: Path) -> float:
    """The baseline: the same uncompressed bytes copied into an np.memmap, then flushed."""
    host = [t.numpy() for t in (rows.gaps, rows.values, rows.residual) if t is not None]
    row_bytes = sum(a[0].nbytes for a in host)
    path = root / "raw.bin"
    t0 = time.perf_counter()
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, row_bytes))
    size = len(host[0])
    for s in range(0, n, batch):
        idx = np.arange(s, min(s + batch, n)) % size
        col = 0
        for a in host:
            w = a[0].nbytes
            mm[s : s + len(idx), col : col + w] = a[idx].view(np.uint8).reshape(len(idx), w)
            col += w
    mm.flush()
    del mm
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def _host_cases(
    logits: torch.Tensor, vocabs: list[int], spread_positions: int
) -> Iterator[tuple[str, Encoding, int, EncodedRows]]:
    """(config, encoding, vocabulary, rows): every host config at the teacher's own
    vocabulary, then the top-k and sampled configs with the ids spread over each larger
    vocabulary (``spread_rows``; a full row there is 2·V bytes and is left out)."""
    teacher_vocab = logits.shape[1]
    for name, enc in HOST_CONFIGS.items():
        yield name, enc, teacher_vocab, encode_rows(logits, enc, 0, torch.arange(len(logits)))
    for vocab in vocabs:
        if vocab <= teacher_vocab:
            continue
        for name in SPREAD_CONFIGS:
            enc = HOST_CONFIGS[name]
            print(f"[host] encoding {name} at V={vocab:,}", file=sys.stderr)
            yield name, enc, vocab, spread_rows(logits[:spread_positions], enc, vocab)


def bench_host(args: argparse.Namespace) -> list[dict[str, Any]]:
    logits = held_out_logits(args.teacher, args.sample_positions)
    print(f"[host] {len(logits)} real positions, V={logits.shape[1]}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        for name, enc, vocab, rows in _host_cases(logits, args.host_vocabs, args.spread_positions):
            n = args.positions if enc.kind != "full" else min(args.positions, args.full_positions)
            raw_row = sum(
                t[0].numel() * t.element_size()
                for t in (rows.gaps, rows.values, rows.residual)
                if t is not None
            )
            host_write(rows, enc, vocab, min(n, 65536), args.batch, root)  # warm-up
            runs = [host_write(rows, enc, vocab, n, args.batch, root) for _ in range(args.repeats)]
            stream = statistics.median(r["stream_s"] for r in runs)
            no_fsync = statistics.median(
                host_write(rows, enc, vocab, n, args.batch, root, fsync=False)["stream_s"]
                for _ in range(args.repeats)
            )
            base = statistics.median(
                memmap_write(rows, n, args.batch, root) for _ in range(args.repeats)
            )
            r = runs[0]
            results.append(
                {
                    "config": name,
                    "encoding": enc.kind,
                    "k": enc.k,
                    "samples": enc.samples,
                    "values": enc.values,
                    "vocab": vocab,
                    "positions": n,
                    "positions_per_s": n / stream,
                    "raw_mb_per_s": n * raw_row / stream / 1e6,
                    "memmap_positions_per_s": n / base,
                    "ratio_vs_memmap": base / stream,
                    "positions_per_s_no_fsync": n / no_fsync,
                    "fsync_cost": stream / no_fsync,
                    "create_s": statistics.median(x["create_s"] for x in runs),
                    "raw_bytes_per_position": raw_row,
                    "teacher_bytes_per_position": r["teacher_bytes"] / n,
                    "store_bytes_per_position": r["store_bytes"] / n,
                    "full_bf16_bytes_per_position": 2 * vocab,
                }
            )
            print(
                f"[host] {name} V={vocab:,}: {n / stream:,.0f} pos/s "
                f"({base / stream:.2f}x memmap), {r['teacher_bytes'] / n:.1f} B/pos",
                file=sys.stderr,
            )
    return results


# -- (b) device side ------------------------------------------------------------------------


def _device_rows(
    model: Any, vocab: int, args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.randint(0, vocab, (1, args.tokens), device=device)
    forward = median_time(lambda: model(ids), args.repeats, sync)
    # A random model's logits are nearly flat; rescale them to a trained model's spread
    # (std 4: entropy of a few nats). Far wider spreads push exp() into float32 denormals,
    # which real teachers rarely reach and which are slow on CPUs.
    raw = model(ids).logits[0].float()  # (T, V)
    logits = ((raw - raw.mean()) * (4 / raw.std())).to(
        raw.dtype if device.type == "cpu" else torch.bfloat16
    )
    p = torch.softmax(logits.float(), -1)
    entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())
    positions = torch.arange(args.tokens, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for config, enc in DEVICE_CONFIGS.items():

        def run(e: Encoding = enc) -> EncodedRows:
            return encode_rows(logits, e, 0, positions)

        run()  # warm-up
        t = median_time(run, args.repeats, sync)
        rows.append(
            {
                "device": str(device),
                "device_name": name,
                "vocab": vocab,
                "config": config,
                "tokens": args.tokens,
                "model": f"GPT-2 {args.layers}x{args.embd}",
                "entropy_nats": entropy,
                "forward_s": forward,
                "encode_s": t,
                "encode_us_per_position": t / args.tokens * 1e6,
                "fraction_of_forward": t / forward,
            }
        )
        print(
            f"[device {device}] V={vocab} {config}: {t / args.tokens * 1e6:.1f} us/pos, "
            f"{t / forward:.1%} of forward",
            file=sys.stderr,
        )
    return rows


def bench_device(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    results = []
    for vocab in args.vocabs:
        model = gpt2(
            vocab,
            n_positions=args.tokens,
            n_layer=args.layers,
            n_embd=args.embd,
            n_head=args.embd // 64,
            seed=0,
        )
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(device, dtype).eval()
        with torch.inference_mode():
            results += _device_rows(model, vocab, args, device)
    return results


# -- (c) codec layouts ------------------------------------------------------------------------


def bench_codecs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    layouts: list[dict[str, Any]] = []
    weighed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        for teacher_dir in codec_teachers(args.quick, args.codec_teachers):
            rows, entropy = teacher_rows(teacher_dir, args.codec_positions)
            vocab = teacher_vocab(teacher_dir)
            label = f"{teacher_dir.name} (entropy {entropy:.2f} nats)"
            print(f"[codecs] {label}: {len(rows['values'])} positions", file=sys.stderr)
            for r in measure_layouts(label, rows, vocab, args.repeats, root):
                layouts.append({**r, "entropy_nats": entropy, "teacher_dir": str(teacher_dir)})
            weighed += candidates(label, rows, vocab)
    return layouts, weighed


# -- output ----------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    host: list[dict[str, Any]],
    device: list[dict[str, Any]],
    argv: list[str],
    codecs: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], []),
) -> None:
    host_md = [
        "## (a) Host side: pre-encoded rows → committed store, beside np.memmap of the same bytes",
        "",
        *md_table(
            [
                "config",
                "vocab",
                "positions",
                "store pos/s",
                "raw MB/s",
                "memmap pos/s",
                "store/memmap",
                "fsync time ×",
                "B/pos on disk",
                "raw B/pos",
                "full bf16 B/pos",
            ],
            [
                [
                    r["config"],
                    f"{r['vocab']:,}",
                    f"{r['positions']:,}",
                    f"{r['positions_per_s']:,.0f}",
                    f"{r['raw_mb_per_s']:.0f}",
                    f"{r['memmap_positions_per_s']:,.0f}",
                    f"{r['ratio_vs_memmap']:.2f}",
                    f"{r['fsync_cost']:.2f}",
                    f"{r['teacher_bytes_per_position']:.1f}",
                    str(r["raw_bytes_per_position"]),
                    f"{r['full_bf16_bytes_per_position']:,}",
                ]
                for r in host
            ],
        ),
        "",
        "Rows come from the shipped teacher (V = 4096) on held-out stdlib text, tiled. At "
        "larger vocabularies the same distributions have their ids spread over the whole "
        "vocabulary (benchlib.stores.spread_rows): what changes is the id gaps and, past "
        "65,536, uint32 ids.",
        "B/pos on disk counts the ids, values and residual arrays (input ids add 1–2 B).",
        "Store writes fsync each shard file, its commit record and the completed metadata "
        '(the default); "fsync time ×" is that write\'s median time over the same write '
        "with fsync=False (`--no-fsync`), measured in the same run.",
    ]
    device_md = [
        "## (b) Device side: encode_rows beside the teacher's forward pass",
        "",
        *md_table(
            [
                "device",
                "model",
                "vocab",
                "config",
                "entropy (nats)",
                "forward s",
                "encode s",
                "µs/position",
                "fraction of forward",
            ],
            [
                [
                    r["device"],
                    f"{r['model']}, {r['tokens']} tokens",
                    f"{r['vocab']:,}",
                    r["config"],
                    f"{r['entropy_nats']:.1f}",
                    f"{r['forward_s']:.3f}",
                    f"{r['encode_s']:.4f}",
                    f"{r['encode_us_per_position']:.1f}",
                    f"{r['fraction_of_forward']:.1%}",
                ]
                for r in device
            ],
        ),
    ]
    body = [
        *(host_md if host else []),
        *(["", *device_md] if device else []),
        *codec_body(*codecs),
    ]
    data = {"host": host, "device": device, "codecs": codecs[0], "codec_candidates": codecs[1]}
    write_results(out, "Write path", run_meta("bench_write.py", argv), data, body)
    plt = pyplot()
    if plt is None:
        return
    layouts = codecs[0]
    panels = [x for x in (bool(host), bool(layouts)) if x]
    if not panels:
        return
    heights = [1.2 + 0.45 * len(host)] * bool(host) + [1.6 + 0.35 * len(layouts)] * bool(layouts)
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(8, sum(heights)), height_ratios=heights, squeeze=False
    )
    if host:
        _host_plot(axes[0][0], host)
    if layouts:
        codec_plot(axes[-1][0], layouts)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def _host_plot(ax: Any, host: list[dict[str, Any]]) -> None:
    names = [f"{r['config']}, V={r['vocab']:,}" for r in host]
    y = np.arange(len(names))
    ax.barh(
        y + 0.2,
        [r["positions_per_s"] for r in host],
        0.4,
        label="logitstore (compressed, committed)",
    )
    ax.barh(
        y - 0.2, [r["memmap_positions_per_s"] for r in host], 0.4, label="np.memmap, same raw bytes"
    )
    ax.axvline(500_000, color="k", ls=":", lw=1, label="target 500k pos/s")
    ax.set_yticks(y, names)
    ax.set_xscale("log")
    ax.set_xlabel("positions / s (host side, 2 cores)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Write path, host side")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher",
        type=Path,
        default=SHIPPED_TEACHER,
        help="teacher directory for the real rows (default: the shipped teacher)",
    )
    p.add_argument(
        "--positions", type=int, default=1 << 21, help="positions written per run (default 2M)"
    )
    p.add_argument(
        "--full-positions", type=int, default=1 << 16, help="positions for the full encoding"
    )
    p.add_argument(
        "--sample-positions", type=int, default=1 << 15, help="real teacher positions, tiled"
    )
    p.add_argument(
        "--batch", type=int, default=8192, help="rows per write() call (a teacher batch)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument(
        "--vocabs",
        type=int,
        nargs="+",
        default=[4096, 32768, 131072, 262144],
        help="device-side vocabularies",
    )
    p.add_argument(
        "--host-vocabs",
        type=int,
        nargs="+",
        default=[131072, 262144],
        help="host side: vocabularies past the teacher's to spread its ids over",
    )
    p.add_argument(
        "--spread-positions",
        type=int,
        default=8192,
        help="host side: real positions encoded at each larger vocabulary, tiled",
    )
    p.add_argument("--tokens", type=int, default=512, help="device side: positions per forward")
    p.add_argument("--layers", type=int, default=12, help="device side: model layers")
    p.add_argument("--embd", type=int, default=768, help="device side: model width")
    p.add_argument(
        "--tmp", type=Path, default=None, help="scratch directory (default: system temp)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json/.png; default benchmarks/results/write, with --quick "
        "out/benchmarks-quick/results/write)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes for a smoke run (well under a minute)"
    )
    p.add_argument("--skip-device", action="store_true", help="no device side (b)")
    p.add_argument("--skip-host", action="store_true", help="no host side (a)")
    p.add_argument("--skip-codecs", action="store_true", help="no codec layouts (c)")
    p.add_argument(
        "--codec-teachers",
        type=Path,
        nargs="+",
        default=None,
        help="(c) teacher directories (default: every cached teacher in benchmarks/.cache; "
        "--quick: a tiny one trained in seconds)",
    )
    p.add_argument(
        "--codec-positions",
        type=int,
        default=1 << 16,
        help="(c) held-out positions per teacher (default 65,536)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.full_positions, args.sample_positions = 1 << 17, 1 << 13, 1 << 13
        args.repeats, args.vocabs, args.tokens, args.layers, args.embd = 1, [32768], 128, 2, 256
        args.host_vocabs, args.spread_positions = [131072], 1024
        args.codec_positions = 1 << 13
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "write"
    one_thread_if_quick(args.quick)
    torch.set_grad_enabled(False)
    host = [] if args.skip_host else bench_host(args)
    codecs = ([], []) if args.skip_codecs else bench_codecs(args)
    device: list[dict[str, Any]] = []
    if not args.skip_device:
        device += bench_device(args, torch.device("cpu"))
        if torch.cuda.is_available():
            device += bench_device(args, torch.device("cuda"))
    write_outputs(args.out, host, device, argv, codecs)
    print(f"wrote {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
