"""Input data: documents from ``.txt``/``.jsonl`` files, tokenised and split into sequences.

A *sequence* is one teacher context: the distribution at a position depends only on
earlier positions of the same sequence. Documents longer than ``seq_len`` tokens are split
into consecutive sequences of at most ``seq_len`` tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "Document",
    "Sequences",
    "jsonl_strings",
    "read_documents",
    "read_text",
    "sequences_from_token_ids",
    "tokenize",
]


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "file" or "file:line", for error messages


@dataclass(frozen=True)
class Sequences:
    """Token ids of all sequences, concatenated, and their boundaries."""

    input_ids: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (S + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> list[Document]:
    """Read documents: a ``.txt`` file is one document; a ``.jsonl`` file holds one JSON
    object per line with a string ``text`` field (blank lines are skipped).

    Raises:
        InputError: a missing, empty or undecodable file, an unsupported suffix, or a JSONL
            line that is not an object with a string ``text`` (file and line named).
    """
    docs: list[Document] = []
    paths = list(paths)
    if not paths:
        raise InputError("no input files given: pass --data FILE.txt or FILE.jsonl")
    for path in map(Path, paths):
        raw = read_text(path, "input file")
        if not raw.strip():
            raise InputError(f"{path}: the file is empty; remove it from --data or add text")
        if path.suffix == ".txt":
            docs.append(Document(raw, str(path)))
        elif path.suffix == ".jsonl":
            docs.extend(Document(text, where) for text, where in jsonl_strings(path, raw, "text"))
        else:
            raise InputError(
                f"{path}: unsupported file type {path.suffix!r}; expected .txt (one document) "
                "or .jsonl (one JSON object with a 'text' field per line)"
            )
    return docs


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``, or :class:`InputError` naming ``what`` it was to be."""
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}); re-encode it") from None


def jsonl_strings(path: Path, raw: str, field: str) -> list[tuple[str, str]]:
    """``(value, "file:line")`` of the string ``field`` of each JSON line of ``raw`` (blank
    lines skipped, other fields ignored).

    Raises:
        InputError: a line that is not JSON, or not an object with a string ``field``, or no
            lines at all (file and line named).
    """
    out = []
    # Split on "\n" only: str.splitlines() also splits on U+2028 and friends, which JSON
    # strings may hold unescaped.
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one object "
                f"per line, like {json.dumps({field: '...'})}"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise InputError(
                f"{where}: expected a JSON object with a string {field!r} field, found "
                f"{type(obj).__name__}{f' without {field}' if isinstance(obj, dict) else ''}"
            )
        out.append((obj[field], where))
    if not out:
        raise InputError(f"{path}: no JSON lines found (one object with a {field!r} per line)")
    return out


def sequences_from_token_ids(
    documents: Sequence[Sequence[int] | np.ndarray],
    seq_len: int | None = None,
    sources: Sequence[str] | None = None,
) -> Sequences:
    """Split token-id documents into sequences of at most ``seq_len`` tokens.

    Raises:
        InputError: ``seq_len`` < 2, no documents, or a document shorter than 2 tokens (a
            single token has nothing after it to predict).
    """
    if seq_len is not None and seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    if len(documents) == 0:
        raise InputError("no documents to write")
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    for i, doc in enumerate(documents):
        ids = np.asarray(doc, dtype=np.int64).reshape(-1)
        if len(ids) < 2:
            where = sources[i] if sources is not None else f"document {i}"
            raise InputError(
                f"{where}: the document has {len(ids)} token(s); at least 2 are needed "
                "(one to read, one to predict). Remove it or give it more text"
            )
        step = seq_len or len(ids)
        for s in range(0, len(ids), step):
            piece = ids[s : s + step]
            pieces.append(piece)
            lengths.append(len(piece))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Sequences(np.concatenate(pieces), offsets)


def tokenize(documents: Sequence[Document], tokenizer: Any, seq_len: int | None) -> Sequences:
    """Tokenise documents with a Hugging Face tokenizer and split them into sequences."""
    texts = [d.text for d in documents]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return sequences_from_token_ids(encoded, seq_len, [d.source for d in documents])
