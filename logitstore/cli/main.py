"""The ``logitstore`` command: write, generate, export, info, verify, show, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LogitStoreError
from ..tools.info import store_info

if TYPE_CHECKING:  # imported lazily at run time: `logitstore --help` stays fast
    from ..format.metadata import Encoding

__all__ = ["main"]

_EPILOG = "Format: docs/FORMAT.md. Every command exits 0 on success, 1 on a fault, 2 on bad input."


def _checked_encoding(args: argparse.Namespace, kind: str, temperature: float) -> Encoding:
    """The Encoding that --k/--samples/--values describe for ``kind``, with the chunk and
    shard sizes checked against it: bad settings fail before any model is loaded."""
    from ..format.metadata import Encoding, Layout

    values = "none" if kind == "none" else args.values
    encoding = Encoding(kind, values, temperature=temperature, k=args.k, samples=args.samples)  # type: ignore[arg-type]
    Layout.choose(encoding, 65536, args.chunk_positions, args.shard_positions)
    return encoding


def _write(args: argparse.Namespace) -> int:
    from ..write.capture import capture
    from ..write.inputs import read_documents, tokenize
    from ..write.teacher import load_teacher, resolve_device
    from ..write.writer import check_target

    encoding = _checked_encoding(args, args.encoding, args.temperature)
    device = resolve_device(args.device)
    if args.seq_len is not None and args.seq_len < 2:
        raise LogitStoreError(f"--seq-len must be at least 2, got {args.seq_len}")
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


def _generate(args: argparse.Namespace) -> int:
    from ..write.generate import GenerationSettings, generate, journal_path, read_prompts
    from ..write.teacher import load_teacher, resolve_device
    from ..write.writer import check_target

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_samples=args.num_samples,
        stop=tuple(args.stop or ()),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    # Checked before hours of generation, not after.
    soft = _checked_encoding(args, args.soft or "none", args.soft_temperature)
    device = resolve_device(args.device)
    check_target(args.out, args.overwrite)  # before the teacher is loaded
    prompts = read_prompts(args.prompts)
    teacher = load_teacher(args.teacher, device, args.dtype)
    resuming = journal_path(args.out).exists()
    print(
        f"{len(prompts)} prompt(s) × {settings.num_samples} sample(s); teacher {teacher.name} "
        f"on {device}{'; found the journal of an unfinished run' if resuming else ''}",
        file=sys.stderr,
    )
    out = generate(
        teacher,
        prompts,
        args.out,
        settings,
        soft=None if soft.kind == "none" else soft,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        chunk_positions=args.chunk_positions,
        shard_positions=args.shard_positions,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..read import open as open_store
    from ..tools.export import export_jsonl

    store = open_store(args.store)
    if args.out in (None, "-"):
        n = export_jsonl(store, sys.stdout, ids=args.ids)
    else:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                n = export_jsonl(store, f, ids=args.ids)
        except OSError as e:
            raise LogitStoreError(f"cannot write --out {args.out}: {e}") from None
        print(f"wrote {n} sequence(s) to {args.out}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..read import open as open_store

    info = store_info(open_store(args.store, allow_incomplete=True))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    enc = info["encoding"]
    what = {
        "topk": f"top-{enc['k']}",
        "sampled": f"sampled n={enc['samples']}",
        "full": "full",
        "none": "tokens only (no teacher distributions)",
    }
    rows = [
        ("store", info["path"]),
        (
            "state",
            f"{info['state']} ({info['shards']['committed']}/{info['shards']['total']} shards)",
        ),
        ("format", f"logitstore {info['format_version']}"),
        (
            "encoding",
            what["none"]
            if enc["kind"] == "none"
            else f"{what[enc['kind']]}, values {enc['values']}, temperature {enc['temperature']}",
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
        *(
            [("loss mask", f"{info['loss_mask_positions']:,} positions count for training")]
            if info.get("loss_mask_positions") is not None
            else []
        ),
        *(
            [("generation", _generation_summary(info["generation"]))]
            if info.get("generation")
            else []
        ),
        ("identity", info["identity"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:>{width}}  {v}")
    return 0


def _generation_summary(gen: dict[str, Any]) -> str:
    sampling = (
        "greedy"
        if gen["temperature"] == 0
        else (f"temperature {gen['temperature']}, top-p {gen['top_p']}")
    )
    stop = f", stop {gen['stop']}" if gen.get("stop") else ""
    return (
        f"{gen['prompts']['count']} prompt(s) × "
        f"{gen['num_samples']}, ≤ {gen['max_new_tokens']} new tokens, {sampling}{stop}, "
        f"seed {gen['seed']}"
    )


def _verify(args: argparse.Namespace) -> int:
    from ..tools.verify import verify

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
    from ..read import open as open_store

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
    if row.loss_mask is not None and store.metadata.has_loss_mask:
        counts = "yes" if row.loss_mask[0] else "no (masked: e.g. a prompt of a generated store)"
        print(f"this prediction counts for training: {counts}")
    if enc.kind == "none":
        print("the store holds tokens only (hard labels): no teacher distribution to show")
        return 0
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

    from ..read.local import LogitStore

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
        "logitstore_server.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        loop="auto",
        http="auto",
    )
    return 0


def _add_teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face model directory or hub id")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="teacher weights dtype (default: float32 on cpu, bfloat16 on cuda)",
    )


def _add_value_args(p: argparse.ArgumentParser, flag: str) -> None:
    """--k, --samples and --values of the encoding chosen by ``flag`` (--encoding/--soft)."""
    p.add_argument("--k", type=int, default=64, help=f"candidates for {flag}topk (default 64)")
    p.add_argument("--samples", type=int, default=64, help=f"draws for {flag}sampled (default 64)")
    p.add_argument(
        "--values",
        choices=["fp32", "fp16", "bf16", "u8", "u7", "u6", "u5", "u4"],
        default="u8",
        help="how probabilities are stored (default u8: 255 bins of sqrt(p); u7..u4: 127..15 "
        "bins, smaller and coarser)",
    )


def _add_store_args(p: argparse.ArgumentParser, overwrite: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument(
        "--shard-positions",
        type=int,
        default=None,
        help="positions per shard (unit of commit; default ~64 chunks)",
    )
    p.add_argument(
        "--chunk-positions",
        type=int,
        default=None,
        help="positions per compressed chunk (default ~1 MiB of ids)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    _add_teacher_args(w)
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
    _add_value_args(w, "")
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
    w.add_argument("--seed", type=int, default=0, help="seed for sampled draws (default 0)")
    _add_store_args(w, "replace an existing store at --out")
    w.set_defaults(func=_write)

    g = sub.add_parser(
        "generate",
        help="hard-label data: the teacher completes prompts; the store masks the prompts",
        description="The teacher generates completions for prompts (batched, with the KV "
        "cache). The store holds prompt + completion as sequences and a loss mask, so a "
        "student learns only the completions; with --soft it also holds the teacher's "
        "distributions. Interrupted? Run the same command again: finished batches are kept "
        "in OUT.generating.jsonl and the result equals an uninterrupted run.",
        epilog=_EPILOG,
    )
    _add_teacher_args(g)
    g.add_argument(
        "--prompts",
        required=True,
        metavar="FILE.jsonl",
        help='one JSON object per line with a "prompt" field',
    )
    g.add_argument("--out", required=True, help="store directory to create (or resume)")
    g.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest completion (default 256)"
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature; 0 = greedy (default 1)",
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: no cut)"
    )
    g.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    g.add_argument(
        "--stop",
        nargs="+",
        metavar="STR",
        help="strings that end a completion (kept in it, so students learn to stop); "
        "in bash, write a newline as $'\\n'",
    )
    g.add_argument(
        "--batch-size", type=int, default=16, help="prompts generated together (default 16)"
    )
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument(
        "--soft",
        choices=["topk", "sampled", "full"],
        default=None,
        metavar="ENCODING",
        help="also store the teacher's distributions (topk, sampled or full; with --k, "
        "--samples, --values) at every position of prompt + completion",
    )
    _add_value_args(g, "--soft ")
    g.add_argument(
        "--soft-temperature",
        type=float,
        default=1.0,
        help="temperature of the stored distributions (default 1)",
    )
    _add_store_args(g, "replace a complete store at --out (an unfinished run is resumed)")
    g.set_defaults(func=_generate)

    e = sub.add_parser(
        "export",
        help="write a store's text as JSON lines (prompt/completion for generated stores)",
        description="Write one JSON object per sequence: prompt, completion, token counts "
        "and finish reason for generated stores, the text for others.",
        epilog=_EPILOG,
    )
    e.add_argument("store", help="store directory or URL")
    e.add_argument(
        "--jsonl", action="store_true", required=True, help="JSON lines (the only format)"
    )
    e.add_argument("--out", default=None, help="file to write (default: standard output)")
    e.add_argument("--ids", action="store_true", help="include token ids")
    e.set_defaults(func=_export)

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
    except BrokenPipeError:  # e.g. `logitstore export ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            f"logitstore {args.command}: interrupted. Committed shards are kept; run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
