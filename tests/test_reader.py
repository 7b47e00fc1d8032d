"""The reader: ranges, sequences, incomplete stores, versions, and plain-zarr interop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import logitstore
from logitstore import Encoding
from logitstore.cli.main import main as cli_main

from .conftest import dies_at_call, zarr_rows

VOCAB = 50


def _teacher() -> logitstore.Teacher:
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1)) * 2

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return table[ids] + 0.01 * torch.arange(ids.shape[1])[None, :, None]

    return logitstore.Teacher(fn=fn, vocab_size=VOCAB, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, rng.integers(2, 90)) for _ in range(30)]
    seqs = logitstore.sequences_from_token_ids(docs, 32)
    return logitstore.capture(
        _teacher(),
        seqs,
        tmp_path_factory.mktemp("r") / "s",
        Encoding("topk", "u8", k=6),
        progress=False,
        chunk_positions=32,
        shard_positions=128,
    )


def test_random_ranges_agree_with_whole_reads_and_sequences(store_path: Path) -> None:
    store = logitstore.open(store_path)
    whole = store.read(0, len(store))
    rng = np.random.default_rng(1)
    for _ in range(30):
        a, b = sorted(rng.integers(0, len(store) + 1, 2))
        part = store.read(a, b)
        for got, want in zip(part, whole, strict=True):
            np.testing.assert_array_equal(got, want[a:b])
    for i in range(store.num_sequences):
        seq = store.sequence(i)
        s0, s1 = store.offsets[i], store.offsets[i + 1]
        np.testing.assert_array_equal(seq.input_ids, whole.input_ids[s0:s1])
        assert store.sequence_of(int(s0)) == i == store.sequence_of(int(s1) - 1)
    empty = store.read(5, 5)
    assert empty.ids.shape == (0, 6) and empty.probs.dtype == np.float32


@pytest.mark.parametrize(("a", "b"), [(-1, 3), (5, 2), (0, 10**9), ("x", 3)])
def test_bad_ranges_are_position_errors(store_path: Path, a, b) -> None:
    store = logitstore.open(store_path)
    with pytest.raises(logitstore.PositionError):
        store.read(a, b)
    with pytest.raises(IndexError):
        store.read(a, b)


def test_bad_sequence_index(store_path: Path) -> None:
    store = logitstore.open(store_path)
    with pytest.raises(logitstore.PositionError, match="sequence 9999"):
        store.sequence(9999)


def test_incomplete_store_reads_only_committed_shards(tmp_path: Path) -> None:
    seqs = logitstore.sequences_from_token_ids([np.arange(400) % VOCAB], 16)
    with pytest.raises(RuntimeError, match="teacher died"):
        logitstore.capture(
            dies_at_call(_teacher(), 13),
            seqs,
            tmp_path / "s",
            Encoding("topk", "u8", k=4),
            batch_size=1,
            progress=False,
            chunk_positions=16,
            shard_positions=64,
        )
    with pytest.raises(logitstore.IncompleteStoreError, match="allow_incomplete"):
        logitstore.open(tmp_path / "s")
    store = logitstore.open(tmp_path / "s", allow_incomplete=True)
    assert store.read(0, 192).ids.shape == (192, 4)  # 12 batches of 16 → shards 0-2 done
    # the committed shards, read straight from disk, are zarr's bytes
    for x, y in zip(store.read_stored(3, 192), zarr_rows(tmp_path / "s", 3, 192), strict=True):
        assert (x is None) == (y is None)
        assert x is None or (x.dtype == y.dtype and x.tobytes() == y.tobytes())
    with pytest.raises(logitstore.IncompleteStoreError, match="shard 3"):
        store.read(100, 200)


def _edit_metadata(path: Path, **changes: object) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["logitstore"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_unknown_major_version_and_extension_are_refused(store_path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    _edit_metadata(copy, format_version="2.0")
    with pytest.raises(logitstore.UnsupportedVersionError, match=r"reads version 1\.x"):
        logitstore.open(copy)
    _edit_metadata(copy, format_version="1.7", extensions=["delta-values"])
    with pytest.raises(logitstore.UnsupportedVersionError, match="delta-values"):
        logitstore.open(copy)
    _edit_metadata(copy, extensions=[])  # a newer minor only adds optional keys: readable
    assert len(logitstore.open(copy)) == len(logitstore.open(store_path))


def test_plain_zarr_group_is_not_a_store(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(logitstore.FormatError, match="not a logitstore store"):
        logitstore.open(tmp_path / "g")


def test_any_zarr_v3_reader_sees_standard_codecs(store_path: Path) -> None:
    # Only codecs from the Zarr v3 core spec, so tensorstore or zarrs can open the arrays.
    standard = {"sharding_indexed", "bytes", "blosc", "zstd", "crc32c"}
    for meta in store_path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        stack = list(doc.get("codecs", []))
        while stack:
            codec = stack.pop()
            assert codec["name"] in standard, (meta, codec["name"])
            cfg = codec.get("configuration", {})
            stack += cfg.get("codecs", []) + cfg.get("index_codecs", [])
    group = zarr.open_group(str(store_path), mode="r")
    assert group["ids"].shape == (len(logitstore.open(store_path)), 6)


def test_a_local_layout_the_shard_reader_does_not_take_is_read_through_zarr(
    store_path: Path, tmp_path: Path
) -> None:
    """Another Zarr writer may rewrite an array with a codec FORMAT.md allows readers to meet
    but the direct shard reader does not decode (gzip here): reads go through zarr, same bits,
    and damage is still the store's error."""
    import shutil

    from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec

    copy = tmp_path / "gz"
    shutil.copytree(store_path, copy)
    old = zarr.open_array(str(copy / "values"), mode="r")
    data, shards, chunks = old[:], old.shards, old.chunks
    shutil.rmtree(copy / "values")
    group = zarr.open_group(str(copy), mode="r+")
    new = group.create_array(
        "values",
        shape=data.shape,
        dtype=data.dtype,
        shards=shards,
        chunks=chunks,
        serializer=BytesCodec(),
        compressors=[GzipCodec(), Crc32cCodec()],
        fill_value=0,
    )
    new[:] = data
    store = logitstore.open(copy)
    assert store._layout is None  # the zarr path, which this test is about
    n = len(store)
    for a, b in [(0, n), (31, 33), (127, 129), (n - 1, n), (5, 5)]:
        for x, y in zip(store.read_stored(a, b), zarr_rows(store_path, a, b), strict=True):
            assert (x is None) == (y is None)
            assert x is None or (x.dtype == y.dtype and x.tobytes() == y.tobytes()), (a, b)
        want = logitstore.open(store_path).read(a, b)
        for x, y in zip(store.read(a, b), want, strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (a, b)
    shard = copy / "values" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(logitstore.CorruptStoreError, match="values"):
        logitstore.open(copy).read(128, 200)


def test_read_columns_names_what_it_returns(store_path: Path) -> None:
    store = logitstore.open(store_path)
    got = store.read_columns(10, 40, ("values", "input_ids"))
    assert list(got) == ["values", "input_ids"]  # the order asked for
    want = zarr_rows(store_path, 10, 40)
    assert got["values"].tobytes() == want.values.tobytes()
    assert got["input_ids"].tobytes() == want.input_ids.tobytes()
    with pytest.raises(ValueError, match=r"no per-position array 'loss_mask'.*input_ids"):
        store.read_columns(0, 4, ("ids", "loss_mask"))  # this store has no mask


def test_zarrs_own_reader_can_be_asked_for(store_path: Path, monkeypatch) -> None:
    from logitstore.read.local import LOCAL_READER_ENV

    direct = logitstore.open(store_path)
    monkeypatch.setenv(LOCAL_READER_ENV, "zarr")
    through_zarr = logitstore.open(store_path)
    assert direct._layout is not None and through_zarr._layout is None
    n = len(direct)
    for a, b in [(0, n), (33, 170), (n - 1, n)]:
        for x, y in zip(through_zarr.read(a, b), direct.read(a, b), strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (a, b)
    monkeypatch.setenv(LOCAL_READER_ENV, "fast")
    with pytest.raises(logitstore.LogitStoreError, match="LOGITSTORE_LOCAL_READER is 'fast'"):
        logitstore.open(store_path)
    assert cli_main(["info", str(store_path)]) == 2  # a clean error, not a traceback
    assert cli_main(["verify", str(store_path)]) == 2  # a setting, not a damaged store (1)
