"""Teachers: a function from token ids to logits, and the loading of Hugging Face models
into one, with what provenance records about them (name, revision, weights, tokenizer)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TeacherError

__all__ = [
    "LogitsFn",
    "Teacher",
    "load_teacher",
    "resolve_device",
    "weights_digest",
]

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    *,
    device_map: str | None = None,
) -> Teacher:
    """Load a Hugging Face causal LM and its tokenizer as a :class:`Teacher`.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. ``device_map="auto"`` spreads
    a model too large for one GPU over every visible GPU (then CPU memory) with Hugging Face
    accelerate, layer by layer; ``device`` must then be unset. The layers run one after
    another, so one GPU computes at a time: it makes a large teacher fit, not run faster.

    Raises:
        TeacherError: the model or tokenizer cannot be loaded, the tokenizer produces ids
            the model's output layer does not have, or ``device_map`` is asked for without
            accelerate installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = _check_device_map(device_map, device)
    dev = resolve_device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in _DTYPES:
        raise TeacherError(f"unknown --dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model: Any = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=_DTYPES[dtype], **placement
        )
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load teacher {name_or_path!r}: {e}") from None
    if placement:  # inputs go where the embeddings are; the logits come from the last device
        dev = model.get_input_embeddings().weight.device
        model.eval()
    else:
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


def _check_device_map(device_map: str | None, device: str | torch.device | None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that place a model by ``device_map``."""
    if device_map is None:
        return {}
    if device_map != "auto":
        raise TeacherError(f"unknown --device-map {device_map!r}: expected auto")
    if device is not None:
        raise TeacherError(
            f"--device-map auto places the model itself; drop --device {device} "
            "(choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise TeacherError(
            "--device-map auto spreads one teacher over every GPU, and under torchrun each "
            "rank already has its own GPU: use one or the other (a teacher that fits one GPU: "
            "torchrun; one that does not: a single process with --device-map auto)"
        )
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise TeacherError(
            "--device-map auto needs Hugging Face accelerate, which is not installed: "
            "pip install 'logitstore[multigpu]' (or pip install accelerate)"
        )
    return {"device_map": "auto"}


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
