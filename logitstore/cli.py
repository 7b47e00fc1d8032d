"""The ``logitstore`` command: write, info, verify, show."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LogitStoreError
from .info import store_info

__all__ = ["main"]

_EPILOG = "Format: docs/FORMAT.md. Every command exits 0 on success, 1 on a fault, 2 on bad input."


def _write(args: argparse.Namespace) -> int:
    from .capture import capture, load_teacher, resolve_device
    from .data import read_documents, tokenize
    from .metadata import Encoding, Layout
    from .writer import check_target

    encoding = Encoding(
        args.encoding, args.values, temperature=args.temperature, k=args.k, samples=args.samples
    )
    device = resolve_device(args.device)
    if args.seq_len is not None and args.seq_len < 2:
        raise LogitStoreError(f"--seq-len must be at least 2, got {args.seq_len}")
    Layout.choose(encoding, 65536, args.chunk_positions, args.shard_positions)  # sizes valid?
    check_target(args.out, args.overwrite)  # before the teacher is loaded
    documents = read_documents(args.data)
    teacher = load_teacher(args.teacher, device, args.dtype)
    encoding.check_vocab(teacher.vocab_size)
    seq_len = args.seq_len or teacher.max_length
    sequences = tokenize(documents, teacher.tokenizer, seq_len)
    print(
        f"{len(documents)} document(s) → {len(sequences)} sequence(s), "
        f"{len(sequences.input_ids)} positions; teacher {teacher.name} on {device}",
        file=sys.stderr,
    )
    out = capture(
        teacher,
        sequences,
        args.out,
        encoding,
        batch_size=args.batch_size,
        seed=args.seed,
        seq_len=seq_len,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        shard_positions=args.shard_positions,
        chunk_positions=args.chunk_positions,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .reader import open as open_store

    info = store_info(open_store(args.store, allow_incomplete=True))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    enc = info["encoding"]
    what = {"topk": f"top-{enc['k']}", "sampled": f"sampled n={enc['samples']}", "full": "full"}
    rows = [
        ("store", info["path"]),
        (
            "state",
            f"{info['state']} ({info['shards']['committed']}/{info['shards']['total']} shards)",
        ),
        ("format", f"logitstore {info['format_version']}"),
        (
            "encoding",
            f"{what[enc['kind']]}, values {enc['values']}, temperature {enc['temperature']}",
        ),
        (
            "teacher",
            f"{info['teacher'].get('name')} (revision {info['teacher'].get('revision')}, "
            f"{info['teacher'].get('dtype')})",
        ),
        (
            "tokenizer",
            "-"
            if not info["tokenizer"]
            else f"{info['tokenizer']['name']} ({info['tokenizer']['vocab_hash'][:19]}…)",
        ),
        ("vocab size", f"{info['vocab_size']:,}"),
        (
            "positions",
            f"{info['num_positions']:,} in {info['num_sequences']:,} sequences"
            f" (seq_len {info['seq_len']})",
        ),
        (
            "on disk",
            f"{info['bytes_on_disk']:,} bytes, {info['bytes_per_position']:.1f} B/position",
        ),
        (
            "vs full bf16",
            f"{info['compression_ratio_vs_full_bf16']:,.1f}x smaller "
            f"({info['full_vocab_bf16_bytes']:,} bytes)",
        ),
        ("created", f"{info['created_at']} by logitstore {info['tool'].get('version')}"),
        ("identity", info["identity"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:>{width}}  {v}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.store, progress=not args.no_progress)
    for f in report.faults:
        print(f"FAULT {f}")
    status = "OK" if report.ok else f"{len(report.faults)} fault(s)"
    checked = f"{report.shards} shard(s), {report.positions:,} positions"
    print(f"{status}: {checked} checked in {args.store}")
    return 0 if report.ok else 1


def _token(tok: Any, i: int) -> str:
    return repr(tok.decode([i])) if tok is not None else f"<{i}>"


def _show(args: argparse.Namespace) -> int:
    from .reader import open as open_store

    store = open_store(args.store, allow_incomplete=True)
    pos = args.position
    seq = store.sequence_of(pos)
    s0, s1 = int(store.offsets[seq]), int(store.offsets[seq + 1])
    lo = max(s0, pos - args.context)
    ctx = store.read(lo, min(pos + 2, s1))
    row = store.read(pos, pos + 1)
    tok = store.tokenizer()

    def text(ids: np.ndarray) -> str:
        if tok is None:
            return " ".join(f"<{i}>" for i in ids)
        return str(tok.decode(ids.tolist()))

    enc = store.encoding
    print(f"{args.store}: position {pos} = sequence {seq}, token {pos - s0} of {s1 - s0}")
    print(
        f"context: {'…' if lo > s0 else ''}{text(ctx.input_ids[: pos - lo])}"
        f"⟦{text(ctx.input_ids[pos - lo : pos - lo + 1])}⟧"
    )
    if pos + 1 < s1:
        actual = int(ctx.input_ids[pos - lo + 1])
        print(f"next token in the data: {_token(tok, actual)} (id {actual})")
    else:
        print("next token in the data: (end of sequence)")
    probs, ids = row.probs[0], row.ids[0]
    order = np.argsort(-probs, kind="stable")[: args.top]
    print(f"teacher's top candidates ({enc.kind}, values {enc.values}, T={enc.temperature}):")
    for rank, j in enumerate(order, 1):
        if probs[j] <= 0:
            break
        bar = "█" * round(float(probs[j]) * 40)
        token = _token(tok, int(ids[j]))
        print(f"  {rank:>3}. {probs[j]:8.4f}  {token:<20} id {int(ids[j]):>6}  {bar}")
    if enc.kind == "topk":
        print(f"  mass outside the {enc.k} stored ids (residual): {float(row.residual[0]):.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import uvicorn

    from .reader import LogitStore

    stores: dict[str, str] = {}
    for path in args.stores:
        store = LogitStore(path)  # refuses incomplete or damaged metadata now, not per request
        name = Path(path).resolve().name
        if name in stores:
            raise LogitStoreError(
                f"two stores are named {name!r} (the directory name is the URL name); rename one"
            )
        stores[name] = str(Path(path).resolve())
        del store
    tokens: list[str] = []
    if args.token_file:
        try:
            tokens = [
                t.strip() for t in Path(args.token_file).read_text().splitlines() if t.strip()
            ]
        except OSError as e:
            raise LogitStoreError(f"cannot read --token-file: {e}") from None
        if not tokens:
            raise LogitStoreError(f"--token-file {args.token_file} holds no token (one per line)")
    config = {
        "stores": stores,
        "tokens": tokens,
        "max_positions": args.max_positions,
        "block_positions": args.block_positions,
    }
    os.environ["LOGITSTORE_SERVER_CONFIG"] = json.dumps(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    for name in stores:
        print(f"serving {stores[name]} at http://{host}:{args.port}/v1/stores/{name}", flush=True)
    uvicorn.run(
        "server.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        loop="auto",
        http="auto",
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="logitstore",
        description="Store a teacher's next-token distributions once; read them for distillation.",
        epilog=_EPILOG,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser(
        "write",
        help="run a teacher over text and write its distributions into a store",
        description="Run a teacher over text and write its distributions into a store. "
        "Interrupted? Run the same command again: it resumes at the first unfinished shard "
        "and the result is byte-identical to an uninterrupted run.",
        epilog=_EPILOG,
    )
    w.add_argument("--teacher", required=True, help="Hugging Face model directory or hub id")
    w.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE",
        help='.txt (one document per file) or .jsonl (one {"text": ...} per line)',
    )
    w.add_argument("--out", required=True, help="store directory to create (or resume)")
    w.add_argument(
        "--encoding",
        choices=["topk", "sampled", "full"],
        default="topk",
        help="topk: k most likely + residual mass (default); sampled: unique ids and "
        "counts of N draws (unbiased); full: whole vocabulary",
    )
    w.add_argument(
        "--k", type=int, default=64, help="candidates per position for topk (default 64)"
    )
    w.add_argument(
        "--samples", type=int, default=64, help="draws per position for sampled (default 64)"
    )
    w.add_argument(
        "--values",
        choices=["fp32", "fp16", "bf16", "u8", "u7", "u6", "u5", "u4"],
        default="u8",
        help="how probabilities are stored (default u8: 255 bins of sqrt(p); u7..u4: 127..15 "
        "bins, smaller and coarser)",
    )
    w.add_argument("--temperature", type=float, default=1.0, help="divide logits by T (default 1)")
    w.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="split documents into sequences of at most N tokens (default: the "
        "teacher's context length)",
    )
    w.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass (default 8)"
    )
    w.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    w.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="teacher weights dtype (default: float32 on cpu, bfloat16 on cuda)",
    )
    w.add_argument("--seed", type=int, default=0, help="seed for sampled draws (default 0)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    w.add_argument(
        "--shard-positions",
        type=int,
        default=None,
        help="positions per shard (unit of commit; default ~64 chunks)",
    )
    w.add_argument(
        "--chunk-positions",
        type=int,
        default=None,
        help="positions per compressed chunk (default ~1 MiB of ids)",
    )
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_write)

    i = sub.add_parser("info", help="settings, sizes and provenance of a store", epilog=_EPILOG)
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    v = sub.add_parser(
        "verify",
        help="read everything and check checksums and invariants",
        description="Read every shard; check checksums, commit records, offsets, id ranges "
        "and probability sums. Exits 1 naming the shard and position of each fault.",
        epilog=_EPILOG,
    )
    v.add_argument("store")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_verify)

    s = sub.add_parser("show", help="what the teacher predicted at a position", epilog=_EPILOG)
    s.add_argument("store")
    s.add_argument("--position", type=int, required=True, help="global token position")
    s.add_argument(
        "--context", type=int, default=24, help="tokens of context to print (default 24)"
    )
    s.add_argument("--top", type=int, default=10, help="candidates to list (default 10)")
    s.set_defaults(func=_show)
    sv = sub.add_parser(
        "serve",
        help="serve stores over HTTP (docs/PROTOCOL.md)",
        description="Serve complete stores over HTTP. Each store's URL (printed at start) is "
        "what `logitstore.open` and LogitDataset take on the client side.",
        epilog=_EPILOG,
    )
    sv.add_argument("stores", nargs="+", metavar="STORE", help="store directories to serve")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    sv.add_argument("--token-file", help="file of bearer tokens, one per line: requests need one")
    sv.add_argument(
        "--max-positions",
        type=int,
        default=1 << 24,
        help="most positions one request may ask for (default 16M; 413 above)",
    )
    sv.add_argument(
        "--block-positions",
        type=int,
        default=1 << 14,
        help="positions per streamed block (default 16384); memory is ~2 blocks per stream",
    )
    sv.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    sv.set_defaults(func=_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LogitStoreError as e:
        print(f"logitstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"logitstore {args.command}: interrupted. Committed shards are kept; run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
