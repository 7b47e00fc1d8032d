"""Train a small GPT-2 teacher on the Python standard library's source, fully offline.

No model hub is reachable from the machines this project is developed and benchmarked on, yet
benchmarks need *realistic* teacher distributions (a random model's are either flat or, once
scaled, peaked in unrealistic ways). Every machine that runs Python has the standard library's
source on disk, so this module trains a byte-level BPE tokenizer and a small
``GPT2LMHeadModel`` on it, evaluates the distributions on held-out files, and saves a directory
that loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any hub model.

Use it as a script (``python benchmarks/teacher.py --help``) or import it::

    from benchmarks.teacher import ensure_teacher, held_out_documents

    teacher_dir = ensure_teacher(vocab_size=4096, n_layer=4, n_embd=128, n_head=4, minutes=5)
    texts = held_out_documents(limit_files=20)

The train / held-out split is a hash of each file's path relative to the stdlib root, so it is
the same on every machine with the same Python version and independent of file order.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Bump when the training recipe changes in a way that makes cached teachers stale.
FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
# One in twenty files (~5 %) is held out; the threshold is in units of 1/10_000.
HELD_OUT_PER_10K = 500
EVAL_TEMPERATURES = (1.0, 0.7, 0.5)
EVAL_TOP_K = 64
LOG_EVERY_S = 20.0
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = REPO_ROOT / "benchmarks" / ".cache"


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

    def __post_init__(self) -> None:
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
    return CACHE_ROOT / name


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for the printed report."""
    print(f"[teacher {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Corpus: the standard library's *.py files
# --------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(skip_tests: bool = False) -> list[Path]:
    """All stdlib ``*.py`` files as paths relative to the root, sorted for determinism.

    ``site-packages`` is skipped because it holds whatever third-party packages happen to be
    installed, which would make the corpus differ between machines.
    """
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        if skip_tests and any(part in ("test", "tests", "idle_test") for part in rel.parts):
            continue
        files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def is_held_out(rel_path: Path) -> bool:
    """Deterministic split: hash the POSIX relative path, hold out ~5 % of files."""
    digest = hashlib.sha256(rel_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < HELD_OUT_PER_10K


def read_document(path: Path) -> str:
    """Read a file as text, dropping bytes that are not valid UTF-8.

    The stdlib deliberately contains files in other encodings (test data for the codec
    machinery); decoding leniently keeps them as mostly-valid text instead of crashing.
    """
    try:
        return path.read_bytes().decode("utf-8", errors="ignore")
    except OSError:  # unreadable file (permissions, vanished): treat as empty
        return ""


def _documents(held_out: bool, limit_files: int | None, skip_tests: bool) -> list[str]:
    root = stdlib_root()
    chosen = [rel for rel in stdlib_files(skip_tests) if is_held_out(rel) == held_out]
    if limit_files is not None:
        chosen = chosen[:limit_files]
    texts = (read_document(root / rel) for rel in chosen)
    return [text for text in texts if text.strip()]


def train_documents(limit_files: int | None = None, skip_tests: bool = False) -> list[str]:
    """Texts of the training split (~95 % of stdlib files), in sorted path order."""
    return _documents(False, limit_files, skip_tests)


def held_out_documents(limit_files: int | None = None, skip_tests: bool = False) -> list[str]:
    """Texts of the held-out split (~5 % of stdlib files), in sorted path order."""
    return _documents(True, limit_files, skip_tests)


def export_held_out(path: Path, max_docs: int | None, skip_tests: bool = False) -> int:
    """Write held-out documents as JSON lines ``{"text": ...}``; returns the count written."""
    docs = held_out_documents(limit_files=max_docs, skip_tests=skip_tests)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in docs:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return len(docs)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    Trained from an iterator of already-decoded strings: ``Tokenizer.train(files)`` reads
    files as strict UTF-8 and fails on the stdlib's deliberately mis-encoded files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: code is whitespace-sensitive and must round-trip exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seeding all 256 byte symbols guarantees any input is encodable (no unknown tokens).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter(texts), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1_000_000,  # windows are cut by the caller, not the tokenizer
    )


def tokenize_corpus(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Concatenate all documents into one id stream, each document followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    # The Rust backend batches across threads; the Python wrapper per text would be slower.
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts))
    pieces = []
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


