"""A defensive open (issue 17, items 6–8): malformed metadata, offsets, codecs, shard
indexes and commit records are refused on open or on read with a named error, never a
TypeError, a silent byte-swap, a huge allocation or zeros."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import zarr

import logitstore
from logitstore.cli import main

GOLDEN = Path(__file__).parent / "golden" / "v1"


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """A copy of a golden top-k store with a loss mask: 9 positions, 2 sequences, 2 shards of
    8 positions, 2-D inner chunks of 4 positions."""
    return Path(shutil.copytree(GOLDEN / "topk-u8-masked.zarr", tmp_path / "s.zarr"))


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def edit_meta(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    edit_json(store / "zarr.json", lambda d: change(d["attributes"]["logitstore"]))


def refused(store: Path, error: type[Exception] = logitstore.FormatError) -> str:
    """Open, verify and ``info``: a named error, a verify fault, exit status 1 or 2."""
    with pytest.raises(error) as e:
        logitstore.open(store)
    report = logitstore.verify(store)  # never raises
    assert not report.ok
    assert main(["info", str(store)]) in (1, 2)
    return str(e.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.__setitem__("extensions", "loss_mask"), "extensions"),
        (lambda m: m.__setitem__("extensions", [["loss_mask"]]), "extensions"),
        (lambda m: m["layout"].__setitem__("shard_positions", 8.0), "shard_positions"),
        (lambda m: m["layout"].__setitem__("chunk_positions", True), "chunk_positions"),
        (lambda m: m["encoding"].__setitem__("k", "4"), "'k'"),
        (lambda m: m.__setitem__("num_sequences", 10), "num_sequences"),
        (lambda m: m.__setitem__("vocab_size", -1), "vocab_size"),
        (lambda m: m.__setitem__("format_version", 1.1), "format_version"),
        (lambda m: m.__setitem__("teacher", [1]), "teacher"),
        (lambda m: m["layout"].__setitem__("chunk_positions", 1 << 40), "chunk"),
    ],
)
def test_malformed_metadata_is_refused_by_name(store: Path, change: Any, words: str) -> None:
    edit_meta(store, change)
    assert words in refused(store)


def test_two_dimensional_offsets_are_refused(store: Path) -> None:
    edit_json(store / "offsets" / "zarr.json", lambda d: d.__setitem__("shape", [3, 1]))
    assert "'offsets'" in refused(store)


def test_shard_size_that_disagrees_with_commits_is_refused(store: Path) -> None:
    edit_json(store / "commits" / "zarr.json", lambda d: d.__setitem__("shape", [5]))
    assert "'commits'" in refused(store)


def test_big_endian_codec_is_refused(store: Path) -> None:
    def big(d: dict[str, Any]) -> None:
        d["codecs"][0]["configuration"]["codecs"][0]["configuration"]["endian"] = "big"

    edit_json(store / "residual" / "zarr.json", big)
    assert "endian" in refused(store)


def _write_offsets(store: Path, values: list[int]) -> None:
    arr = zarr.open_array(str(store / "offsets"), mode="r+")
    arr[:] = np.asarray(values, dtype=np.int64)  # a valid checksum: only the values are wrong


@pytest.mark.parametrize("values", [[0, 10**10, 9], [0, -(10**10), 9], [0, 0, 9], [0, 9, 9]])
def test_bad_offsets_are_refused_on_open(store: Path, values: list[int]) -> None:
    _write_offsets(store, values)
    refused(store, logitstore.CorruptStoreError)


def test_dataset_over_huge_offset_allocates_nothing(store: Path) -> None:
    from logitstore.read.dataset import LogitDataset

    _write_offsets(store, [0, 10**12, 9])
    with pytest.raises(logitstore.CorruptStoreError, match="offsets"):
        LogitDataset(store, seq_len=4)


def _empty_first_chunk(path: Path, per: int) -> None:
    data = bytearray(path.read_bytes())
    n = 16 * per
    index = bytearray(data[-n - 4 : -4])
    index[0:16] = b"\xff" * 16  # chunk 0: "not stored"
    data[-n - 4 :] = index + struct.pack("<I", crc32c.crc32c(bytes(index)))
    path.write_bytes(bytes(data))


def test_chunk_marked_empty_in_shard_index_is_damage(store: Path) -> None:
    _empty_first_chunk(store / "input_ids" / "c" / "0", per=1)
    s = logitstore.open(store)  # the index is read with the shard, not on open
    with pytest.raises(logitstore.CorruptStoreError, match="not stored"):
        s.read(0, 4)
    faults = logitstore.verify(store).faults
    assert any("shard 0 " in f and "not stored" in f for f in faults), faults


def test_chunks_past_the_end_are_not_written_and_read_fine(store: Path) -> None:
    # The last shard's second 2-D inner chunk (positions 12-15) lies wholly past N = 9.
    tail = (store / "ids" / "c" / "1" / "0").read_bytes()[-36:-4]
    assert tail[16:] == b"\xff" * 16
    assert logitstore.open(store).read(8, 9).ids.shape == (1, 4)
    assert logitstore.verify(store).ok


def test_commit_record_of_zero_in_a_complete_store_is_damage(store: Path) -> None:
    zarr.open_array(str(store / "commits"), mode="r+")[1] = 0
    s = logitstore.open(store)
    s.read(0, 8)
    with pytest.raises(logitstore.CorruptStoreError, match="commit record"):
        s.read(8, 9)
    assert any("shard 1 " in f and "not committed" in f for f in logitstore.verify(store).faults)


def test_the_dataset_refuses_a_complete_store_whose_commit_record_is_zero(store: Path) -> None:
    # LogitDataset reads complete local stores straight from their shards; that path must not
    # trust the state over the records any more than store.read does.
    zarr.open_array(str(store / "commits"), mode="r+")[1] = 0
    ds = logitstore.LogitDataset(store, seq_len=4, shuffle=False)
    with pytest.raises(logitstore.CorruptStoreError, match="commit record"):
        list(ds)


def test_identity_is_recomputed_by_verify(store: Path) -> None:
    assert logitstore.verify(store).ok
    edit_meta(store, lambda m: m["teacher"].__setitem__("name", "another"))
    faults = logitstore.verify(store).faults
    assert any("identity" in f for f in faults), faults


def _spec_sum(a: np.ndarray) -> np.float32:
    """Σ of FORMAT.md §5.2 step 2, written from the text alone."""
    f = np.float32
    n = len(a)
    if n < 8:
        total = f(-0.0)
        for x in a:
            total = f(total + x)
        return total
    if n <= 128:
        r = [f(x) for x in a[:8]]
        for j in range(8, n - n % 8, 8):
            r = [f(r[i] + a[j + i]) for i in range(8)]
        total = f(f(f(r[0] + r[1]) + f(r[2] + r[3])) + f(f(r[4] + r[5]) + f(r[6] + r[7])))
        for x in a[n - n % 8 :]:
            total = f(total + x)
        return total
    h = n // 2 - (n // 2) % 8
    return f(_spec_sum(a[:h]) + _spec_sum(a[h:]))


@pytest.mark.parametrize("m", [3, 8, 13, 64, 129, 1000])
def test_rescaling_follows_the_spec_bit_for_bit(m: int) -> None:
    from dataclasses import replace

    from logitstore.format.codec import decode_rows
    from logitstore.format.schema import StoredRows

    md = replace(logitstore.open(GOLDEN / "topk-u8.zarr").metadata, vocab_size=1 << 16)
    rng = np.random.default_rng(m)
    codes = rng.integers(0, 256, (40, m)).astype(np.uint8)
    residual = rng.random(40).astype(np.float32) * np.float32(0.5)
    gaps = np.ones((40, m), dtype=np.uint16)
    rows = StoredRows(np.zeros(40, np.uint16), gaps, codes, residual)
    got = decode_rows(md, rows).probs
    table = np.zeros(256, np.float32)
    table[1:256] = ((np.arange(1, 256, dtype=np.float64) - 0.5) / 255) ** 2
    for row in range(40):
        q = table[codes[row]]
        t = np.float32(np.float32(1) - residual[row])
        total = _spec_sum(q)
        s = np.float32(t / total) if total > 0 else np.float32(0)
        assert np.array_equal(got[row], (q * s).astype(np.float32)), row


def test_dataset_over_a_chunk_marked_empty_is_damage(store: Path) -> None:
    from logitstore.read.dataset import LogitDataset

    _empty_first_chunk(store / "values" / "c" / "0" / "0", per=2)  # positions 0-3
    ds = LogitDataset(store, seq_len=4, shuffle=False)
    with pytest.raises(logitstore.CorruptStoreError, match="not stored"):
        list(ds)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_shard_that_is_a_named_pipe_is_damage_not_a_hang(store: Path) -> None:
    # opening a FIFO for reading waits for a writer: a hostile store must not hang a reader
    shard = store / "values" / "c" / "0" / "0"
    shard.unlink()
    os.mkfifo(shard)
    s = logitstore.open(store)
    done: list[BaseException] = []

    def read() -> None:
        try:
            s.read(0, 4)
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # release the blocked open so the thread can end
        with open(os.open(shard, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        t.join(10)
        pytest.fail("reading a shard that is a named pipe hung")
    assert len(done) == 1 and isinstance(done[0], logitstore.CorruptStoreError), done


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("key", ["ids/zarr.json", "offsets/c/0", "commits/c/1"])
def test_a_key_zarr_reads_that_is_a_named_pipe_is_refused_not_a_hang(store: Path, key: str) -> None:
    (store / key).unlink()
    os.mkfifo(store / key)
    done: list[BaseException] = []

    def check() -> None:
        try:
            s = logitstore.open(store)
            s.read(0, len(s))
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        with open(os.open(store / key, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        t.join(10)
        pytest.fail(f"opening a store whose {key} is a named pipe hung")
    assert len(done) == 1 and isinstance(done[0], logitstore.LogitStoreError), done


def test_a_path_too_long_for_the_file_system_is_no_store(tmp_path: Path) -> None:
    with pytest.raises(logitstore.StoreNotFoundError):
        logitstore.open(tmp_path / ("a" * 300))
    assert main(["info", str(tmp_path / ("a" * 300))]) == 2


def test_dataset_over_a_shard_that_is_a_directory_is_damage(store: Path) -> None:
    from logitstore.read.dataset import LogitDataset

    shard = store / "ids" / "c" / "0" / "0"
    shard.unlink()
    shard.mkdir()
    (shard / "x").write_bytes(b"\0" * 8192)  # a directory's size may pass for an index
    ds = LogitDataset(store, seq_len=4, shuffle=False)
    with pytest.raises(logitstore.CorruptStoreError):
        list(ds)


def test_a_shard_rewritten_in_place_is_read_afresh(store: Path) -> None:
    """The checked shard indexes are cached by the file's identity, not its name, size and
    time: a shard rewritten in place (here its index pointing chunk 0 at chunk 1's bytes,
    same size, its modification time put back, as `cp -p` or `rsync -a` leave it) is read as
    it now is, not through the index of the file it replaced."""
    s = logitstore.open(store)
    before = s.read_stored(0, 8).values.copy()  # shard 0: chunks of positions 0-3 and 4-7
    shard = store / "values" / "c" / "0" / "0"
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    n = 2  # inner chunks per shard
    at = len(raw) - (16 * n + 4)
    entries = raw[at : at + 16 * n]
    swapped = entries[16:32] + entries[0:16]
    raw[at : at + 16 * n] = swapped
    raw[-4:] = struct.pack("<I", crc32c.crc32c(bytes(swapped)))
    time.sleep(0.05)  # past the kernel's coarse clock tick, so the change time moves
    with open(shard, "r+b") as f:  # in place: the same inode
        f.write(raw)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    after = s.read_stored(0, 8).values
    assert after[:4].tobytes() == before[4:].tobytes()
    assert after[4:].tobytes() == before[:4].tobytes()
