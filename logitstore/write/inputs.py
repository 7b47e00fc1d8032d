"""Input data: documents and conversations, tokenised and split into sequences.

A *sequence* is one teacher context: the distribution at a position depends only on
earlier positions of the same sequence. Documents longer than ``seq_len`` tokens are split
into consecutive sequences of at most ``seq_len`` tokens; so are conversations, and their
loss mask is split with them (it is computed over the whole conversation first, so the last
position of a piece predicts the first token of the next piece and counts when that token
is the assistant's).

:func:`read_sequences` streams any size of input (:mod:`.sources`): records are tokenised a
batch at a time and only their token ids are kept, as int32 arrays (4 bytes a token; a
Python list of ints costs ~36).
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import InputError
from .chat import ChatTemplate, TrainOn, check_messages
from .sources import Fields, Record, count_records, read_records, read_text

__all__ = [
    "Document",
    "Sequences",
    "read_documents",
    "read_sequences",
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
    """Token ids of all sequences, concatenated, their boundaries, and optionally which
    positions' predictions count for training."""

    input_ids: np.ndarray  # (N,) int64, or int32 from read_sequences
    offsets: np.ndarray  # (S + 1,) int64
    #: (N,) uint8: 1 where the next token is one a student learns (FORMAT.md §4), or None
    loss_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def split(self, seq_len: int | None) -> Sequences:
        """These sequences cut into consecutive pieces of at most ``seq_len`` tokens (the
        tokens and the mask are shared, only the offsets change).

        Raises:
            InputError: ``seq_len`` < 2.
        """
        if seq_len is None:
            return self
        if seq_len < 2:
            raise InputError(f"--seq-len must be at least 2, got {seq_len}")
        lengths = np.diff(self.offsets)
        pieces = -(-lengths // seq_len)  # (S,) pieces per sequence
        if (pieces == 1).all():
            return self
        first = np.cumsum(pieces) - pieces  # index of each sequence's first piece
        k = np.arange(int(pieces.sum())) - np.repeat(first, pieces)  # piece number within
        starts = np.repeat(self.offsets[:-1], pieces) + seq_len * k
        offsets = np.append(starts, self.offsets[-1]).astype(np.int64)
        return Sequences(self.input_ids, offsets, self.loss_mask)


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> list[Document]:
    """Read documents: a ``.txt`` file is one document; a ``.jsonl`` file holds one JSON
    object per line with a string ``text`` field (blank lines are skipped); a ``.parquet``
    file or a dataset directory a ``text`` column. For conversations and inputs larger than
    memory, use :func:`read_sequences`.

    Raises:
        InputError: a missing, empty or undecodable file, an unsupported suffix, or a record
            without a string ``text`` (file and line or row named).
    """
    docs: list[Document] = []
    for record in _records(_paths(paths), Fields(), None):
        if record.text is None:
            raise InputError(
                f"{record.where}: a conversation; read_documents reads text only: use "
                "read_sequences for messages"
            )
        docs.append(Document(record.text, record.where))
    return docs


def read_sequences(
    paths: Iterable[str | os.PathLike[str]],
    tokenizer: Any,
    seq_len: int | None = None,
    *,
    fields: Fields | None = None,
    split: str | None = None,
    train_on: TrainOn = "assistant",
    progress: bool = False,
    batch_rows: int = 1024,
) -> Sequences:
    """Tokenise documents and conversations from files and datasets (:mod:`.sources`) into
    sequences of at most ``seq_len`` tokens, streaming: only token ids are kept.

    A document is tokenised with ``add_special_tokens=True``; a conversation is rendered
    with the tokenizer's chat template (:class:`.chat.ChatTemplate`). When a conversation
    is read and ``train_on`` is not ``"all"``, the result has a ``loss_mask``: 1 at
    positions that predict a learned token (an assistant's; every token of a document).

    A document longer than :data:`MAX_DOCUMENT_CHARS` (16 Mi characters) is refused rather
    than tokenised: split it into several documents first.

    Raises:
        InputError: bad input, named by file and line or row, before anything is written
            (also: a document over the cap, or text with a lone surrogate).

    Example:
        >>> seqs = read_sequences(["chats.parquet"], tokenizer, 2048)
        >>> capture(teacher, seqs, "chat.zarr", enc, loss_mask=seqs.loss_mask)
    """
    if seq_len is not None and seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    paths = _paths(paths)
    totals = [count_records(p, split) if p.suffix != ".txt" else 1 for p in paths]
    known = None if None in totals else sum(t for t in totals if t is not None)
    builder = _Builder()
    chat: ChatTemplate | None = None
    with tqdm(
        total=known, unit="record", desc="tokenise", disable=not progress, dynamic_ncols=True
    ) as bar:
        for batch in _batches(paths, fields or Fields(), split, batch_rows):
            texts = [r for r in batch if r.text is not None]
            for r in texts:
                _check_text(r.text, r.where)
            encoded = iter(
                tokenizer([r.text for r in texts], add_special_tokens=True)["input_ids"]
                if texts
                else []
            )
            for r in batch:
                if r.text is not None:
                    builder.add(np.asarray(next(encoded), dtype=np.int64), None, r.where)
                    continue
                chat = chat or ChatTemplate(tokenizer)
                ids, learn = chat.encode(check_messages(r.messages, r.where), r.where, train_on)
                builder.add(ids, None if train_on == "all" else learn, r.where)
            bar.update(len(batch))
    return builder.finish().split(seq_len)


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
        _check_length(len(ids), sources[i] if sources is not None else f"document {i}")
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


# -- reading ---------------------------------------------------------------------------------


def _paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out = [Path(p) for p in paths]
    if not out:
        raise InputError("no input given: pass --data FILE.txt, FILE.jsonl, FILE.parquet or a DIR")
    return out


def _batches(
    paths: list[Path], fields: Fields, split: str | None, batch_rows: int
) -> Iterable[list[Record]]:
    for path in paths:
        if path.suffix == ".txt" and not path.is_dir():
            raw = read_text(path, "input file")
            if not raw.strip():
                raise InputError(f"{path}: the file is empty; remove it from --data or add text")
            yield [Record(raw, None, str(path))]
        else:
            yield from read_records(path, fields, split=split, batch_rows=batch_rows)


def _records(paths: list[Path], fields: Fields, split: str | None) -> Iterable[Record]:
    for batch in _batches(paths, fields, split, 1024):
        yield from batch


#: The longest document tokenised at once, in characters (docs: `logitstore write --help`).
#: A Rust tokenizer holds ~100 bytes per character while it works, and aborts the process
#: without a message when memory runs out (a 200 MB document did): longer ones are refused.
MAX_DOCUMENT_CHARS = 1 << 24


def _check_text(text: Any, where: str) -> None:
    """A document's text is tokenisable: not over :data:`MAX_DOCUMENT_CHARS`, and valid
    Unicode (JSON can escape a lone surrogate, which no UTF-8 tokenizer takes)."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InputError(
            f"{where}: the document has {len(text):,} characters; at most "
            f"{MAX_DOCUMENT_CHARS:,} are tokenised at once: split it into several documents "
            "(at paragraphs, functions or files): each is split into sequences anyway"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{where}: the text holds a lone surrogate (\\u{ord(text[e.start]):04x} at character "
            f"{e.start}), which is not valid Unicode; fix its JSON escape or drop the document"
        ) from None


def _check_length(n: int, where: str) -> None:
    if n < 2:
        raise InputError(
            f"{where}: the document has {n} token(s); at least 2 are needed "
            "(one to read, one to predict). Remove it or give it more text"
        )


#: tokens a buffer grows by (64 MB of int32). A buffer this large is its own memory map, so
#: growing it is a realloc that moves pages instead of copying them, and the ids never exist
#: twice (measured: gathering chunks and concatenating them at the end doubled the peak).
_GROW_TOKENS = 1 << 24


class _Builder:
    """Documents' token ids (and loss masks) appended to compact arrays as they come: ids
    as int32, masks as uint8, lengths as an int64 ``array``. Masks are kept only once a
    document has one (earlier documents are learned whole, so theirs are filled in from
    their lengths)."""

    def __init__(self) -> None:
        self._ids = _Growing(np.int32)
        self._masks: _Growing | None = None
        self._lengths = array("q")

    def add(self, ids: np.ndarray, learn: np.ndarray | None, where: str) -> None:
        """One document's ``ids`` ``(n,)`` and which tokens are learned (``None``: all)."""
        _check_length(len(ids), where)
        if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
            raise InputError(f"{where}: the tokenizer gave token ids outside [0, 2**31)")
        if learn is not None and self._masks is None:
            self._masks = _Growing(np.uint8)
            self._masks.add(_all_learned(np.frombuffer(self._lengths, dtype=np.int64)))
        self._ids.add(ids)
        if self._masks is not None:
            mask = np.zeros(len(ids), dtype=np.uint8)  # (n,) 1: position t predicts a learned token
            mask[:-1] = 1 if learn is None else learn[1:]
            self._masks.add(mask)
        self._lengths.append(len(ids))

    def finish(self) -> Sequences:
        if not self._lengths:
            raise InputError("no documents to write")
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self._lengths, dtype=np.int64), out=offsets[1:])
        masks = None if self._masks is None else self._masks.result()
        return Sequences(self._ids.result(), offsets, masks)


