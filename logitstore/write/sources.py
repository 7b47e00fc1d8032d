"""Where input records come from: JSON lines, Parquet files and Hugging Face datasets on disk.

Every source is read a batch of records at a time, so an input larger than memory streams
through: JSON lines line by line, Parquet one row group at a time through a buffered reader
(only the text and messages columns), a ``save_to_disk`` dataset through its memory-mapped
Arrow files, and a directory of data files through ``datasets.load_dataset(...,
streaming=True)``. A record is a document (a string in the text field) or a conversation
(the value of the messages field, checked by :mod:`.chat`); it carries where it came from,
``file:line`` or ``file row N`` (rows count from 0), for error messages.

``pyarrow`` and ``datasets`` are an optional extra (``pip install 'logitstore[data]'``),
imported only when a Parquet file or a dataset directory is read.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["SUPPORTED", "Fields", "Record", "count_records", "read_records", "read_text"]

#: what ``--data``/``--prompts`` accept, for error messages
SUPPORTED = (
    ".txt (one document), .jsonl (one JSON object per line), .parquet, or a directory: a "
    "Hugging Face dataset saved with save_to_disk, or data files datasets.load_dataset reads"
)

_PARQUET_BUFFER = 1 << 20  # bytes read at a time: a row group is never read whole


@dataclass(frozen=True)
class Fields:
    """The names of the fields (columns) that hold a record's text and its messages."""

    text: str = "text"
    messages: str = "messages"

    def hint(self) -> str:
        return f"a string {self.text!r} field or a {self.messages!r} list of messages"


