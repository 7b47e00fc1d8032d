"""``logitstore import`` and ``export --format axolotl|distillkit``: the doors to the peers'
offline-KD datasets (docs/PEERS.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import CorruptStoreError, InputError
from ..format.peers import PEER_FORMATS
from .common import EPILOG

__all__ = ["add_parsers", "export_peer_command"]


def export_peer_command(args: argparse.Namespace) -> int:
    """``export --format axolotl|distillkit``: Parquet, config snippet, what is lost."""
    from ..read import open as open_store
    from ..tools.peers import export_peer

    if args.out in (None, "-"):
        raise InputError(f"--format {args.format} writes a directory: pass --out DIR")
    messages = None
    if args.messages is not None:  # read with the reader `write` used: the same messages
        from ..write.sources import Fields, read_records

        fields = Fields(text=args.text_field, messages=args.messages_field)
        records = [
            r for batch in read_records(args.messages, fields, split=args.split) for r in batch
        ]
        missing = next((r for r in records if r.messages is None), None)
        if missing is not None:
            raise InputError(f"{missing.where}: no conversation in --messages-field")
        messages = [r.messages for r in records]
    report = export_peer(
        open_store(args.store),
        args.format,
        args.out,
        messages=messages,
        logprob_dtype=args.logprob_dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    for line in report.warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    print(
        f"wrote {report.rows} sequence(s), {report.positions:,} positions as {args.format} to "
        f"{report.path}: {', '.join(report.files)}",
        file=sys.stderr,
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..tools.verify import verify
    from ..write.peer_import import import_peer

    md = import_peer(
        args.src,
        args.format,
        args.out,
        vocab_size=args.vocab_size,
        temperature=args.temperature,
        teacher=args.teacher,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    report = verify(args.out, progress=False)
    if not report.ok:
        raise CorruptStoreError(
            f"the imported store {args.out!r} failed verification: {'; '.join(report.faults)}"
        )
    print(
        f"imported {md.num_sequences} sequence(s), {md.num_positions:,} positions "
        f"(top-{md.encoding.k}, fp32, T={md.encoding.temperature}) into {args.out}; verified. "
        f"residual: {md.teacher['imported']['residual']}",
        file=sys.stderr,
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``import`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "import",
        help="turn an axolotl or DistillKit top-k dataset into a store",
        description="Read a peer's offline-KD dataset (Parquet file or directory, or a saved "
        "Hugging Face dataset) and write it as a top-k store with fp32 values, then verify "
        "it. Every row is checked first; a bad one is named by row, position and column. "
        "The residual comes from logitstore's own column when the file is an export of "
        "ours; otherwise it is derived as 1 - sum(p) and the store's provenance "
        "(teacher.imported) marks it inexact.",
        epilog=EPILOG,
    )
    p.add_argument("src", help="Parquet file, directory of them, or saved dataset directory")
    p.add_argument("--format", required=True, choices=PEER_FORMATS, help="the peer's layout")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="the teacher's vocabulary size (default: from an export's logitstore.json)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature the log-probabilities were taken at (default: the export's, else 1)",
    )
    p.add_argument("--teacher", default=None, help="teacher name to record in provenance")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="axolotl files with `messages` but no input_ids: the teacher's tokenizer "
        "(directory or hub id) whose chat template renders them, as `write` does "
        "(assistant turns learned); the rows align with the last tokens",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template replacing the tokenizer's (as for write)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_import)
