"""Running a teacher once over the input and writing its distributions into a store.

The teacher runs batched forward passes on its device; log-softmax, temperature, top-k or
sampling and quantisation run there too (:func:`logitstore.encode.encode_rows`). Host
transfer, compression and commits happen on the :class:`StoreWriter`'s threads, overlapped
with the next forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Sequences
from .encode import encode_rows
from .errors import TeacherError
from .metadata import Encoding
from .writer import StoreWriter, check_sequences

__all__ = [
    "Teacher",
    "capture",
    "load_teacher",
    "resolve_device",
    "tokenizer_identity",
    "weights_digest",
]

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Rows of (rows, vocab) float32 encoded at once: bounds the encoder's working memory.
_ENCODE_ELEMENTS = 1 << 25


@dataclass
class Teacher:
    """A teacher: a function from token ids ``(B, T)`` (and an attention mask ``(B, T)``) to
    logits ``(B, T, V)``, plus what provenance needs.

    Any causal model works: wrap a Hugging Face model with :func:`load_teacher`, or pass your
    own ``fn``. Rows are right-padded, so ``fn`` must be causal (position t sees only <= t).
    ``model`` is the Hugging Face model itself, when there is one: ``logitstore generate``
    needs its ``generate`` (with the KV cache).
    """

    fn: LogitsFn
    vocab_size: int
    device: torch.device
    name: str = "custom"
    revision: str | None = None
    dtype: str = "float32"
    max_length: int | None = None
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: Any = None

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "dtype": self.dtype, **self.extra}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Parse and check a device before any model is loaded.

    Raises:
        TeacherError: the device string is unknown or the device is not available here.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TeacherError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherError("--device cuda was asked for, but no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TeacherError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are present"
            )
    elif dev.type != "cpu":
        raise TeacherError(f"unsupported device {device!r}: expected cpu, cuda or cuda:N")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_teacher(
    name_or_path: str, device: str | torch.device | None = None, dtype: str | None = None
) -> Teacher:
    """Load a Hugging Face causal LM and its tokenizer as a :class:`Teacher`.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.

    Raises:
        TeacherError: the model or tokenizer cannot be loaded, or the tokenizer produces ids
            the model's output layer does not have.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in _DTYPES:
        raise TeacherError(f"unknown --dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model: Any = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load teacher {name_or_path!r}: {e}") from None
    model.to(dev).eval()
    out = model.get_output_embeddings()
    vocab_size = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
    if len(tokenizer) > vocab_size:
        raise TeacherError(
            f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the model "
            f"predicts only {vocab_size}; the model and tokenizer do not belong together"
        )
    cfg = model.config
    max_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
        return logits

    return Teacher(
        fn=fn,
        vocab_size=vocab_size,
        device=dev,
        name=str(name_or_path if not os.path.isdir(name_or_path) else Path(name_or_path).name),
        revision=getattr(cfg, "_commit_hash", None),
        dtype=dtype,
        max_length=int(max_length) if max_length else None,
        tokenizer=tokenizer,
        model=model,
        extra={
            "architecture": type(model).__name__,
            **(
                {"weights_digest": weights_digest(name_or_path)}
                if os.path.isdir(name_or_path)
                else {}
            ),
        },
    )


