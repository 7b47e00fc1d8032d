"""``logitstore info``, ``verify``, ``show`` and ``export``: look into a store, local or served."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..errors import LogitStoreError
from .common import EPILOG

__all__ = ["add_parsers"]


def _export(args: argparse.Namespace) -> int:
    if args.format != "jsonl":
        from .peers import export_peer_command

        return export_peer_command(args)
    from ..read import open as open_store
    from ..tools.export import export_jsonl

    prompts = None
    if args.prompts is not None:  # read with the reader generate used: the same messages
        from ..write.prompts import read_prompts

        read = read_prompts(
            args.prompts,
            text_field=args.text_field,
            messages_field=args.messages_field,
            split=args.split,
        )
        prompts = [p.text if p.messages is None else p.messages for p in read]
    store = open_store(args.store)
    if args.out in (None, "-"):
        n = export_jsonl(store, sys.stdout, ids=args.ids, prompts=prompts)
    else:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                n = export_jsonl(store, f, ids=args.ids, prompts=prompts)
        except OSError as e:
            raise LogitStoreError(f"cannot write --out {args.out}: {e}") from None
        print(f"wrote {n} sequence(s) to {args.out}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..read import open as open_store
    from ..tools.info import store_info

    info = store_info(open_store(args.store, allow_incomplete=True))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from ..format.metadata import Encoding

    enc = Encoding.from_dict(info["encoding"])
    rows = [
        ("store", info["path"]),
        (
            "state",
            f"{info['state']} ({info['shards']['committed']}/{info['shards']['total']} shards)",
        ),
        ("format", f"logitstore {info['format_version']}"),
        ("encoding", enc.describe()),
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


def add_parsers(sub: Any) -> None:
    """Register ``export``, ``info``, ``verify`` and ``show`` on the subparsers ``sub``."""
    e = sub.add_parser(
        "export",
        help="write a store's text as JSON lines, or as an axolotl/DistillKit KD dataset",
        description="--jsonl: one JSON object per sequence: prompt, completion, token counts "
        "and finish reason for generated stores (with --prompts, conversations with the "
        "reply appended), the text for others. --format axolotl|distillkit: a directory "
        "with the peer's offline-KD Parquet rows (candidate ids and log-probabilities at "
        "the store's temperature, masks, with --messages the conversations), its config "
        "snippet, and logitstore.json; what the peer format loses (the residual) is "
        "printed as warnings.",
        epilog=EPILOG,
    )
    e.add_argument("store", help="store directory or URL")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument(
        "--jsonl",
        dest="format",
        action="store_const",
        const="jsonl",
        help="JSON lines of text (same as --format jsonl)",
    )
    fmt.add_argument(
        "--format",
        choices=("jsonl", "axolotl", "distillkit"),
        help="jsonl, or a peer's offline-KD dataset (Parquet + config snippet)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="file to write (default: standard output); a directory for axolotl/distillkit",
    )
    e.add_argument(
        "--messages",
        default=None,
        metavar="PATH",
        help="axolotl: the conversations the store was written from (as given to write), "
        "one per sequence, exported as the `messages` column",
    )
    e.add_argument(
        "--logprob-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="axolotl/distillkit log-probabilities (default float32, what the peers write; "
        "float64 makes an fp32 store's export -> import round trip bit-exact)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out DIR")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--ids", action="store_true", help="include token ids")
    e.add_argument(
        "--prompts",
        default=None,
        metavar="PATH",
        help="the prompts a generated store came from (as given to generate): each "
        "conversation is written back as `messages`, with the completion appended as the "
        "assistant's turn",
    )
    e.add_argument(
        "--text-field", default="prompt", metavar="NAME", help="as for generate (default prompt)"
    )
    e.add_argument(
        "--messages-field",
        default="messages",
        metavar="NAME",
        help="as for generate (default messages)",
    )
    e.add_argument("--split", default=None, help="as for generate")
    e.set_defaults(func=_export)

    i = sub.add_parser("info", help="settings, sizes and provenance of a store", epilog=EPILOG)
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    v = sub.add_parser(
        "verify",
        help="read everything and check checksums and invariants",
        description="Read every shard; check checksums, commit records, offsets, id ranges "
        "and probability sums. Exits 1 naming the shard and position of each fault.",
        epilog=EPILOG,
    )
    v.add_argument("store")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_verify)

    s = sub.add_parser("show", help="what the teacher predicted at a position", epilog=EPILOG)
    s.add_argument("store")
    s.add_argument("--position", type=int, required=True, help="global token position")
    s.add_argument(
        "--context", type=int, default=24, help="tokens of context to print (default 24)"
    )
    s.add_argument("--top", type=int, default=10, help="candidates to list (default 10)")
    s.set_defaults(func=_show)