def build_model(settings: TeacherSettings, vocab_size: int, eos_id: int) -> Any:
    """A GPT-2 built from config only (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        # Dropout only slows a model this small that sees each token roughly once.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def sample_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> Any:
    """``batch`` random windows of ``length`` tokens from the stream (seeded generator)."""
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=gen)
    return tokens[starts[:, None] + torch.arange(length)]


def autocast_ctx(use_bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU, or a no-op."""
    if use_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_time(model: Any, batch: torch.Tensor, use_bf16: bool) -> float:
    """Seconds of one forward+backward (gradients discarded, weights untouched)."""
    start = time.perf_counter()
    with autocast_ctx(use_bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def choose_autocast(settings: TeacherSettings, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Decide on bf16 autocast; in ``auto`` mode time both and keep the faster.

    bf16 is only faster on CPUs with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere it
    emulates and is slower, so measure instead of guessing. A separate generator keeps the
    measurement from perturbing the training data order.
    """
    if settings.autocast != "auto":
        return {"bf16": settings.autocast == "bf16", "measured": None}
    gen = torch.Generator().manual_seed(settings.seed + 1)
    batch = sample_windows(tokens, settings.batch_size, settings.n_positions, gen)
    for use_bf16 in (False, True):  # warm up kernels and the allocator for both paths
        train_step_time(model, batch, use_bf16)
    # Interleave the two and keep each one's minimum: on a shared 2-core machine, other
    # processes stall torch's threads for whole steps, and the minimum is the least noisy.
    fp32_s = bf16_s = math.inf
    for _ in range(4):
        fp32_s = min(fp32_s, train_step_time(model, batch, use_bf16=False))
        bf16_s = min(bf16_s, train_step_time(model, batch, use_bf16=True))
    log(f"forward+backward per step: fp32 {fp32_s * 1e3:.0f} ms, bf16 {bf16_s * 1e3:.0f} ms")
    return {"bf16": bf16_s < fp32_s, "measured": {"fp32_s": fp32_s, "bf16_s": bf16_s}}


def lr_at(settings: TeacherSettings, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` over ``progress`` in [0, 1].

    Progress is driven by whichever budget (steps or wall time) runs out first, so a
    time-budgeted run still ends its schedule at the low learning rate.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: Any, settings: TeacherSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def train_model(
    model: Any, tokens: torch.Tensor, settings: TeacherSettings, use_bf16: bool
) -> dict[str, Any]:
    """Train until the step or time budget is spent; returns training statistics."""
    optimizer = make_optimizer(model, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    budget_s, max_steps = settings.time_budget_s, settings.steps
    model.train()
    step, tokens_seen, ema_loss = 0, 0, float("nan")
    start = last_log = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(
            step / max_steps if max_steps else 0.0, elapsed / budget_s if budget_s else 0.0
        )
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, step, progress)
        batch = sample_windows(tokens, settings.batch_size, settings.n_positions, gen)
        with autocast_ctx(use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        value = loss.item()
        ema_loss = value if math.isnan(ema_loss) else 0.95 * ema_loss + 0.05 * value
        now = time.perf_counter()
        if now - last_log >= LOG_EVERY_S:
            last_log = now
            rate = tokens_seen / (now - start)
            lr = optimizer.param_groups[0]["lr"]
            log(f"step {step}  {rate:,.0f} tok/s  loss {ema_loss:.3f}  lr {lr:.2e}")
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": seconds,
        "tokens_per_second": tokens_seen / seconds if seconds else 0.0,
        "final_train_loss_ema": ema_loss,
    }


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def eval_windows(tokens: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows spread evenly over the held-out stream.

    Fixed positions (no randomness) so that evaluations of different teachers compare.
    """
    available = len(tokens) // length
    if available == 0:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window")
    picks = np.linspace(0, available - 1, num=min(count, available)).round().astype(np.int64)
    return torch.stack([tokens[i * length : (i + 1) * length] for i in picks])


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """Held-out loss plus entropy and top-k mass of the predictive distributions.

    Runs in fp32 without autocast: these numbers characterise the saved teacher, and bf16
    rounding would blur the entropies being measured.
    """
    nll_sum, count = 0.0, 0
    entropy_sum = dict.fromkeys(EVAL_TEMPERATURES, 0.0)
    topk_sum = dict.fromkeys(EVAL_TEMPERATURES, 0.0)
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits.float()[:, :-1]
        targets = batch[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(-1, targets[..., None]).sum().item()
        count += targets.numel()
        for temp in EVAL_TEMPERATURES:
            logp_t = torch.log_softmax(logits / temp, dim=-1)
            probs = logp_t.exp()
            entropy_sum[temp] += -(probs * logp_t).sum().item()
            topk_sum[temp] += probs.topk(EVAL_TOP_K, dim=-1).values.sum().item()
    return {
        "held_out_loss": nll_sum / count,
        "held_out_tokens": count,
        "entropy": {str(t): entropy_sum[t] / count for t in EVAL_TEMPERATURES},
        f"top{EVAL_TOP_K}_mass": {str(t): topk_sum[t] / count for t in EVAL_TEMPERATURES},
    }


# --------------------------------------------------------------------------------------------
# Saving and verification
# --------------------------------------------------------------------------------------------


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
    ref = torch.log_softmax(model(input_ids=sample).logits.float(), dim=-1)
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


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


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


def corpus_info(train_texts: Sequence[str], held_texts: Sequence[str]) -> dict[str, Any]:
    """Where the text came from, so a report says which stdlib it was trained on."""
    return {
        "source": "python stdlib *.py",
        "stdlib": str(stdlib_root()),
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
    train_texts = train_documents(settings.limit_files, settings.skip_tests)
    held_texts = held_out_documents(settings.limit_files, settings.skip_tests)
    corpus = corpus_info(train_texts, held_texts)
    log(f"corpus: {corpus['train_docs']} train / {corpus['held_out_docs']} held-out files")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    train_tokens = torch.from_numpy(tokenize_corpus(tokenizer, train_texts).astype(np.int64))
    held_tokens = torch.from_numpy(tokenize_corpus(tokenizer, held_texts).astype(np.int64))
    tok_seconds = time.perf_counter() - t0
    corpus.update(train_tokens=len(train_tokens), held_out_tokens=len(held_tokens))
    log(
        f"tokenizer ({len(tokenizer)} tokens) and tokenization: {tok_seconds:.1f} s, "
        f"{len(train_tokens):,} train tokens"
    )

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model = build_model(settings, len(tokenizer), eos_id)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params:,} parameters")
    autocast = choose_autocast(settings, model, train_tokens)
    log(f"training with bf16 autocast: {autocast['bf16']}")
    stats = train_model(model, train_tokens, settings, autocast["bf16"])
    log(
        f"trained {stats['steps']} steps, {stats['tokens_seen']:,} tokens "
        f"in {stats['train_seconds']:.0f} s"
    )

    windows = eval_windows(held_tokens, settings.eval_windows, settings.n_positions)
    metrics = evaluate(model, windows)
    log(f"held-out loss {metrics['held_out_loss']:.3f} nats/token")

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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults mirror :class:`TeacherSettings`."""
    d = TeacherSettings()
    parser = argparse.ArgumentParser(
        description=(
            "Train a small GPT-2 teacher on the Python standard library's source (offline), "
            "evaluate its distributions on held-out files and save it as a Hugging Face model "
            "directory. A directory that already holds a report.json for the same settings "
            "is reused unless --force is given."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: benchmarks/.cache/teacher-v{vocab}-{layers}x{embd})",
    )
    add("--force", action="store_true", help="retrain even if a matching teacher exists")
    add("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    add("--n-layer", type=int, default=d.n_layer, help="transformer layers")
    add("--n-embd", type=int, default=d.n_embd, help="hidden size")
    add("--n-head", type=int, default=d.n_head, help="attention heads")
    add("--n-positions", type=int, default=d.n_positions, help="context / window length")
    add("--batch-size", type=int, default=d.batch_size, help="windows per step")
    add("--lr", type=float, default=d.lr, help="peak learning rate")
    add("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    add(
        "--minutes",
        type=float,
        default=None,
        help="training time budget (10 if neither --minutes nor --steps is given)",
    )
    add(
        "--steps",
        type=int,
        default=None,
        help="training step budget; with --minutes, whichever is reached first ends training",
    )
    add("--seed", type=int, default=d.seed, help="seed for init and window sampling")
    add(
        "--autocast",
        choices=("auto", "bf16", "off"),
        default=d.autocast,
        help="bf16 autocast; auto times both and uses the faster",
    )
    add(
        "--save-dtype",
        choices=("float16", "bfloat16", "float32"),
        default=d.save_dtype,
        help="dtype of the saved safetensors weights",
    )
    add("--eval-windows", type=int, default=d.eval_windows, help="held-out windows evaluated")
    add(
        "--limit-files",
        type=int,
        default=None,
        help="use only the first N files of each split (quick smoke runs)",
    )
    add("--skip-tests", action="store_true", help="leave out the stdlib's test packages")
    add(
        "--export-held-out",
        type=Path,
        metavar="FILE.jsonl",
        default=None,
        help='write held-out documents as JSON lines {"text": ...} and exit',
    )
    add("--max-docs", type=int, default=None, help="with --export-held-out: at most N documents")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TeacherSettings:
    """Pick the TeacherSettings fields out of parsed arguments."""
    names = {f.name for f in dataclasses.fields(TeacherSettings)}
    return TeacherSettings(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    """Script entry point."""
    args = parse_args(argv)
    full_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    if args.export_held_out is not None:
        count = export_held_out(args.export_held_out, args.max_docs, args.skip_tests)
        log(f"wrote {count} held-out documents to {args.export_held_out}")
        return 0
    settings = settings_from_args(args)
    out_dir = args.out if args.out is not None else default_out_dir(settings)
    report = None if args.force else cached_report(out_dir, settings)
    if report is not None:
        log(f"reusing trained teacher in {out_dir} (pass --force to retrain)")
    else:
        report = train_teacher(settings, out_dir, full_argv)
        log(f"saved teacher to {out_dir}")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
