"""The benchmark teacher: a small GPT-2 trained offline on the standard library's source
(benchlib.corpus), evaluated on held-out files and saved as a Hugging Face model directory,
cached under benchmarks/.cache by the settings that made it.

No model hub is reachable from the machines this project is developed and benchmarked on,
yet benchmarks need *realistic* teacher distributions (a random model's are either flat or,
once scaled, peaked in unrealistic ways)::

    from benchlib.teacher import ensure_teacher

    teacher_dir = ensure_teacher(vocab_size=4096, n_layer=4, n_embd=128, n_head=4, minutes=5)

benchmarks/teacher.py is the command line over this module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib.corpus import (
    EOS_TOKEN,
    SOURCES,
    held_out_documents,
    source_root,
    source_version,
    tokenize_corpus,
    train_documents,
    train_tokenizer,
)
from benchlib.models import gpt2
from benchlib.pretrain import choose_autocast, eval_windows, evaluate, train_model
from benchlib.report import BENCH_DIR, log

# Bump when the training recipe changes in a way that makes cached teachers stale.
FORMAT_VERSION = 1
CACHE_ROOT = BENCH_DIR / ".cache"
#: The flat teacher of the trade-off study and the methods comparison (cached; ~9 minutes on
#: 2 cores): trained on the standard library for a few minutes, its held-out entropy is
#: ~4.7 nats. A step budget, not a time budget, so that a busy machine trains the same model.
STUDY_TEACHER: dict[str, Any] = {
    "vocab_size": 8192,
    "n_layer": 4,
    "n_embd": 256,
    "n_head": 4,
    "steps": 380,
}
#: The sharp teacher of the trade-off study: the same model trained on more predictable text
#: (transformers' model implementations, benchlib.corpus) for longer (~21 minutes on 2 cores).
SHARP_TEACHER: dict[str, Any] = {**STUDY_TEACHER, "corpus": "hf-modeling", "steps": 900}
#: The teacher of every --quick run: trained for a few seconds on a few files, never cached.
#: Its context fits the study's 256-token sweep windows; fp32 weights so that the reload
#: check cannot trip on fp16 rounding of a barely trained model's near-ties.
QUICK_TEACHER: dict[str, Any] = {
    "vocab_size": 512,
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 256,
    "batch_size": 4,
    "steps": 100,
    "warmup_steps": 10,
    "limit_files": 16,
    "eval_windows": 4,
    "save_dtype": "float32",
}


@dataclass(frozen=True)
class TeacherSettings:
    """Everything that determines a trained teacher (and therefore its cache identity)."""

    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    minutes: float | None = None
    steps: int | None = None
    seed: int = 0
    autocast: str = "auto"  # "auto" measures bf16 vs fp32 speed and picks the faster one
    save_dtype: str = "float16"
    eval_windows: int = 128
    limit_files: int | None = None
    skip_tests: bool = False
    corpus: str = "stdlib"

    def __post_init__(self) -> None:
        if self.corpus not in SOURCES:
            raise ValueError(f"unknown corpus {self.corpus!r}; expected one of {sorted(SOURCES)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be auto, bf16 or off, not {self.autocast!r}")
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"unsupported save dtype {self.save_dtype!r}")

    @property
    def time_budget_s(self) -> float | None:
        """Training time budget; 10 minutes when neither minutes nor steps is given."""
        if self.minutes is None and self.steps is None:
            return 600.0
        return None if self.minutes is None else self.minutes * 60.0

    def cache_key(self) -> dict[str, Any]:
        """The settings as a JSON-comparable dict, plus the recipe version."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}


def default_out_dir(settings: TeacherSettings) -> Path:
    """Default cache directory, named by the settings that dominate size and quality."""
    name = f"teacher-v{settings.vocab_size}-{settings.n_layer}x{settings.n_embd}"
    if settings.corpus != "stdlib":
        name += f"-{settings.corpus}"
    return CACHE_ROOT / name


