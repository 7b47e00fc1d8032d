"""Integrity: damage anywhere in a store is detected and named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.cli import main


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    vocab = 64
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=gen) * 3

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return table[ids]

    teacher = logitstore.Teacher(fn=fn, vocab_size=vocab, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    seqs = logitstore.sequences_from_token_ids([rng.integers(0, vocab, 1000)], 100)
    return logitstore.capture(
        teacher,
        seqs,
        tmp_path / "s",
        Encoding("topk", "u8", k=8),
        progress=False,
        shard_positions=256,
        chunk_positions=64,
    )


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_clean_store_verifies(store_path: Path, capsys) -> None:
    report = logitstore.verify(store_path)
    assert report.ok and report.shards == 4 and report.positions == 1000
    assert main(["verify", str(store_path), "--no-progress"]) == 0
    assert "OK: 4 shard(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("key", "where", "shard"),
    [
        ("values/c/1/0", "middle", 1),  # a data chunk
        ("ids/c/2/0", "index", 2),  # the shard index (at the end of the shard)
        ("residual/c/3", "middle", 3),
        ("input_ids/c/0", "index", 0),
    ],
)
def test_flipped_byte_is_detected_and_named(store_path, capsys, key, where, shard) -> None:
    path = store_path / key
    size = path.stat().st_size
    _flip(path, size // 2 if where == "middle" else size - 6)
    report = logitstore.verify(store_path)
    assert not report.ok
    assert any(f"shard {shard} " in f and key.split("/")[0] in f for f in report.faults), report
    assert main(["verify", str(store_path), "--no-progress"]) == 1
    assert f"FAULT shard {shard} " in capsys.readouterr().out
    s0 = shard * 256
    with pytest.raises(logitstore.CorruptStoreError):
        logitstore.open(store_path).read(s0, min(s0 + 256, 1000))


def test_missing_shard_file_and_commit_are_detected(store_path: Path) -> None:
    (store_path / "values" / "c" / "2" / "0").unlink()
    (store_path / "commits" / "c" / "1").unlink()
    faults = logitstore.verify(store_path).faults
    assert any("shard 2 " in f and "no shard file" in f for f in faults), faults
    assert any("shard 1 " in f and "not committed" in f for f in faults), faults


def test_corrupt_offsets_are_detected(store_path: Path) -> None:
    import zarr

    arr = zarr.open_array(str(store_path / "offsets"), mode="r+")
    off = arr[:]
    off[3] = off[2]
    arr[:] = off
    faults = logitstore.verify(store_path).faults
    assert any("sequence 2 is empty" in f for f in faults), faults


def test_values_that_break_the_sum_are_detected(store_path: Path) -> None:
    import zarr

    arr = zarr.open_array(str(store_path / "values"), mode="r+")
    vals = arr[300:301]
    vals[0, :] = 255  # every candidate at p ≈ 1: the row sums to ~8
    arr[300:301] = vals
    faults = logitstore.verify(store_path).faults
    assert any("shard 1 " in f and "position 300" in f and "sum" in f for f in faults), faults
