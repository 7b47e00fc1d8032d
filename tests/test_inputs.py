"""Input sources: JSON lines, Parquet and datasets on disk give the same records, stream a
batch at a time, name the fields they found when the expected ones are missing, and give the
same sequences as the in-memory path for text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import logitstore
from logitstore.write.inputs import Sequences, read_sequences
from logitstore.write.sources import Fields, read_records

from .conftest import CORPUS

ROWS = [{"text": t, "id": i} for i, t in enumerate(CORPUS)]


def _records(path: Path, **kw: Any) -> list[tuple[str | None, Any]]:
    return [(r.text, r.messages) for b in read_records(path, **kw) for r in b]


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet, row_group_size=4)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
    ).save_to_disk(str(splits))
    files = tmp_path / "files"
    files.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), files / "part-0.parquet")
    return {"jsonl": jsonl, "parquet": parquet, "saved": saved, "splits": splits, "files": files}


def test_every_source_gives_the_same_records(sources: dict[str, Path]) -> None:
    want = [(r["text"], None) for r in ROWS]
    assert _records(sources["jsonl"]) == want
    assert _records(sources["parquet"]) == want
    assert _records(sources["saved"]) == want
    assert _records(sources["files"]) == want
    assert _records(sources["splits"], split="train") == want
    assert _records(sources["splits"], split="test") == want[:2]


def test_records_stream_in_batches(sources: dict[str, Path]) -> None:
    for kind in ("jsonl", "parquet", "saved", "files"):
        sizes = [len(b) for b in read_records(sources[kind], batch_rows=2)]
        assert sizes == [2, 2, 2], kind
    # a generator: a bad record late in a file is met only when reading gets there
    bad = sources["jsonl"].parent / "late.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + "not json\n")
    batches = read_records(bad, batch_rows=1)
    assert len(next(batches)) == 1
    with pytest.raises(logitstore.InputError, match=r"late\.jsonl:2: invalid JSON"):
        next(batches)


def test_missing_fields_are_named(sources: dict[str, Path]) -> None:
    fields = Fields(text="body", messages="chat")
    for kind in ("jsonl", "parquet", "saved", "files"):
        with pytest.raises(logitstore.InputError) as e:
            _records(sources[kind], fields=fields)
        msg = str(e.value)
        assert "'body'" in msg and "'chat'" in msg and "'text', 'id'" in msg, msg
        assert "--text-field" in msg
    # and named fields are read
    renamed = sources["jsonl"].parent / "renamed.jsonl"
    renamed.write_text(json.dumps({"body": "hello there"}) + "\n")
    assert _records(renamed, fields=fields) == [("hello there", None)]


def test_splits_must_be_chosen_and_exist(sources: dict[str, Path]) -> None:
    with pytest.raises(logitstore.InputError, match=r"several splits \(test, train\).*--split"):
        _records(sources["splits"])
    with pytest.raises(
        logitstore.InputError, match="no split 'valid'; the dataset has test, train"
    ):
        _records(sources["splits"], split="valid")


def test_bad_columns_and_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(logitstore.InputError, match="column 'text' holds int64, not strings"):
        _records(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(logitstore.InputError, match=r"null.parquet row 1: both 'text' and"):
        _records(tmp_path / "null.parquet")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(logitstore.InputError, match="not a readable Parquet file"):
        _records(tmp_path / "x.parquet")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(logitstore.InputError, match="no JSON lines found"):
        _records(tmp_path / "blank.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(logitstore.InputError, match=r"latin\.jsonl:2: not valid UTF-8"):
        _records(tmp_path / "latin.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(logitstore.InputError, match="empty_dir"):
        _records(tmp_path / "empty_dir")


def test_a_missing_extra_names_it(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "datasets", None)
    for kind in ("parquet", "saved"):
        with pytest.raises(logitstore.InputError, match=r"pip install 'logitstore\[data\]'"):
            _records(sources[kind])
    assert _records(sources["jsonl"])  # JSON lines need neither


def test_text_gives_the_sequences_of_the_in_memory_path(
    teacher: Any, sources: dict[str, Path]
) -> None:
    tok = teacher.tokenizer
    old = logitstore.tokenize(logitstore.read_documents([sources["jsonl"]]), tok, 16)
    for kind in ("jsonl", "parquet", "saved"):
        new = read_sequences([sources[kind]], tok, 16, batch_rows=4)
        assert new.input_ids.dtype == np.int32  # compact: 4 bytes a token
        assert np.array_equal(new.input_ids, old.input_ids)
        assert np.array_equal(new.offsets, old.offsets) and new.loss_mask is None
    txt = sources["jsonl"].parent / "one.txt"
    txt.write_text(CORPUS[0])
    both = read_sequences([txt, sources["parquet"]], tok)
    assert len(both) == 1 + len(CORPUS)


@pytest.mark.parametrize("seq_len", [2, 3, 7, 64])
def test_split_cuts_like_the_document_splitter(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 50, n) for n in rng.integers(2, 40, 25)]
    whole = logitstore.sequences_from_token_ids(docs)
    mask = rng.integers(0, 2, len(whole.input_ids)).astype(np.uint8)
    cut = Sequences(whole.input_ids, whole.offsets, mask).split(seq_len)
    want = logitstore.sequences_from_token_ids(docs, seq_len)
    assert np.array_equal(cut.offsets, want.offsets)
    assert cut.loss_mask is mask  # the mask is per position: cutting leaves it as it is
    with pytest.raises(logitstore.InputError, match="at least 2"):
        whole.split(1)


def test_token_ids_past_the_spill_size_are_a_map_of_a_temporary_file(
    teacher: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large input's ids go to disk (page cache), not the process's memory; the sequences
    # are the same, and a store written from them has the same bytes.
    from logitstore.write import inputs

    tok = teacher.tokenizer
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CORPUS))
    in_memory = read_sequences([path], tok, 24)
    monkeypatch.setattr(inputs, "_SPILL_ENTRIES", 50)
    spilled = read_sequences([path], tok, 24)
    assert isinstance(spilled.input_ids, np.memmap) and not isinstance(
        in_memory.input_ids, np.memmap
    )
    assert np.array_equal(spilled.input_ids, in_memory.input_ids)
    assert np.array_equal(spilled.offsets, in_memory.offsets)
    enc = logitstore.Encoding("none", "none")
    stores = []
    for name, seqs in (("mem", in_memory), ("map", spilled)):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        with logitstore.StoreWriter(
            tmp_path / name, encoding=enc, vocab_size=len(tok), input_ids=seqs.input_ids,
            offsets=seqs.offsets,
        ) as w:  # fmt: skip
            stores.append(w.path)
    files = [
        {str(p.relative_to(s)): p.read_bytes() for p in sorted(s.rglob("*")) if p.is_file()}
        for s in stores
    ]
    assert files[0] == files[1]


def test_a_line_nested_too_deeply_is_named(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(logitstore.InputError, match=r"deep.jsonl:2: the JSON is nested too deeply"):
        _records(path)