@dataclass(frozen=True)
class Record:
    """One input record: a document (``text``) or a conversation (``messages``, unchecked).
    A record with a non-null messages value is a conversation, whatever its text field."""

    text: str | None
    messages: Any
    where: str  # "file:line" or "file row N", for error messages


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``, or :class:`InputError` naming ``what`` it was to be."""
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}); re-encode it") from None


def read_records(
    path: str | os.PathLike[str],
    fields: Fields = Fields(),
    *,
    split: str | None = None,
    batch_rows: int = 1024,
) -> Iterator[list[Record]]:
    """The records of a ``.jsonl`` or ``.parquet`` file or a dataset directory, in batches
    of at most ``batch_rows``, in file order.

    Raises:
        InputError: a missing or unsupported path; a line that is not a JSON object; a
            source with neither field (the fields it has are named); a record whose fields
            are both null, or whose text is not a string; a missing extra (``pyarrow``,
            ``datasets``); an unknown or ambiguous ``split``.
    """
    path = Path(path)
    if path.is_dir():
        yield from _dataset_dir(path, fields, split, batch_rows)
    elif not path.exists():
        raise InputError(f"input {str(path)!r} does not exist")
    elif path.suffix == ".jsonl":
        yield from _jsonl(path, fields, batch_rows)
    elif path.suffix == ".parquet":
        yield from _parquet(path, fields, batch_rows)
    else:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected {SUPPORTED}")


def count_records(path: str | os.PathLike[str], split: str | None = None) -> int | None:
    """The number of records when it is cheap to know (Parquet metadata, a saved dataset),
    else ``None``: for progress bars only."""
    path = Path(path)
    try:
        if path.suffix == ".parquet" and path.is_file():
            return int(_require("pyarrow.parquet", path).ParquetFile(path).metadata.num_rows)
    except Exception:  # a progress total is never worth an error: reading reports it
        return None
    return None


def _require(module: str, path: Path) -> Any:
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise InputError(
            f"{path}: reading it needs the {top!r} package, which is not installed; install "
            "logitstore's data extra: pip install 'logitstore[data]'"
        ) from None


def _missing_fields(where: str, fields: Fields, found: list[str]) -> InputError:
    listed = ", ".join(repr(f) for f in found) or "none"
    return InputError(
        f"{where}: expected {fields.hint()}; found fields {listed}. Name the right ones with "
        "--text-field/--messages-field"
    )


def _record(where: str, text: Any, messages: Any, fields: Fields) -> Record:
    if messages is not None:
        return Record(None, messages, where)
    if isinstance(text, str):
        return Record(text, None, where)
    if text is None:
        raise InputError(
            f"{where}: both {fields.text!r} and {fields.messages!r} are null; give the "
            "record a text or messages, or remove it"
        )
    raise InputError(f"{where}: {fields.text!r} is {type(text).__name__}, not a string")


# -- JSON lines ------------------------------------------------------------------------------


def _jsonl(path: Path, fields: Fields, batch_rows: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    blank = True
    with path.open("rb") as f:
        # Binary lines split on b"\n" only: str.splitlines() would also split on U+2028 and
        # friends, which JSON strings may hold unescaped.
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{where}: not valid UTF-8 text (byte {e.start} of the line); re-encode it"
                ) from None
            if not line.strip():
                continue
            blank = False
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one object "
                    f"per line, like {json.dumps({fields.text: '...'})}"
                ) from None
            except RecursionError:
                raise InputError(
                    f"{where}: the JSON is nested too deeply to read; expected one flat object "
                    f"per line, like {json.dumps({fields.text: '...'})}"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{where}: expected a JSON object with {fields.hint()}, found "
                    f"{type(obj).__name__}"
                )
            text, messages = obj.get(fields.text), obj.get(fields.messages)
            if text is None and messages is None:
                raise _missing_fields(where, fields, list(obj))
            batch.append(_record(where, text, messages, fields))
            if len(batch) == batch_rows:
                yield batch
                batch = []
    if blank:
        raise InputError(
            f"{path}: no JSON lines found (the file is empty); expected one object with "
            f"{fields.hint()} per line"
        )
    if batch:
        yield batch


# -- Arrow: Parquet and datasets -------------------------------------------------------------


def _columns(where: str, names: list[str], fields: Fields) -> tuple[str | None, str | None]:
    """Which of the text and messages columns a source has; an error naming its columns
    when it has neither."""
    text = fields.text if fields.text in names else None
    messages = fields.messages if fields.messages in names else None
    if text is None and messages is None:
        raise _missing_fields(where, fields, names)
    return text, messages


def _check_types(path: Path, schema: Any, text: str | None, messages: str | None) -> None:
    import pyarrow as pa

    if text is not None:
        t = schema.field(text).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InputError(f"{path}: column {text!r} holds {t}, not strings")
    if messages is not None:
        t = schema.field(messages).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_null(t)):
            raise InputError(f"{path}: column {messages!r} holds {t}, not lists of messages")


def _arrow_batch(
    path: Path, batch: Any, text: str | None, messages: str | None, fields: Fields, row: int
) -> list[Record]:
    """Records of one Arrow record batch (or table) whose first row is row ``row``."""
    n = batch.num_rows
    texts = batch.column(text).to_pylist() if text is not None else [None] * n
    convs = batch.column(messages).to_pylist() if messages is not None else [None] * n
    return [
        _record(f"{path} row {row + i}", t, m, fields)
        for i, (t, m) in enumerate(zip(texts, convs, strict=True))
    ]


def _parquet(path: Path, fields: Fields, batch_rows: int) -> Iterator[list[Record]]:
    pq = _require("pyarrow.parquet", path)
    import pyarrow as pa

    try:
        # Buffered, not pre-buffered: a row group's column chunk is read a page at a time, so
        # memory stays at a few batches whatever the row group size (measured: 258 MB of
        # text in one row group streams with ~30 MB above the interpreter's baseline).
        f = pq.ParquetFile(path, buffer_size=_PARQUET_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    schema = f.schema_arrow
    text, messages = _columns(str(path), list(schema.names), fields)
    _check_types(path, schema, text, messages)
    columns = [c for c in (text, messages) if c is not None]
    row = 0
    try:
        for group in range(f.num_row_groups):
            for batch in f.iter_batches(
                batch_size=batch_rows, row_groups=[group], columns=columns, use_threads=False
            ):
                yield _arrow_batch(path, batch, text, messages, fields, row)
                row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read row {row} onwards ({e})") from None
    if row == 0:
        raise InputError(f"{path}: the Parquet file has no rows")


def _pick_split(path: Path, splits: dict[str, Any], split: str | None) -> Any:
    names = ", ".join(sorted(splits))
    if split is not None:
        if split not in splits:
            raise InputError(f"{path}: no split {split!r}; the dataset has {names}")
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise InputError(f"{path}: the dataset has several splits ({names}); choose one with --split")


def _dataset_dir(
    path: Path, fields: Fields, split: str | None, batch_rows: int
) -> Iterator[list[Record]]:
    datasets = _require("datasets", path)
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        if saved:  # save_to_disk: memory-mapped Arrow files, read in batches
            ds = datasets.load_from_disk(str(path))
        else:  # data files (json, parquet, csv, ...): streamed, nothing cached or converted
            ds = datasets.load_dataset(str(path), streaming=True)
    except (OSError, ValueError) as e:  # datasets raises these (and subclasses) for bad dirs
        raise InputError(
            f"{path}: not a dataset that datasets can read ({e}); expected {SUPPORTED}"
        ) from None
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        ds = _pick_split(path, dict(ds), split)
    names = ds.column_names
    if names is None:  # a streamed dataset whose files name no columns until read
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    text, messages = _columns(str(path), list(names), fields)
    ds = ds.select_columns([c for c in (text, messages) if c is not None])
    if saved:
        _check_types(path, ds.data.schema, text, messages)
        batches = ds.with_format("arrow").iter(batch_size=batch_rows)
    else:
        batches = ds.iter(batch_size=batch_rows)
    row = 0
    for batch in batches:
        if isinstance(batch, dict):  # a streamed dataset yields columns as lists
            n = len(next(iter(batch.values())))
            texts = batch.get(text, [None] * n) if text else [None] * n
            convs = batch.get(messages, [None] * n) if messages else [None] * n
            records = [
                _record(f"{path} row {row + i}", t, m, fields)
                for i, (t, m) in enumerate(zip(texts, convs, strict=True))
            ]
        else:
            records = _arrow_batch(path, batch, text, messages, fields, row)
        row += len(records)
        if records:
            yield records
    if row == 0:
        raise InputError(f"{path}: the dataset has no rows")
