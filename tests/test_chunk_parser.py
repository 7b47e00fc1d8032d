"""The compressed stream's client parser (PROTOCOL.md §2.1) against streams a broken or hostile
server could send: chunk records out of place, past the range, or lying about their sizes, each
with a valid CRC-32C, so only the parser's own checks can catch them. Every one is a
``ProtocolError`` before anything is written outside the range's rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
import pytest
from numcodecs import blosc
from numcodecs.zstd import Zstd

import logitstore
from logitstore import Encoding
from logitstore.errors import ProtocolError
from logitstore.format.chunk_decode import decode_chunk, decode_chunk_into
from logitstore.format.chunks import (
    ChunkParser,
    ShardFiles,
    alloc_columns,
    chunk_bytes,
    chunk_layout,
    chunk_plan,
    encode_chunk,
    encode_chunks_header,
)
from logitstore.format.protocol import encode_end

from .conftest import table_store

Record = tuple[int, int, int, bytes]  # column, first position, rows, stored bytes


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> logitstore.LogitStore:
    rng = np.random.default_rng(5)
    path = table_store(
        tmp_path_factory.mktemp("parser") / "s",
        Encoding("topk", "u8", k=8),
        [rng.integers(0, 200, 200) for _ in range(12)],
        64,
        vocab=200,
        seed=1,
        chunk_positions=128,
        shard_positions=512,
    )
    return logitstore.open(path)


def _stream(
    store: logitstore.LogitStore,
    a: int,
    b: int,
    edit: Callable[[list[Record]], list[Record]] = lambda r: r,
    rows_of: Callable[[int], int] | None = None,
) -> bytes:
    """``[a, b)`` as a server would send it, its chunk records passed through ``edit`` first
    (and each column's header ``rows`` through ``rows_of``)."""
    root, md = Path(store.path), store.metadata
    layout = chunk_layout(root, md)
    assert layout is not None
    wire = [
        {"name": c.name, "rows": rows_of(c.rows) if rows_of else c.rows, "codec": c.codec}
        for c in layout
    ]
    with ShardFiles() as files:
        records = [
            (i, first, layout[i].rows, chunk_bytes(root, layout[i], k, files))
            for first, i, k in chunk_plan(layout, a, b)
        ]
    parts = [encode_chunks_header(md, a, b, wire)]
    for i, first, rows, data in edit(records):
        parts += encode_chunk(i, first, rows, data)
    parts.append(encode_end(b, b - a))
    return b"".join(parts)


def _parse(store: logitstore.LogitStore, body: bytes, a: int, b: int) -> ChunkParser:
    import io

    parser = ChunkParser(io.BytesIO(body).read, store.metadata, a, b)
    for _ in parser.rows():
        pass
    return parser


def _swap_in_column(records: list[Record]) -> list[Record]:
    """The first two chunks of the first column with two swapped."""
    col = next(c for c in {r[0] for r in records} if sum(r[0] == c for r in records) > 1)
    i, j = [k for k, r in enumerate(records) if r[0] == col][:2]
    out = list(records)
    out[i], out[j] = records[j], records[i]
    return out


def _with_crc(frame: bytes) -> bytes:
    return frame + crc32c.crc32c(frame).to_bytes(4, "little")


def test_an_honest_stream_parses_to_the_stored_rows(store: logitstore.LogitStore) -> None:
    a, b = 5, len(store) - 7  # both ends cut a chunk
    parser = _parse(store, _stream(store, a, b), a, b)
    assert parser.position == b
    want = store.read_stored(a, b)
    got = parser._view(a, b)
    for x, y in zip(got, want, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize(
    "name, edit, match",
    [
        (
            "a chunk past the range's stop",
            lambda r: [*r, (r[-1][0], r[-1][1] + r[-1][2], r[-1][2], r[-1][3])],
            "already covers",
        ),
        ("a chunk sent twice", lambda r: r[:2] + r[1:], "does not continue"),
        ("a column's chunks out of order", lambda r: _swap_in_column(r), "does not continue"),
        ("a chunk left out", lambda r: r[:1] + r[2:], "does not continue|stream ended"),
        ("a column that does not exist", lambda r: [(9, *r[0][1:]), *r[1:]], "column 9"),
    ],
)
def test_chunks_out_of_place_are_refused(
    store: logitstore.LogitStore, name: str, edit: Callable, match: str
) -> None:
    a, b = 0, 2 * 128 + 40  # ends inside a chunk: the next chunk would start past it
    with pytest.raises(ProtocolError, match=match):
        _parse(store, _stream(store, a, b, edit), a, b)


@pytest.mark.parametrize("rows", [0, 1 << 31, 100, 256])  # none, huge, not the layout's
def test_a_header_with_chunks_that_cannot_be_the_stores_is_refused(
    store: logitstore.LogitStore, rows: int
) -> None:
    body = _stream(store, 0, 10, rows_of=lambda _: rows)
    with pytest.raises(ProtocolError, match="the store's chunks hold"):
        _parse(store, body, 0, 10)


def _unsized(frame: bytes) -> bytes:
    """A zstd frame (single segment, 4-byte content size) rewritten to declare no size: a
    2**20-byte window instead (RFC 8878 §3.1.1.1)."""
    assert frame[4] == 0b1010_0000, frame[:8].hex()
    return frame[:4] + bytes([0, 10 << 3]) + frame[9:]


def test_a_zstd_frame_declaring_another_size_is_refused_before_it_is_decoded(
    store: logitstore.LogitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored chunk declares its own size; a frame declaring more (with a valid checksum)
    is refused before the codec sees it."""
    lying = _with_crc(Zstd().encode(np.zeros(1 << 20, dtype=np.uint8)))

    class Untouchable:
        def decode(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("the codec was asked to decode a frame that lies")

    monkeypatch.setattr("logitstore.format.chunk_decode._ZSTD", Untouchable())

    layout = chunk_layout(Path(store.path), store.metadata)
    assert layout is not None
    zstd_column = next(i for i, c in enumerate(layout) if c.codec == "zstd")

    def swap(records: list[Record]) -> list[Record]:
        k = next(k for k, r in enumerate(records) if r[0] == zstd_column)
        i, first, rows, _ = records[k]
        return [*records[:k], (i, first, rows, lying), *records[k + 1 :]]

    with pytest.raises(ProtocolError, match="holds 1048576 bytes"):
        _parse(store, _stream(store, 0, 10, swap), 0, 10)
    out = np.empty(64, dtype=np.uint8)
    with pytest.raises(ProtocolError, match="holds 1048576 bytes"):
        decode_chunk_into(lying, "zstd", out)


def test_a_zstd_frame_without_its_size_decodes_no_further_than_the_chunk() -> None:
    """A frame that declares no size (legal zstd; this project's writer always declares it)
    is decoded into the chunk's memory and stops at its end: more is an error, not an
    allocation of whatever the frame expands to."""
    data = (np.arange(1 << 20) % 7).astype(np.uint8)
    frame = _with_crc(_unsized(Zstd().encode(data)))
    out = np.empty_like(data)
    decode_chunk_into(frame, "zstd", out)  # the right size: exact
    assert (out == data).all()
    for size in (64, len(data) + 10):  # the frame holds more, or less, than the chunk
        with pytest.raises(ProtocolError, match="does not decompress"):
            decode_chunk_into(frame, "zstd", np.empty(size, dtype=np.uint8))
        with pytest.raises(ProtocolError, match="does not decompress"):
            decode_chunk(frame, "zstd", np.dtype(np.uint8), (size,))


def test_a_blosc_frame_whose_compressed_size_lies_is_refused() -> None:
    """c-blosc trusts the compressed size in the frame's header: one larger than the bytes
    that came would read past them."""
    data = np.arange(256, dtype=np.uint32)
    frame = bytearray(blosc.compress(data.tobytes(), b"zstd", 5, blosc.SHUFFLE, 4))
    out = np.empty_like(data)
    decode_chunk_into(_with_crc(bytes(frame)), "blosc", out)  # the honest frame
    assert (out == data).all()
    frame[12:16] = (len(frame) + 4096).to_bytes(4, "little")
    for decode in (
        lambda f: decode_chunk_into(f, "blosc", np.empty_like(data)),
        lambda f: decode_chunk(f, "blosc", data.dtype, data.shape),
    ):
        with pytest.raises(ProtocolError, match="declares another length"):
            decode(_with_crc(bytes(frame)))


def test_arrays_that_cannot_hold_the_range_are_refused(store: logitstore.LogitStore) -> None:
    import io

    md, body = store.metadata, _stream(store, 0, 10)
    good = alloc_columns(md, 10)
    wide = {
        k: np.empty((10, 2 * v.shape[1]), v.dtype) if v.ndim == 2 else v for k, v in good.items()
    }
    read_only = {k: v.copy() for k, v in good.items()}
    for v in read_only.values():
        v.flags.writeable = False
    for _why, bad in [
        ("short", {k: v[:5] for k, v in good.items()}),
        ("another dtype", {k: v.astype(np.float64) for k, v in good.items()}),
        ("another width", wide),
        (
            "not contiguous",
            {
                k: np.asfortranarray(np.empty((10, 2, *v.shape[1:]), v.dtype))[:, 0]
                for k, v in good.items()
            },
        ),
        ("read-only", read_only),
    ]:
        with pytest.raises(ValueError, match="cannot hold"):
            ChunkParser(io.BytesIO(body).read, md, 0, 10, bad, 0)
