"""The benchmarks' text: source code that every machine with the benchmark environment has on
disk — the running interpreter's standard library (``stdlib``) or the installed transformers
package's model implementations (``hf-modeling``) — split into training and held-out files by
a hash of each path, and the byte-level BPE trained on it.

No download is needed. The split hashes each file's path relative to the source's root, so
it is the same on every machine with the same Python (or transformers) version and
independent of file order. ``hf-modeling`` is the predictable text of the study's sharp
teacher: the ``modeling_*.py`` files are written to a shared pattern (many are generated from
one another), so a small model trained for minutes on a CPU reaches the low entropies of
production teachers on natural text, which ``stdlib`` at the same budget does not.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EOS_TOKEN = "<|endoftext|>"
# One in twenty files (~5 %) is held out; the threshold is in units of 1/10_000.
HELD_OUT_PER_10K = 500


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


#: The text sources: name → what it is (recorded in teacher reports).
SOURCES = {
    "stdlib": "python stdlib *.py",
    "hf-modeling": "transformers models/**/modeling_*.py",
}


def source_root(source: str = "stdlib") -> Path:
    """Root directory of a text source's files."""
    if source == "stdlib":
        return stdlib_root()
    if source == "hf-modeling":
        import transformers

        return Path(transformers.__file__).parent / "models"
    raise ValueError(f"unknown text source {source!r}; expected one of {sorted(SOURCES)}")


def source_version(source: str = "stdlib") -> str:
    """Version of the software whose files make up the source (the text changes with it)."""
    if source == "hf-modeling":
        import transformers

        return f"transformers {transformers.__version__}"
    return f"python {sysconfig.get_python_version()}"


def source_files(source: str = "stdlib", skip_tests: bool = False) -> list[Path]:
    """A source's files as paths relative to its root, sorted for determinism."""
    if source == "stdlib":
        return stdlib_files(skip_tests)
    root = source_root(source)
    return sorted((p.relative_to(root) for p in root.rglob("modeling_*.py")), key=Path.as_posix)


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


def _documents(held_out: bool, limit_files: int | None, skip_tests: bool, source: str) -> list[str]:
    root = source_root(source)
    chosen = [rel for rel in source_files(source, skip_tests) if is_held_out(rel) == held_out]
    if limit_files is not None:
        chosen = chosen[:limit_files]
    texts = (read_document(root / rel) for rel in chosen)
    return [text for text in texts if text.strip()]


def train_documents(
    limit_files: int | None = None, skip_tests: bool = False, source: str = "stdlib"
) -> list[str]:
    """Texts of the training split (~95 % of the source's files), in sorted path order."""
    return _documents(False, limit_files, skip_tests, source)


def held_out_documents(
    limit_files: int | None = None, skip_tests: bool = False, source: str = "stdlib"
) -> list[str]:
    """Texts of the held-out split (~5 % of stdlib files), in sorted path order; empty
    files are left out (``limit_files`` counts them)."""
    return _documents(True, limit_files, skip_tests, source)


def export_held_out(path: Path, max_docs: int | None, skip_tests: bool = False) -> int:
    """Write held-out documents as JSON lines ``{"text": ...}``; returns the count written."""
    docs = held_out_documents(limit_files=max_docs, skip_tests=skip_tests)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in docs:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return len(docs)


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
