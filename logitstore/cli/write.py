"""``logitstore write`` and ``logitstore generate``: a teacher's distributions or completions
into a store. The teacher, value and store options are declared once for both."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, LogitStoreError
from .common import EPILOG

if TYPE_CHECKING:  # imported when a command runs: `logitstore --help` stays fast
    from ..format.metadata import Encoding

__all__ = ["add_parsers"]


def _checked_encoding(args: argparse.Namespace, kind: str, temperature: float) -> Encoding:
    """The Encoding that --k/--samples/--values describe for ``kind``, with the chunk and
    shard sizes checked against it: bad settings fail before any model is loaded."""
    from ..format.metadata import Encoding, Layout

    values = "none" if kind == "none" else args.values
    encoding = Encoding(kind, values, temperature=temperature, k=args.k, samples=args.samples)  # type: ignore[arg-type]
    try:
        Layout.choose(encoding, 65536, args.chunk_positions, args.shard_positions)
    except FormatError as e:  # bad options, not a damaged store: exit 2
        raise LogitStoreError(str(e)) from None
    return encoding


def _write(args: argparse.Namespace) -> int:
    import dataclasses

    from ..write.capture import capture
    from ..write.chat import load_tokenizer
    from ..write.checks import check_target
    from ..write.inputs import read_sequences
    from ..write.sources import Fields

    encoding = _checked_encoding(args, args.encoding, args.temperature)
    ranks, device = _place(args)
    say = _say(ranks)
    if args.seq_len is not None and args.seq_len < 2:
        raise LogitStoreError(f"--seq-len must be at least 2, got {args.seq_len}")
    # before the teacher: a finished store of the same job passes (the writer then finds
    # nothing to do); one with another encoding or seed is refused now
    done = check_target(
        args.out, args.overwrite, allow_complete=True, encoding=encoding, seed=args.seed
    )
    # The tokenizer alone first: all input is read, rendered and checked before the model
    # takes its memory (a bad row fails in seconds, not after the model has loaded).
    tokenizer = load_tokenizer(args.teacher, args.chat_template)
    sequences = read_sequences(
        args.data,
        tokenizer,
        fields=Fields(args.text_field, args.messages_field),
        split=args.split,
        train_on=args.train_on,
        progress=not args.no_progress and say is not None,
    )
    documents = len(sequences)
    teacher = _load(args, device, quiet=say is None)
    teacher = dataclasses.replace(teacher, tokenizer=tokenizer)  # with --chat-template's
    encoding.check_vocab(teacher.vocab_size)
    seq_len = args.seq_len or teacher.max_length
    sequences = sequences.split(seq_len)
    masked = "" if sequences.loss_mask is None else f" ({int(sequences.loss_mask.sum())} learned)"
    _print(
        say,
        f"{documents} document(s) → {len(sequences)} sequence(s), "
        f"{len(sequences.input_ids)} positions{masked}; teacher {teacher.name} on "
        f"{teacher.device}{_ranks_note(ranks)}",
    )
    out = capture(
        teacher,
        sequences,
        args.out,
        encoding,
        batch_size=args.batch_size,
        batching=args.batching,
        seed=args.seed,
        seq_len=seq_len,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        shard_positions=args.shard_positions,
        chunk_positions=args.chunk_positions,
        loss_mask=sequences.loss_mask,
        fsync=args.fsync,
    )
    _print(say, _wrote(out, done))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import dataclasses

    from ..write.chat import load_tokenizer
    from ..write.checks import check_target
    from ..write.generate import (
        GenerationSettings,
        check_prompts,
        generate,
        read_prompts,
    )
    from ..write.journal import journal_paths

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
    ranks, device = _place(args)
    say = _say(ranks)
    check_target(args.out, args.overwrite)  # before the teacher is loaded
    prompts = read_prompts(
        args.prompts,
        text_field=args.text_field,
        messages_field=args.messages_field,
        split=args.split,
    )
    # Conversations are rendered with the tokenizer alone, before the model is loaded.
    tokenizer = load_tokenizer(args.teacher, args.chat_template)
    check_prompts(prompts, tokenizer)
    teacher = _load(args, device, quiet=say is None)
    teacher = dataclasses.replace(teacher, tokenizer=tokenizer)  # with --chat-template's
    resuming = bool(journal_paths(args.out))
    _print(
        say,
        f"{len(prompts)} prompt(s) × {settings.num_samples} sample(s); teacher {teacher.name} "
        f"on {teacher.device}{_ranks_note(ranks)}"
        f"{'; found the journal of an unfinished run' if resuming else ''}",
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
    _print(say, f"wrote {out}")
    return 0


def _place(args: argparse.Namespace) -> tuple[Any, Any]:
    """This process's rank in a torchrun job (or None) and its teacher's device (None with
    --device-map, which places the model itself)."""
    from ..write.distributed import join, rank_device
    from ..write.teacher import resolve_device

    ranks = join()
    if args.device_map is not None:
        return ranks, None
    return ranks, resolve_device(rank_device(args.device, ranks))


def _load(args: argparse.Namespace, device: Any, quiet: bool) -> Any:
    from ..write.teacher import load_teacher

    if quiet:  # one bar per job: transformers' loading bars only on rank 0
        from transformers.utils import logging

        logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return load_teacher(args.teacher, device, args.dtype, device_map=args.device_map)


def _say(ranks: Any) -> Any:
    """Where messages go: stderr alone or on rank 0; nowhere on the other ranks."""
    return sys.stderr if ranks is None or ranks.rank == 0 else None


def _print(to: Any, message: str) -> None:
    if to is not None:
        print(message, file=to)


def _ranks_note(ranks: Any) -> str:
    return "" if ranks is None else f" (rank 0 of {ranks.world} ranks, each on its own device)"


def _add_teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face model directory or hub id")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available); under torchrun each rank "
        "uses cuda:LOCAL_RANK (or the CPU with --device cpu)",
    )
    p.add_argument(
        "--device-map",
        choices=["auto"],
        default=None,
        help="auto: spread a teacher too large for one GPU over all visible GPUs (Hugging "
        "Face accelerate; pip install 'logitstore[multigpu]'). One process, layers run in "
        "turn: it makes the model fit, not faster. Not with --device or torchrun",
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


def _add_input_args(p: argparse.ArgumentParser, text: str, what: str) -> None:
    """Which fields hold text and conversations, the split, and the chat template."""
    p.add_argument(
        "--text-field",
        default=text,
        metavar="NAME",
        help=f"field (column) holding a {what} as text (default {text})",
    )
    p.add_argument(
        "--messages-field",
        default="messages",
        metavar="NAME",
        help="field (column) holding a conversation: a list of {role, content} messages, "
        "rendered with the teacher tokenizer's chat template (default messages)",
    )
    p.add_argument(
        "--split", default=None, help="the split of a dataset directory that has several"
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to render conversations with, instead of the tokenizer's",
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


def add_parsers(sub: Any) -> None:
    """Register ``write`` and ``generate`` on the subparsers ``sub``."""
    w = sub.add_parser(
        "write",
        help="run a teacher over text and write its distributions into a store",
        description="Run a teacher over text and write its distributions into a store. "
        "Interrupted? Run the same command again: it resumes at the first unfinished shard "
        "and the result is byte-identical to an uninterrupted run. Many GPUs or nodes: "
        "torchrun --nproc-per-node N [--nnodes M ...] -m logitstore write ... (each rank writes "
        "its own whole shards; resume with any number of ranks).",
        epilog=EPILOG,
    )
    _add_teacher_args(w)
    w.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help=".txt (one document per file), .jsonl (one JSON object per line), .parquet, or a "
        "directory: a Hugging Face dataset saved with save_to_disk, or data files; each record "
        "a text or a conversation (see --text-field, --messages-field). Parquet and datasets "
        "need pip install 'logitstore[data]'",
    )
    _add_input_args(w, "text", "document")
    w.add_argument(
        "--train-on",
        choices=["all", "assistant", "last-assistant"],
        default="assistant",
        help="which tokens of a conversation a student learns: the loss mask covers the "
        "positions that predict them (default assistant: every assistant turn; all: no mask)",
    )
    w.add_argument(
        "--out",
        required=True,
        help="store to create (or resume): a directory, or an object-storage URL "
        "(s3://bucket/prefix/store.zarr)",
    )
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
        help="split documents and conversations (and their masks) into sequences of at most "
        "N tokens (default: the teacher's context length)",
    )
    w.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass (default 8)"
    )
    w.add_argument(
        "--batching",
        choices=["length", "sequential"],
        default="length",
        help="length (default): sequences of similar length share a forward pass, so little "
        "of it is padding; sequential: --batch-size consecutive sequences, padded to the "
        "longest. Stored bytes do not depend on it for a batch-invariant teacher",
    )
    w.add_argument("--seed", type=int, default=0, help="seed for sampled draws (default 0)")
    _add_store_args(w, "replace an existing store at --out")
    w.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="force each shard and its commit record to disk (file and directory fsync) "
        "before the next, so committed shards survive a power loss, not only a kill "
        "(default on; --no-fsync saves its cost: benchmarks/results/write.md)",
    )
    w.set_defaults(func=_write)

    g = sub.add_parser(
        "generate",
        help="hard-label data: the teacher completes prompts; the store masks the prompts",
        description="The teacher generates completions for prompts (batched, with the KV "
        "cache). The store holds prompt + completion as sequences and a loss mask, so a "
        "student learns only the completions; with --soft it also holds the teacher's "
        "distributions. Interrupted? Run the same command again: finished batches are kept "
        "in OUT.generating.jsonl and the result equals an uninterrupted run. Many GPUs or "
        "nodes: torchrun --nproc-per-node N -m logitstore generate ... (ranks split the "
        "batches, then the shards).",
        epilog=EPILOG,
    )
    _add_teacher_args(g)
    g.add_argument(
        "--prompts",
        required=True,
        metavar="PATH",
        help='.jsonl (one {"prompt": ...} or {"messages": [...]} per line), .parquet or a '
        "dataset directory; a conversation is rendered with the chat template and the "
        "assistant header, and the completion is the assistant's reply",
    )
    _add_input_args(g, "prompt", "prompt")
    g.add_argument(
        "--out",
        required=True,
        help="store to create (or resume): a directory, or an object-storage URL "
        "(s3://bucket/prefix/store.zarr)",
    )
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


def _wrote(out: object, before: object) -> str:
    """The last line of ``write``: what it did. A finished store rerun with the same data,
    teacher and settings is not an error (a scheduler may rerun a job that succeeded)."""
    if getattr(before, "state", None) == "complete":
        return f"{out} is already complete (same data, teacher and settings): nothing to do"
    return f"wrote {out}"
