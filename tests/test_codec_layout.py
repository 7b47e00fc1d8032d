"""The codec chains of format 1.2 (docs/FORMAT.md §4, §10): every kind and value type
stores exactly the rows it was given, the recorded version is the lowest that describes the
store, each array carries its version's chain, a stored chunk decodes on its own with
numcodecs (as the compressed stream does), and ``validate`` accepts the new stores while
still refusing chains outside §4. Old-layout (1.0/1.1) stores reading bit-identically is
tests/test_golden.py's ``test_old_layout_stores_read_bit_identically_to_new_ones``."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.codecs as zc
from numcodecs import blosc
from numcodecs.zstd import Zstd

import logitstore
from logitstore import Encoding, encode_rows
from logitstore.errors import FormatError
from logitstore.format.schema import columns
from logitstore.format.storage import codecs_version, per_position_codecs
from logitstore.format.validate import check_array

CASES = {
    "topk-u8": Encoding("topk", "u8", k=16),
    "topk-u4": Encoding("topk", "u4", k=16),
    "topk-fp16": Encoding("topk", "fp16", k=16),
    "topk-bf16": Encoding("topk", "bf16", k=16),
    "topk-fp32": Encoding("topk", "fp32", k=16),
    "sampled-32": Encoding("sampled", "count", samples=32),
    "sampled-300": Encoding("sampled", "count", samples=300),  # uint16 counts
    "full-u8": Encoding("full", "u8"),
    "full-fp16": Encoding("full", "fp16"),
}
#: the version today's writer records: 1.2 where a store has ids (topk, sampled)
VERSION = {name: "1.2" if enc.kind in ("topk", "sampled") else "1.0" for name, enc in CASES.items()}


def _teacher(vocab: int) -> logitstore.Teacher:
    # peaked rows (a trained model's spread), some tokens impossible (-inf): padding too
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5)) * 4
    table[:, vocab - 40 :] = float("-inf")
    table[7, 20:] = float("-inf")  # token 7 leaves fewer than k possible next tokens
    return logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=vocab, device=torch.device("cpu")
    )


def _write(name: str, vocab: int, tmp_path: Path, n: int = 1100) -> tuple[Path, torch.Tensor]:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab, n)
    tokens[::50] = 7
    seqs = logitstore.sequences_from_token_ids([tokens], 256)
    teacher = _teacher(vocab)
    path = logitstore.capture(
        teacher,
        seqs,
        tmp_path / name,
        CASES[name],
        progress=False,
        chunk_positions=256,
        shard_positions=1024,  # a whole shard and a partial one
    )
    logits = teacher.fn(torch.from_numpy(seqs.input_ids.astype(np.int64)), None)  # (n, V)
    return path, logits


@pytest.mark.parametrize("name", list(CASES))
def test_every_kind_stores_exactly_what_was_encoded(name: str, tmp_path: Path) -> None:
    path, logits = _write(name, 300, tmp_path)
    store = logitstore.open(path)
    md = store.metadata
    assert md.format_version == VERSION[name]
    assert codecs_version(md.encoding, md.layout) == VERSION[name]
    want = encode_rows(logits, CASES[name], md.seed, torch.arange(len(logits)))
    stored = store.read_stored(0, len(store))
    expected = {
        "ids": want.gaps,
        "values": want.values,
        "residual": want.residual,
    }
    got = {"ids": stored.gaps, "values": stored.values, "residual": stored.residual}
    for key, tensor in expected.items():
        if tensor is None:
            assert got[key] is None, key
            continue
        arr = got[key]
        assert arr is not None, key
        bits = tensor.numpy().view(arr.dtype)  # int16 bits of uint16 columns
        np.testing.assert_array_equal(arr, bits, err_msg=key)
    for col in columns(md):
        inner = zarr.open_array(str(path / col.name)).metadata.codecs[0].codecs[1:]
        assert list(inner) == per_position_codecs(col, md.format_version), col.name
    assert logitstore.verify(path).ok


def test_uint32_ids_use_one_block_per_chunk_and_round_trip(tmp_path: Path) -> None:
    vocab = 70_000  # past 65,536: uint32 ids, a 4-byte blosc typesize
    n = 600
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.standard_normal((n, vocab), dtype=np.float32) * 3)
    seqs = logitstore.sequences_from_token_ids([rng.integers(0, vocab, n)], None)
    enc = Encoding("topk", "u8", k=8)
    path = tmp_path / "wide"
    with logitstore.StoreWriter(
        path, encoding=enc, vocab_size=vocab, input_ids=seqs.input_ids, offsets=seqs.offsets
    ) as w:
        w.write(0, encode_rows(logits, enc, 0, torch.arange(n)))
    store = logitstore.open(path)
    assert store.metadata.format_version == "1.2" and store.metadata.layout.id_dtype == "uint32"
    blosc_codec = zarr.open_array(str(path / "ids")).metadata.codecs[0].codecs[1]
    assert blosc_codec.typesize == 4
    assert blosc_codec.blocksize == store.metadata.layout.chunk_positions * 8 * 4
    batch = store.read(0, n)
    top = torch.topk(logits, 8, -1).indices.sort(-1).values.numpy()
    np.testing.assert_array_equal(batch.ids, top)


def _chunks(path: Path, name: str, per: int) -> list[bytes]:
    """The stored inner chunks of shard 0 of a 2-D array, CRC-32C stripped, from the file."""
    data = (path / name / "c" / "0" / "0").read_bytes()
    index = np.frombuffer(data[-(16 * per + 4) : -4], dtype="<u8").reshape(per, 2)
    out = []
    for off, size in index:
        if off != (1 << 64) - 1:
            chunk = data[int(off) : int(off + size)]
            assert struct.unpack("<I", chunk[-4:])  # the CRC-32C zarr checks
            out.append(chunk[:-4])
    return out


def test_a_stored_chunk_decodes_with_numcodecs_alone(tmp_path: Path) -> None:
    # The compressed stream ships stored chunks and decodes them with numcodecs: blosc's own
    # header carries the shuffle, type size and block size, so no parameter travels with it.
    path, _ = _write("topk-u8", 300, tmp_path)
    store = logitstore.open(path)
    lay = store.metadata.layout
    per = lay.shard_positions // lay.chunk_positions
    rows = store.read_stored(0, lay.shard_positions)
    assert rows.gaps is not None
    for name, want, decode in (
        ("ids", rows.gaps, blosc.decompress),
        ("values", rows.values, Zstd().decode),
    ):
        chunks = _chunks(path, name, per)
        assert len(chunks) == per
        for j, body in enumerate(chunks):
            got = np.frombuffer(decode(body), dtype=want.dtype).reshape(-1, lay.width)
            part = want[j * lay.chunk_positions : (j + 1) * lay.chunk_positions]
            np.testing.assert_array_equal(got, part, err_msg=f"{name} chunk {j}")


def test_validate_accepts_the_new_chains_and_still_refuses_a_foreign_one(tmp_path: Path) -> None:
    path, _ = _write("topk-u8", 300, tmp_path)
    md = logitstore.open(path).metadata  # opening checks every array (validate.check_arrays)
    col = next(c for c in columns(md) if c.name == "ids")
    ok = zarr.create_array(
        str(tmp_path / "probe"),
        name="ok",
        shape=col.shape(md.num_positions),
        dtype=col.dtype,
        chunks=col.shape(col.chunk_positions),
        shards=col.shape(md.layout.shard_positions),
        compressors=per_position_codecs(col, "1.2"),
        fill_value=0,
    )
    args = (col.shape(md.num_positions), col.dtype, col.shape(md.layout.shard_positions))
    check_array(ok, "ids", *args, inner=col.shape(col.chunk_positions))
    bad = zarr.create_array(
        str(tmp_path / "probe"),
        name="bad",
        shape=col.shape(md.num_positions),
        dtype=col.dtype,
        chunks=col.shape(col.chunk_positions),
        shards=col.shape(md.layout.shard_positions),
        compressors=[zc.BloscCodec(cname="zstd", clevel=4, shuffle="shuffle", typesize=2)],
        fill_value=0,
    )
    with pytest.raises(FormatError, match="Crc32cCodec"):
        check_array(bad, "ids", *args, inner=col.shape(col.chunk_positions))


def test_the_1_1_table_is_unchanged() -> None:
    # What stores of 1.0 and 1.1 were written with (FORMAT.md §4, change log): pinned, so a
    # change to the writer's table can never rewrite history.
    md = logitstore.open(Path(__file__).parent / "golden" / "v1" / "topk-u8.zarr").metadata
    got = {c.name: per_position_codecs(c, "1.1")[0].to_dict() for c in columns(md)}
    assert got["values"] == {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
    for name in ("ids", "input_ids", "residual"):
        cfg = got[name]["configuration"]
        assert (cfg["cname"], cfg["clevel"], cfg["shuffle"], cfg["blocksize"]) == (
            "zstd",
            3,
            "shuffle",
            0,
        ), name