def save_teacher(model: Any, tokenizer: Any, out_dir: Path, save_dtype: str) -> None:
    """Save model weights (safetensors, in ``save_dtype``) and tokenizer side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Cast a copy: the fp32 original is needed afterwards to verify the round trip.
    to_save = copy.deepcopy(model).to(getattr(torch, save_dtype))
    to_save.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def verify_saved(out_dir: Path, model: Any, sample: torch.Tensor) -> dict[str, float]:
    """Load the directory back the way users will and compare its logits with the original.

    The saved weights are rounded to the save dtype, so the check is on the distributions
    (KL and argmax agreement) rather than bitwise equality.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    probe = "def main():\n    return 0\n"
    if tokenizer.decode(tokenizer(probe)["input_ids"]) != probe:
        raise RuntimeError("saved tokenizer does not round-trip text")
    ref = torch.log_softmax(model(input_ids=sample).logits.float(), dim=-1)  # (B, T, V)
    got = torch.log_softmax(loaded(input_ids=sample).logits.float(), dim=-1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    max_diff = (ref - got).abs().max().item()
    if kl > 1e-3 or agree < 0.98:
        raise RuntimeError(f"reloaded teacher differs: KL {kl:.2e}, argmax agreement {agree:.3f}")
    return {"kl": kl, "argmax_agreement": agree, "max_abs_logprob_diff": max_diff}


def directory_bytes(path: Path) -> int:
    """Total size of the files in a directory tree."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cached_report(out_dir: Path, settings: TeacherSettings) -> dict[str, Any] | None:
    """The existing report if ``out_dir`` holds a complete teacher for the same settings."""
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        return None
    try:
        report: dict[str, Any] = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if report.get("settings") != settings.cache_key():
        return None
    return report


def corpus_info(
    train_texts: Sequence[str], held_texts: Sequence[str], source: str = "stdlib"
) -> dict[str, Any]:
    """Where the text came from, so a report says which files it was trained on."""
    return {
        "source": SOURCES[source],
        "root": str(source_root(source)),
        "version": source_version(source),
        "python_version": platform.python_version(),
        "train_docs": len(train_texts),
        "held_out_docs": len(held_texts),
        "train_chars": sum(map(len, train_texts)),
        "held_out_chars": sum(map(len, held_texts)),
    }


def quiet_transformers() -> None:
    """Silence progress bars and info chatter that would drown the stderr progress log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def train_teacher(settings: TeacherSettings, out_dir: Path, argv: Sequence[str]) -> dict[str, Any]:
    """Run the whole pipeline (tokenizer, model, eval, save, verify) and write report.json."""
    torch.manual_seed(settings.seed)
    quiet_transformers()
    train_texts = train_documents(settings.limit_files, settings.skip_tests, settings.corpus)
    held_texts = held_out_documents(settings.limit_files, settings.skip_tests, settings.corpus)
    corpus = corpus_info(train_texts, held_texts, settings.corpus)
    log(
        "teacher",
        f"corpus: {corpus['train_docs']} train / {corpus['held_out_docs']} held-out files",
    )

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    train_tokens = torch.from_numpy(tokenize_corpus(tokenizer, train_texts).astype(np.int64))
    held_tokens = torch.from_numpy(tokenize_corpus(tokenizer, held_texts).astype(np.int64))
    tok_seconds = time.perf_counter() - t0
    corpus.update(train_tokens=len(train_tokens), held_out_tokens=len(held_tokens))
    log(
        "teacher",
        f"tokenizer ({len(tokenizer)} tokens) and tokenization: {tok_seconds:.1f} s, "
        f"{len(train_tokens):,} train tokens",
    )

    model = gpt2(
        len(tokenizer),
        n_positions=settings.n_positions,
        n_layer=settings.n_layer,
        n_embd=settings.n_embd,
        n_head=settings.n_head,
        eos_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
    )
    params = sum(p.numel() for p in model.parameters())
    log("teacher", f"model: {params:,} parameters")
    autocast = choose_autocast(settings, model, train_tokens)
    log("teacher", f"training with bf16 autocast: {autocast['bf16']}")
    stats = train_model(model, train_tokens, settings, autocast["bf16"])
    log(
        "teacher",
        f"trained {stats['steps']} steps, {stats['tokens_seen']:,} tokens "
        f"in {stats['train_seconds']:.0f} s",
    )

    windows = eval_windows(held_tokens, settings.eval_windows, settings.n_positions)
    metrics = evaluate(model, windows)
    log("teacher", f"held-out loss {metrics['held_out_loss']:.3f} nats/token")

    save_teacher(model, tokenizer, out_dir, settings.save_dtype)
    roundtrip = verify_saved(out_dir, model, windows[:4])
    report = {
        "settings": settings.cache_key(),
        "metrics": metrics,
        "training": {**stats, "bf16_autocast": autocast, "tokenizer_seconds": tok_seconds},
        "model": {"parameters": params, "vocab_size": len(tokenizer)},
        "corpus": corpus,
        "reload_check": roundtrip,
        "torch_threads": torch.get_num_threads(),
        "command": shlex.join(argv),
    }
    # report.json is written last so its presence marks a complete, verified teacher.
    report["directory_bytes"] = directory_bytes(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_teacher(out_dir: str | Path | None = None, force: bool = False, **settings: Any) -> Path:
    """Return a directory holding a trained teacher for ``settings``, training it if needed.

    Keyword arguments are :class:`TeacherSettings` fields; the result loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    config = TeacherSettings(**settings)
    path = Path(out_dir) if out_dir is not None else default_out_dir(config)
    if not force and cached_report(path, config) is not None:
        return path
    argv = [sys.argv[0], *(f"--{k}={v}" for k, v in settings.items())]
    train_teacher(config, path, argv)
    return path


def study_teacher(quick: bool, scratch: Path, sharp: bool = False) -> Path:
    """A teacher of tradeoff.py and methods.py: the cached :data:`STUDY_TEACHER` or, with
    ``sharp``, :data:`SHARP_TEACHER` (trained the first time they are asked for); for a
    --quick run a :data:`QUICK_TEACHER` trained afresh into ``scratch`` (on the sharp
    teacher's text when ``sharp``)."""
    if quick:
        corpus = "hf-modeling" if sharp else "stdlib"
        return ensure_teacher(scratch / f"quick-teacher-{corpus}", **QUICK_TEACHER, corpus=corpus)
    return ensure_teacher(**(SHARP_TEACHER if sharp else STUDY_TEACHER))
