"""Hard-label distillation data: a teacher writes completions for prompts, and the store keeps
prompt + completion as sequences with a loss mask over the completion (FORMAT.md §4).

Generation is batched and uses the model's KV cache (Hugging Face ``generate``). It runs in
two phases, each resumable:

1. **Generate.** Prompt rows (each prompt ``num_samples`` times) are taken longest first in
   batches; each finished batch's completions are appended to a journal,
   ``<out>.generating.jsonl``, so a killed run loses at most the batch in flight. Batch ``b``
   samples with its own seed, derived from ``(seed, b)``: a resumed run produces the
   completions an uninterrupted one does.
2. **Store.** The sequences are written as a tokens-only store, or with ``soft`` an encoding,
   as a store of the teacher's distributions over prompt + completion (one forward pass over
   each whole sequence; :func:`logitstore.capture`, resumable by shards). The journal is
   removed once the store is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError, ResumeMismatchError, TeacherError
from ..format.metadata import Encoding
from ..format.provenance import prompts_digest, tokenizer_identity
from ..format.storage import StorePath
from .capture import capture
from .chat import ChatTemplate
from .checks import check_target
from .distributed import Ranks, assign_shards, join
from .inputs import Sequences
from .journal import JOURNAL_VERSION, journal_key, journal_path, journal_paths, read_journal
from .lock import store_lock
from .prompts import Prompt, check_prompts, read_prompts
from .teacher import Teacher

__all__ = [
    "GenerationSettings",
    "Prompt",
    "check_prompts",
    "generate",
    "journal_path",
    "read_prompts",
]


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled.

    Args:
        max_new_tokens: the longest completion, in tokens.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling: keep the smallest set of tokens whose mass reaches ``top_p``
            (1 keeps every token). No top-k cut is applied.
        num_samples: completions per prompt.
        stop: strings that end a completion; the completion keeps the tokens up to and
            including the one that completes the string (so a student learns to stop).
        batch_size: prompt rows generated together.
        seed: seeds the sampling of every batch.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise InputError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.temperature == 0 and self.num_samples > 1:
            raise InputError(
                f"--num-samples {self.num_samples} with --temperature 0 (greedy) would store "
                "identical copies; sample with a temperature > 0, or use one sample"
            )
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if any(not s for s in self.stop):
            raise InputError("--stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generate(
    teacher: Teacher,
    prompts: Sequence[str | Prompt | list[dict[str, Any]]],
    out: str | os.PathLike[str],
    settings: GenerationSettings | None = None,
    *,
    soft: Encoding | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_positions: int | None = None,
    shard_positions: int | None = None,
) -> StorePath:
    """Generate completions of ``prompts`` with ``teacher`` and write (or resume) the store at
    ``out``: prompt + completion per sequence, a loss mask over the completion, and with
    ``soft`` the teacher's distributions at every position.

    A prompt is a text, a :class:`Prompt`, or a conversation (a list of messages, rendered
    with the tokenizer's chat template and the assistant header: the completion is the
    assistant's reply). Sequence ``s`` is sample ``s % num_samples`` of prompt
    ``s // num_samples``. Only the
    settings here shape the text: the model's own generation defaults (repetition penalty,
    top-k, ...) are not applied; its end-of-text tokens are (with the tokenizer's).
    ``overwrite`` replaces a complete store at ``out``; completions an interrupted run of
    these same settings left in the journal are kept either way (they are what this run
    would generate).

    Raises:
        TeacherError: the teacher has no Hugging Face model or tokenizer, or a prompt plus
            ``max_new_tokens`` exceeds its context.
        InputError: a bad prompt or conversation, or a chat template that is missing or
            raises; checked before generating, like StoreExistsError and
            ResumeMismatchError.

    Example:
        >>> t = load_teacher("teacher-dir")
        >>> generate(t, read_prompts("prompts.jsonl"), "gen.zarr",
        ...          GenerationSettings(max_new_tokens=128, temperature=0.7))
    """
    settings = settings or GenerationSettings()
    if teacher.model is None or teacher.tokenizer is None:
        raise TeacherError(
            "generation needs a Hugging Face model and tokenizer: load the teacher with "
            "load_teacher()"
        )
    if soft is not None:
        soft.check_vocab(teacher.vocab_size)
        if soft.kind == "none":
            soft = None
    interrupted = check_target(out, overwrite)
    items = [_prompt(p, i) for i, p in enumerate(prompts)]
    if not items:
        raise InputError("no prompts to generate from")
    tokenizer = teacher.tokenizer
    prompt_ids = _tokenize_prompts(items, tokenizer, teacher, settings)
    eos = _eos_ids(teacher.model, tokenizer)
    tok_ident, _ = tokenizer_identity(tokenizer)
    generation = {
        **asdict(settings),
        "stop": list(settings.stop),
        "prompts": {"sha256": prompts_digest([p.text for p in items]), "count": len(items)},
        "eos_token_ids": eos,
        "prompt_order": "prompt-major",
    }
    if interrupted is not None and (
        interrupted.generation != generation or interrupted.teacher != teacher.provenance()
    ):
        raise ResumeMismatchError(
            f"{str(out)!r} holds an interrupted store generated from other prompts, teacher or "
            "settings; rerun that command to finish it, or pass --overwrite to replace it"
        )
    key = journal_key(generation, teacher, tok_ident["vocab_hash"], prompt_ids)
    rows = [(i, j) for i in range(len(items)) for j in range(settings.num_samples)]
    # Longest prompts first: little padding per batch, and the largest batch comes first.
    order = sorted(range(len(rows)), key=lambda r: -len(prompt_ids[rows[r][0]]))
    batches = [
        order[b : b + settings.batch_size] for b in range(0, len(order), settings.batch_size)
    ]
    job = join()
    ranks = None if job is None else job.scope("generate")
    with contextlib.ExitStack() as stack:
        if ranks is None:
            stack.enter_context(store_lock(out))
        completions = _complete_all(
            teacher,
            prompt_ids,
            rows,
            batches,
            settings,
            out,
            key,
            overwrite,
            progress,
            ranks,
            stack,
        )
        path = _store(
            teacher,
            prompt_ids,
            rows,
            completions,
            out,
            settings,
            soft,
            overwrite,
            progress,
            chunk_positions,
            shard_positions,
            generation,
        )
        if ranks is None or ranks.rank == 0:
            for journal in journal_paths(out):
                journal.unlink(missing_ok=True)
    return path


def _complete_all(
    teacher: Teacher,
    prompt_ids: list[list[int]],
    rows: list[tuple[int, int]],
    batches: list[list[int]],
    settings: GenerationSettings,
    out: str | os.PathLike[str],
    key: str,
    overwrite: bool,
    progress: bool,
    ranks: Ranks | None,
    stack: contextlib.ExitStack,
) -> dict[int, list[int]]:
    """Every row's completion: those the journals hold, and the rest generated now (under
    torchrun, each rank a contiguous, cost-balanced run of the missing batches, appended to
    its own journal)."""
    sizes = [len(b) for b in batches]

    def read_all() -> dict[int, list[list[int]]]:
        done: dict[int, list[list[int]]] = {}
        for path in journal_paths(out):
            done.update(read_journal(path, key, sizes, discard_other=overwrite))
        return done

    if ranks is None:
        journal_path(out).parent.mkdir(parents=True, exist_ok=True)
        done = read_all()
    else:
        repaired: dict[int, list[list[int]]] = {}

        def repair() -> None:  # rank 0 alone cuts torn lines, before anyone reads
            stack.enter_context(store_lock(out))
            journal_path(out).parent.mkdir(parents=True, exist_ok=True)
            repaired.update(read_all())

        ranks.lead("journals", repair)
        done = repaired if ranks.rank == 0 else read_all()
        ranks.barrier("read")  # nobody appends while another rank still reads
    pending = np.array([b not in done for b in range(len(batches))], dtype=bool)
    width = settings.max_new_tokens
    cost = np.array([len(b) * (len(prompt_ids[rows[b[0]][0]]) + width) for b in batches])
    owner = np.where(pending, 0, -1) if ranks is None else assign_shards(cost, pending, ranks.world)
    rank = 0 if ranks is None else ranks.rank
    journal = journal_path(out, rank)
    initial = sum(len(got) for got in done.values())
    bar = tqdm(
        total=len(rows),
        initial=initial,
        unit="completion",
        desc=f"generate {Path(out).name}",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )

    def show() -> None:  # the whole job's completions, on rank 0
        if ranks is not None:
            bar.update(initial + ranks.add("completions", 0) - bar.n)

    tokenizer = teacher.tokenizer
    eos = _eos_ids(teacher.model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    stopper = _StopStrings(tokenizer, settings.stop) if settings.stop else None
    with bar, journal.open("a", encoding="utf-8") as log:
        if journal.stat().st_size == 0:
            log.write(json.dumps({"logitstore_generate": JOURNAL_VERSION, "key": key}) + "\n")
            log.flush()
        generated = 0
        for b in np.flatnonzero(owner == rank).tolist():
            batch = batches[b]
            got = _generate_batch(
                teacher, [prompt_ids[rows[r][0]] for r in batch], settings, b, pad, eos, stopper
            )
            log.write(json.dumps({"batch": b, "completions": got}) + "\n")
            log.flush()
            done[b] = got
            generated += sum(map(len, got))
            if ranks is None:
                bar.update(len(batch))
            else:
                ranks.add("completions", len(batch))
                show()
            bar.set_postfix(tokens=generated, refresh=False)
        if ranks is not None:
            ranks.barrier("generated", tick=show if rank == 0 else None)
            show()
    if ranks is not None:
        done = read_all()  # every rank's batches, now that none is appending
    completions: dict[int, list[int]] = {}
    for b, got in done.items():
        completions.update(zip(batches[b], got, strict=True))
    return completions


def _store(
    teacher: Teacher,
    prompt_ids: list[list[int]],
    rows: list[tuple[int, int]],
    completions: dict[int, list[int]],
    out: str | os.PathLike[str],
    settings: GenerationSettings,
    soft: Encoding | None,
    overwrite: bool,
    progress: bool,
    chunk_positions: int | None,
    shard_positions: int | None,
    generation: dict[str, Any],
) -> StorePath:
    """Prompt + completion sequences and their loss mask into the store (phase 2)."""
    pieces, mask_pieces = [], []
    for r, (i, _) in enumerate(rows):
        p, c = prompt_ids[i], completions[r]
        pieces.append(np.asarray(p + c, dtype=np.int64))
        mask = np.zeros(len(p) + len(c), dtype=np.uint8)
        mask[len(p) - 1 : len(p) + len(c) - 1] = 1  # positions that predict a completion token
        mask_pieces.append(mask)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in pieces], out=offsets[1:])
    sequences = Sequences(np.concatenate(pieces), offsets)
    return capture(
        teacher,
        sequences,
        out,
        soft or Encoding("none", "none"),
        batch_size=settings.batch_size,
        seed=settings.seed,
        overwrite=overwrite,
        progress=progress,
        chunk_positions=chunk_positions,
        shard_positions=shard_positions,
        loss_mask=np.concatenate(mask_pieces),
        generation=generation,
    )


def _prompt(p: str | Prompt | list[dict[str, Any]], i: int) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(p, f"prompt {i}")
    return Prompt.chat(p, f"prompt {i}")


def _tokenize_prompts(
    items: Sequence[Prompt], tokenizer: Any, teacher: Teacher, settings: GenerationSettings
) -> list[list[int]]:
    texts = [p for p in items if p.messages is None]
    encoded = iter(
        tokenizer([p.text for p in texts], add_special_tokens=True)["input_ids"] if texts else []
    )
    chat: ChatTemplate | None = None
    ids: list[list[int]] = []
    for p in items:
        if p.messages is None:
            ids.append(list(map(int, next(encoded))))
        else:
            chat = chat or ChatTemplate(tokenizer)
            ids.append(chat.prompt_ids(p.messages, p.source))
    for p, x in zip(items, ids, strict=True):
        if not x:
            raise InputError(f"{p.source}: the prompt has no tokens; give the teacher some text")
        if teacher.max_length is not None and len(x) + settings.max_new_tokens > teacher.max_length:
            raise TeacherError(
                f"{p.source}: the prompt has {len(x)} tokens; with --max-new-tokens "
                f"{settings.max_new_tokens} that is more than the {teacher.max_length} the "
                f"teacher reads. Shorten the prompt or lower --max-new-tokens to "
                f"{max(teacher.max_length - len(x), 0)}"
            )
    return ids


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-text ids: the model's (a chat model may have several) and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for x in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in x if isinstance(x, list | tuple) else [x]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


class _StopStrings:
    """Finds where a completion first contains a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        # A stop string spans at most len(utf-8 bytes) tokens, plus one for a token that
        # starts mid-character: decoding that many last tokens is enough to see it appear.
        self.window = max(len(s.encode()) for s in stop) + 2

    def found(self, tokens: Sequence[int]) -> bool:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=False)
        return any(s in text for s in self.stop)

    def end(self, tokens: list[int]) -> int | None:
        """The smallest ``j`` such that ``tokens[:j]`` contains a stop string, or None."""
        if not self.found(tokens):
            return None
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.found(tokens[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def criteria(self, prompt_width: int) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stopper = self

        class _Criterion(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
                tails = input_ids[:, prompt_width:][:, -stopper.window :].tolist()
                done = [stopper.found(t) for t in tails]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Criterion()])


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"logitstore-generate:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generate_batch(
    teacher: Teacher,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch: int,
    pad: int,
    eos: list[int],
    stopper: _StopStrings | None,
) -> list[list[int]]:
    """Completions (trimmed token lists) of one batch of prompts, left-padded together."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    options: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": not settings.greedy,
        "pad_token_id": pad,
        "eos_token_id": eos or None,
        "use_cache": True,
    }
    if not settings.greedy:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    config = GenerationConfig(**options)  # type: ignore[no-untyped-call]
    device = teacher.device
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    model = teacher.model
    # Only the settings above shape the text (they are what the store records): generate()
    # fills every unset field from the model's generation_config, so hide it meanwhile.
    saved = getattr(model, "generation_config", None)
    try:
        if saved is not None:
            model.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(_batch_seed(settings.seed, batch))
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=stopper.criteria(width) if stopper else None,
            )
    finally:
        if saved is not None:
            model.generation_config = saved
    completions = []
    for row in out[:, width:].tolist():
        end = len(row)
        ends = [i for i, t in enumerate(row) if t in eos]
        if ends:
            end = ends[0] + 1  # the end-of-text token is kept: students learn to stop
        if stopper is not None:
            at = stopper.end(row[:end])
            end = at if at is not None else end
        completions.append(row[:end])
    return completions