def weights_digest(directory: str | os.PathLike[str]) -> str | None:
    """A cheap fingerprint of a model directory's weight files: name, size, first and last
    MiB of each (docs/FORMAT.md §3). ``None`` when there are no weight files."""
    files = sorted(
        p
        for p in Path(directory).iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    )
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return "sha256:" + h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> tuple[dict[str, Any], bytes | None]:
    """A tokenizer's identity (a SHA-256 of its vocabulary) and its ``tokenizer.json``."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    ident = {
        "name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "vocab_hash": "sha256:" + digest,
        "size": len(vocab),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str().encode() if backend is not None else None
    return ident, raw


def capture(
    teacher: Teacher,
    sequences: Sequences,
    out: str | os.PathLike[str],
    encoding: Encoding,
    *,
    batch_size: int = 8,
    seed: int = 0,
    seq_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_positions: int | None = None,
    shard_positions: int | None = None,
    loss_mask: np.ndarray | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Run ``teacher`` over ``sequences`` and write (or resume) the store at ``out``.

    Batch ``b`` always holds sequences ``[b * batch_size, (b + 1) * batch_size)``, so a
    resumed run recomputes exactly the batches an uninterrupted one did. ``loss_mask`` and
    ``generation`` are stored as :class:`StoreWriter` describes; an encoding of kind
    ``none`` stores the tokens without running the teacher.

    Raises:
        InputError, TeacherError, StoreExistsError, ResumeMismatchError: checked before the
            first forward pass.

    Example:
        >>> t = load_teacher("gpt2")
        >>> capture(t, tokenize(read_documents(["a.txt"]), t.tokenizer, 1024), "a.zarr",
        ...         Encoding("topk", "u8", k=64))
    """
    if batch_size < 1:
        raise TeacherError(f"--batch-size must be at least 1, got {batch_size}")
    encoding.check_vocab(teacher.vocab_size)
    check_sequences(sequences.input_ids, sequences.offsets, teacher.vocab_size)
    lengths = np.diff(sequences.offsets)
    longest = max(int(lengths.max()), seq_len or 0)
    if teacher.max_length is not None and longest > teacher.max_length:
        raise TeacherError(
            f"sequences of {longest} tokens were asked for but the teacher reads at most "
            f"{teacher.max_length}; pass --seq-len {teacher.max_length} or less"
        )
    tok_ident, tok_json = (None, None)
    if teacher.tokenizer is not None:
        tok_ident, tok_json = tokenizer_identity(teacher.tokenizer)
    writer = StoreWriter(
        out,
        encoding=encoding,
        vocab_size=teacher.vocab_size,
        input_ids=sequences.input_ids,
        offsets=sequences.offsets,
        seq_len=seq_len,
        seed=seed,
        teacher=teacher.provenance(),
        tokenizer=tok_ident,
        tokenizer_json=tok_json,
        chunk_positions=chunk_positions,
        shard_positions=shard_positions,
        overwrite=overwrite,
        loss_mask=loss_mask,
        generation=generation,
    )
    if encoding.kind == "none":  # tokens only: everything was written at creation
        with writer:
            pass
        return Path(out)
    offsets = sequences.offsets
    total = int(offsets[-1])
    bar = tqdm(
        total=total,
        initial=writer.resume_position,
        unit="pos",
        unit_scale=True,
        desc=f"write {Path(out).name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    ids_all = torch.from_numpy(sequences.input_ids)
    with writer, bar, torch.inference_mode():
        for b0 in range(0, len(sequences), batch_size):
            b1 = min(b0 + batch_size, len(sequences))
            p0, p1 = int(offsets[b0]), int(offsets[b1])
            if p1 <= writer.resume_position:
                continue
            lens = lengths[b0:b1]
            width = int(lens.max())
            batch = torch.zeros(b1 - b0, width, dtype=torch.long)  # (B, T) right-padded
            mask = torch.zeros(b1 - b0, width, dtype=torch.long)  # (B, T)
            for i, (s, n) in enumerate(zip(offsets[b0:b1], lens, strict=True)):
                batch[i, :n] = ids_all[s : s + n]
                mask[i, :n] = 1
            batch, mask = batch.to(teacher.device), mask.to(teacher.device)
            logits = teacher.fn(batch, mask)  # (B, T, V)
            if logits.shape[:2] != batch.shape or logits.shape[-1] != teacher.vocab_size:
                raise TeacherError(
                    f"the teacher returned logits of shape {tuple(logits.shape)}; expected "
                    f"({b1 - b0}, {width}, {teacher.vocab_size})"
                )
            flat = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1).bool()]  # (R, V)
            rows_per_step = max(1, _ENCODE_ELEMENTS // teacher.vocab_size)
            for r0 in range(0, p1 - p0, rows_per_step):
                r1 = min(r0 + rows_per_step, p1 - p0)
                positions = torch.arange(p0 + r0, p0 + r1, device=teacher.device)
                writer.write(p0 + r0, encode_rows(flat[r0:r1], encoding, seed, positions))
            bar.update(p1 - max(p0, bar.n))
    return Path(out)
