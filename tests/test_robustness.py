"""Faults at awkward moments: creation, a damaged leftover, a failing disk, hand-edited
metadata, rows that do not fit the store. Each is named, nothing half-written looks complete."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import logitstore
from logitstore import Encoding
from logitstore.cli import main
from logitstore.write.encode import encode_rows

from .conftest import dies_at_call

VOCAB = 40
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)) * 3


def _teacher() -> logitstore.Teacher:
    return logitstore.Teacher(
        fn=lambda ids, mask: TABLE[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )


SEQS = logitstore.sequences_from_token_ids([np.arange(300) % VOCAB], 20)  # 15 sequences
ENC = Encoding("topk", "u8", k=5)
SIZES = {"chunk_positions": 16, "shard_positions": 64}  # 5 shards, the last one short


def _capture(out: Path, teacher: logitstore.Teacher | None = None) -> Path:
    return logitstore.capture(
        teacher or _teacher(), SEQS, out, ENC, batch_size=1, progress=False, **SIZES
    )


def test_crash_during_creation_leaves_nothing_that_looks_like_a_store(tmp_path, monkeypatch):
    real = zarr.create_array  # what format/storage.py creates every array with

    def dies_at_commits(store, *, name=None, **kw):  # type: ignore[no-untyped-def]
        if name == "commits":
            raise OSError("killed while creating")
        return real(store, name=name, **kw)

    monkeypatch.setattr(zarr, "create_array", dies_at_commits)
    with pytest.raises(OSError, match="killed while creating"):
        _capture(tmp_path / "s")
    assert not (tmp_path / "s").exists()
    monkeypatch.undo()
    _capture(tmp_path / "s")  # the same call simply starts again
    assert logitstore.verify(tmp_path / "s").ok
    # No temporary directory left; the writer's flock file (write/lock.py) stays by design:
    # unlinking it would let a second job lock a new file while the first holds the old one.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]


def test_damaged_uncommitted_shard_is_rewritten_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):
        _capture(out, dies_at_call(_teacher(), 14))  # 13 sequences of 20 = 260 positions: 4 shards
    store = logitstore.open(out, allow_incomplete=True)
    assert store.committed().tolist() == [True, True, True, True, False]
    last = out / "values" / "c" / "4" / "0"
    last.parent.mkdir(parents=True, exist_ok=True)  # as a killed write can leave it
    last.write_bytes(b"garbage from an interrupted write")
    _capture(out)
    assert logitstore.verify(out).ok
    reference = _capture(tmp_path / "ref")
    a, b = logitstore.open(out).read(0, 300), logitstore.open(reference).read(0, 300)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_failing_disk_is_reported_with_its_cause(tmp_path: Path, monkeypatch) -> None:
    real = zarr.Array.__setitem__
    writes = []

    def disk_full(self, key, value):  # type: ignore[no-untyped-def]
        if self.path == "values":
            writes.append(1)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", disk_full)
    with pytest.raises(logitstore.LogitStoreError, match="No space left on device"):
        _capture(tmp_path / "s")
    monkeypatch.undo()
    assert logitstore.open(tmp_path / "s", allow_incomplete=True).committed().sum() == 1
    _capture(tmp_path / "s")  # and the same call resumes once there is space
    assert logitstore.verify(tmp_path / "s").ok


def test_rows_of_another_encoding_are_refused(tmp_path: Path) -> None:
    logits = TABLE[torch.from_numpy(SEQS.input_ids)]
    wrong = encode_rows(logits, Encoding("topk", "fp32", k=5), 0, torch.arange(300))
    writer = logitstore.StoreWriter(
        tmp_path / "s",
        encoding=ENC,
        vocab_size=VOCAB,
        input_ids=SEQS.input_ids,
        offsets=SEQS.offsets,
    )
    refused = pytest.raises(logitstore.LogitStoreError, match="encode with the store's encoding")
    with refused, writer:
        writer.write(0, wrong)
    with pytest.raises(logitstore.IncompleteStoreError):
        logitstore.open(tmp_path / "s")


def test_closing_a_writer_before_every_shard_is_written_leaves_it_resumable(tmp_path: Path) -> None:
    logits = TABLE[torch.from_numpy(SEQS.input_ids)]
    writer = logitstore.StoreWriter(
        tmp_path / "s",
        encoding=ENC,
        vocab_size=VOCAB,
        input_ids=SEQS.input_ids,
        offsets=SEQS.offsets,
        shard_positions=100,
        chunk_positions=50,
    )
    with pytest.raises(logitstore.IncompleteStoreError, match=r"2 shard\(s\) not written"), writer:
        writer.write(0, encode_rows(logits[:100], ENC, 0, torch.arange(100)))
    store = logitstore.open(tmp_path / "s", allow_incomplete=True)
    assert store.committed().tolist() == [True, False, False]


@pytest.fixture()
def complete(tmp_path: Path) -> Path:
    return _capture(tmp_path / "s")


def test_reader_refuses_a_missing_shard_file_instead_of_returning_zeros(complete: Path) -> None:
    (complete / "values" / "c" / "1" / "0").unlink()
    store = logitstore.open(complete)
    store.read(0, 64)  # shard 0 is intact
    with pytest.raises(logitstore.CorruptStoreError, match=r"shard 1 .* missing"):
        store.read(60, 70)


@pytest.mark.parametrize("damage", ["offsets", "commits", "array-metadata"])
def test_damaged_small_arrays_and_metadata_are_named_not_tracebacks(complete, capsys, damage):
    if damage == "array-metadata":
        (complete / "values" / "zarr.json").write_text("{ not json")
    else:
        chunk = complete / damage / "c" / "0"
        data = bytearray(chunk.read_bytes())
        data[0] ^= 0xFF
        chunk.write_bytes(bytes(data))
    if damage != "commits":  # a complete store trusts its state and never reads commits
        with pytest.raises(logitstore.CorruptStoreError):
            logitstore.open(complete)
    assert not logitstore.verify(complete).ok
    for cmd in (["verify", str(complete), "--no-progress"], ["info", str(complete)]):
        code = main(cmd)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        if damage != "commits" or cmd[0] == "verify":
            assert code != 0


def test_hand_edited_metadata_that_contradicts_the_arrays_is_refused(complete: Path) -> None:
    meta = json.loads((complete / "zarr.json").read_text())
    meta["attributes"]["logitstore"]["encoding"]["values"] = "fp32"
    (complete / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(logitstore.FormatError, match="do not match the encoding"):
        logitstore.open(complete)


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    docs = logitstore.read_documents([path])
    assert [d.text for d in docs] == ["a\u2028b\x85c"]


def test_cli_refuses_a_complete_store_before_loading_the_teacher(complete, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("some text")
    argv = [
        "write",
        "--teacher",
        str(tmp_path / "no-such-teacher"),
        "--data",
        str(data),
        "--out",
        str(complete),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err  # not "cannot load teacher"
    assert main([*argv[:-2], "--shard-positions", "0", "--device", "cpu"]) == 2
    assert "--shard-positions (0) must be a positive multiple" in capsys.readouterr().err


def test_ids_decoded_past_the_vocabulary_are_refused(complete: Path) -> None:
    ids = zarr.open_array(str(complete / "ids"), mode="r+")
    row = ids[70:71]
    row[0, -1] = VOCAB  # a gap that carries the last id past the vocabulary, checksums intact
    ids[70:71] = row
    store = logitstore.open(complete)
    store.read(0, 64)  # other shards are fine
    with pytest.raises(logitstore.CorruptStoreError, match="outside the vocabulary"):
        store.read(64, 128)
    assert any("position 70" in f and "vocabulary" in f for f in logitstore.verify(complete).faults)