#: past this many entries (1 GiB of int32 ids) a buffer moves to an unlinked temporary file
#: (in ``$TMPDIR``) and the result is a copy-on-write memory map of it: a 10 GB Parquet
#: input's billions of token ids sit in the page cache, not in the process's own memory.
_SPILL_ENTRIES = 1 << 28


class _Growing:
    """A 1-D array appended to in place: grown ``_GROW_TOKENS`` at a time by realloc
    (``ndarray.resize``), cut to its length at the end. The peak is the result plus at
    most one step. Past ``_SPILL_ENTRIES`` entries it is appended to a temporary file
    instead, and :meth:`result` maps that file."""

    def __init__(self, dtype: Any) -> None:
        self._a = np.empty(0, dtype=dtype)
        self._n = 0
        self._file: Any = None

    def add(self, x: np.ndarray) -> None:
        need = self._n + len(x)
        if self._file is None and need > _SPILL_ENTRIES:
            # Unlinked at once; it lives as long as the buffer (and then the map) does.
            self._file = tempfile.TemporaryFile(prefix="logitstore-tokens-")  # noqa: SIM115
            self._file.write(self._a[: self._n].data)  # no copy: the buffer itself
            self._a = np.empty(0, dtype=self._a.dtype)
        if self._file is not None:
            self._file.write(np.ascontiguousarray(x, dtype=self._a.dtype).data)
            self._n = need
            return
        if need > len(self._a):  # nothing else refers to the buffer: resize in place
            self._a.resize(max(need, len(self._a) + _GROW_TOKENS), refcheck=False)
        self._a[self._n : need] = x
        self._n = need

    def result(self) -> np.ndarray:
        if self._file is not None:
            self._file.flush()
            # Copy-on-write ("c"): writable for torch.from_numpy, the file never changes.
            mapped = np.memmap(self._file, dtype=self._a.dtype, mode="c", shape=(self._n,))
            self._file.close()  # the map holds its own descriptor
            return mapped
        self._a.resize(self._n, refcheck=False)
        return self._a


def _all_learned(lengths: np.ndarray) -> np.ndarray:
    """The mask of documents of ``lengths`` whose every token is learned: 1 but at each
    document's last position (nothing follows it)."""
    mask = np.ones(int(lengths.sum()), dtype=np.uint8)
    mask[np.cumsum(lengths) - 1] = 0
    return mask
