"""The journal of ``logitstore generate``: finished batches are appended to
``OUT.generating.jsonl`` as they complete, so an interrupted run resumes where it stopped and
gives the store an uninterrupted run gives. Under torchrun rank ``r > 0`` appends to its own
``OUT.generating.rank<r>.jsonl`` (one writer per file); a resumed run, with any number of
ranks, reads them all."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ResumeMismatchError
from ..format.storage import is_object_url, store_path
from .teacher import Teacher

__all__ = [
    "JOURNAL_VERSION",
    "journal_entry",
    "journal_key",
    "journal_path",
    "journal_paths",
    "read_journal",
]


JOURNAL_VERSION = 1


def _beside(out: str | os.PathLike[str]) -> Path:
    """The local path journals sit beside: the store's directory, or, for a store in object
    storage (where a file cannot be appended to), a name in ``LOGITSTORE_JOURNAL_DIR``
    (default ``~/.cache/logitstore/journals``) derived from the URL."""
    if not is_object_url(out):
        return Path(out)
    url = str(store_path(out))
    default = Path.home() / ".cache" / "logitstore" / "journals"
    base = Path(os.environ.get("LOGITSTORE_JOURNAL_DIR") or default)
    return base / f"{url.rsplit('/', 1)[-1]}.{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def journal_path(out: str | os.PathLike[str], rank: int = 0) -> Path:
    """Where :func:`generate` (or its torchrun rank ``rank``) keeps the completions of an
    unfinished run."""
    out = _beside(out)
    tail = "" if rank == 0 else f".rank{rank}"
    return out.parent / f"{out.name}.generating{tail}.jsonl"


def journal_paths(out: str | os.PathLike[str]) -> list[Path]:
    """Every journal of an unfinished run at ``out`` (one per rank that wrote one)."""
    out = _beside(out)
    ranks = sorted(out.parent.glob(f"{glob.escape(out.name)}.generating.rank*.jsonl"))
    return [p for p in [journal_path(out), *ranks] if p.exists()]


def journal_key(
    generation: dict[str, Any], teacher: Teacher, vocab_hash: str, prompt_ids: list[list[int]]
) -> str:
    h = hashlib.sha256()
    settings = {**generation, "teacher": teacher.provenance(), "tokenizer": vocab_hash}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(prompt_ids).encode())
    return "sha256:" + h.hexdigest()


def read_journal(
    path: Path, key: str, batch_rows: list[int], *, discard_other: bool
) -> dict[int, list[list[int]]]:
    """The batches an earlier, interrupted run finished. A torn last line (the run was killed
    while writing it) is cut off. A journal of another run is an error, or with
    ``discard_other`` (``--overwrite``) deleted."""
    if not path.exists():
        return {}
    done: dict[int, list[list[int]]] = {}
    good = 0  # bytes of whole, valid lines
    with path.open("rb") as f:
        for n, line in enumerate(f):
            if not line.endswith(b"\n"):
                break
            try:
                obj = json.loads(line)
            except ValueError:
                break
            if n == 0:
                if not isinstance(obj, dict) or obj.get("key") != key:
                    if discard_other:
                        path.unlink()
                        return {}
                    raise ResumeMismatchError(
                        f"{str(path)!r} holds completions of an interrupted run with other "
                        "prompts, teacher or settings (or is not a journal of logitstore "
                        "generate); rerun that command to finish it, or pass --overwrite to "
                        "start again"
                    )
            else:
                b, got = journal_entry(obj, batch_rows)
                if b is None:
                    raise ResumeMismatchError(
                        f"{str(path)!r} line {n + 1} is not a batch of this run's completions "
                        "(the journal was edited or damaged); delete it, or pass --overwrite, "
                        "to generate again"
                    )
                done[b] = got
            good += len(line)
    if good == 0:
        path.unlink()
        return {}
    with path.open("r+b") as f:
        f.truncate(good)
    return done


def journal_entry(obj: Any, batch_rows: list[int]) -> tuple[int | None, list[list[int]]]:
    """``(batch, completions)`` of a journal line, or ``(None, [])`` if it is malformed."""
    if not isinstance(obj, dict):
        return None, []
    b, got = obj.get("batch"), obj.get("completions")
    if not isinstance(b, int) or not 0 <= b < len(batch_rows) or not isinstance(got, list):
        return None, []
    if len(got) != batch_rows[b] or not all(
        isinstance(c, list) and all(isinstance(t, int) for t in c) for c in got
    ):
        return None, []
    return b, got
