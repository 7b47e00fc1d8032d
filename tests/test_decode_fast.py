"""The one-pass decoder (format/codec.py, format/direct.py) against FORMAT.md §5 written out
plainly here: the same bits for every value kind, width, tile boundary and edge row, and the
same bits whichever way the rows reach it (zarr, the shards directly, the Dataset)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numcodecs import blosc
from numcodecs.zstd import Zstd

import logitstore
import logitstore.format.codec as codec
from logitstore import Encoding
from logitstore.errors import ProtocolError
from logitstore.format.chunks import decode_chunk, decode_chunk_into
from logitstore.format.direct import read_decoded
from logitstore.format.fused import DECODER_ENV
from logitstore.format.metadata import Layout, StoreMetadata
from logitstore.format.schema import StoredRows
from logitstore.format.shards import chunk_layout, read_chunked
from logitstore.read.buffers import BufferPool
from tests.conftest import zarr_rows

VOCAB = 300


def _pairwise(a: np.ndarray) -> np.ndarray:
    """FORMAT.md §5.2 step 2, as the spec words it, row by row (float32 throughout)."""
    n, m = a.shape
    if m < 8:
        s = np.full(n, -0.0, dtype=np.float32)
        for j in range(m):
            s += a[:, j]
        return s
    if m <= 128:
        full = m - m % 8
        r = [a[:, i].copy() for i in range(8)]
        for i in range(8):
            for j in range(i + 8, full, 8):
                r[i] += a[:, j]
        s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for j in range(full, m):
            s += a[:, j]
        return s
    h = m // 2 - (m // 2) % 8
    return _pairwise(a[:, :h]) + _pairwise(a[:, h:])


def _spec_decode(md: StoreMetadata, rows: StoredRows, id_dtype: type) -> codec.Batch:
    """FORMAT.md §5, one step at a time, with no regard for speed."""
    enc, n = md.encoding, len(rows.input_ids)
    residual = rows.residual if rows.residual is not None else np.zeros(n, np.float32)
    v = rows.values
    if enc.kind == "sampled":
        assert enc.samples is not None
        q = v.astype(np.float32) / np.float32(enc.samples)
    elif enc.values == "bf16":
        q = (v.astype(np.uint32) << 16).view(np.float32)
    elif enc.values.startswith("u"):
        bins = (1 << int(enc.values[1:])) - 1
        table = np.zeros(256, np.float32)
        table[1 : bins + 1] = ((np.arange(1, bins + 1) - 0.5) / bins) ** 2  # binary64, then f32
        q = table[v]
    else:
        q = v.astype(np.float32)
    if rows.gaps is None:
        ids = np.broadcast_to(np.arange(md.vocab_size, dtype=id_dtype), q.shape)
        target = np.ones(n, np.float32)
    else:
        full_ids = np.cumsum(rows.gaps.astype(np.int64), axis=1)
        full_ids[:, 1:][rows.gaps[:, 1:] == 0] = 0
        ids = full_ids.astype(id_dtype)
        target = (np.float32(1) - residual).astype(np.float32)
    if enc.lossy and enc.kind in ("topk", "full"):
        total = _pairwise(q)
        scale = np.zeros(n, np.float32)
        ok = total > 0
        scale[ok] = target[ok] / total[ok]
        q = q * scale[:, None]
    mask = np.ones(n, bool) if rows.loss_mask is None else rows.loss_mask.astype(bool)
    return codec.Batch(rows.input_ids.astype(np.int64), ids, q, residual, mask)


def _metadata(enc: Encoding, m: int, n: int, vocab: int = VOCAB) -> StoreMetadata:
    """A store's metadata for ``n`` rows of ``m`` slots: gaps of uint32 past a vocabulary of
    65,536, as the writer stores them."""
    value_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}.get(
        enc.values, "uint16" if enc.kind == "sampled" and (enc.samples or 0) > 255 else "uint8"
    )
    layout = Layout(64, 256, "uint16" if vocab <= 1 << 16 else "uint32", value_dtype, m, 256)
    return StoreMetadata(enc, layout, vocab if enc.kind != "full" else m, n, 1, None, 0, "x")


def _rows(md: StoreMetadata, n: int, seed: int) -> StoredRows:
    """Random stored rows with every edge a decoder meets: padding, an all-zero row, id 0
    first, a row summing to 0 after quantisation, the largest id."""
    rng = np.random.default_rng(seed)
    m, enc = md.layout.width, md.encoding
    vdt = np.dtype(md.layout.value_dtype)
    if enc.values in ("fp32", "fp16"):
        values = (rng.random((n, m)) ** 3).astype(vdt)
    elif enc.values == "bf16":
        values = ((rng.random((n, m)) ** 3).astype(np.float32).view(np.uint32) >> 16).astype(vdt)
    elif enc.kind == "sampled":
        values = rng.integers(0, (enc.samples or 1) + 1, (n, m)).astype(vdt)
    else:
        values = rng.integers(0, (1 << int(enc.values[1:])), (n, m)).astype(vdt)
    gaps = None
    if enc.kind != "full":
        vocab = md.vocab_size
        ids = np.sort(rng.choice(vocab, size=(n, m)), axis=1) if n else np.zeros((0, m), int)
        gaps = np.diff(ids, axis=1, prepend=0).astype(md.layout.id_dtype)  # repeats: padding
        if n > 2:
            gaps[1, 0] = 0  # id 0 first
            gaps[2] = 0  # all padding after id 0
            gaps[2, 0] = vocab - 1 if m == 1 else 0
        values[:, 1:][gaps[:, 1:] == 0] = 0  # padding holds nothing; id 0 first keeps its value
    if n > 3:
        values[3] = 0  # a row of zeros: scale 0
    residual = rng.random(n).astype(np.float32) * 0.2 if enc.kind == "topk" else None
    input_ids = rng.integers(0, VOCAB, n).astype(np.uint16)
    return StoredRows(input_ids, gaps, values, residual, None)


CASES = [
    Encoding("topk", "u8", k=64),
    Encoding("topk", "u8", k=7),  # odd width: no pair table
    Encoding("topk", "u4", k=16),
    Encoding("topk", "u5", k=13),  # past the pairwise sum's 8 lanes, a remainder of 5
    Encoding("topk", "u8", k=128),  # the widest row the compiled kernel decodes
    Encoding("topk", "u8", k=129),  # one wider: NumPy's, split pairwise
    Encoding("topk", "fp16", k=9),
    Encoding("topk", "bf16", k=130),  # > 128: the pairwise split
    Encoding("topk", "fp32", k=5),
    Encoding("topk", "u8", k=1),
    Encoding("sampled", "count", samples=20),
    Encoding("sampled", "count", samples=300),
    Encoding("full", "fp16"),
    Encoding("full", "u6"),
]


@pytest.fixture(params=["numpy", "numba"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each decoder in turn (format/fused.py): NumPy's, and numba's compiled one, which the
    dev install has."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="the fast extra is not installed")
    monkeypatch.setenv(DECODER_ENV, request.param)
    return str(request.param)


@pytest.mark.parametrize("enc", CASES, ids=lambda e: f"{e.kind}-{e.values}-{e.k or e.samples}")
@pytest.mark.parametrize("n", [0, 1, 5, 333])
def test_the_decoder_gives_the_specs_bits(
    enc: Encoding, n: int, decoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = {"topk": enc.k, "sampled": min(enc.samples or 0, 40), "full": 40}[enc.kind]
    assert m is not None
    md = _metadata(enc, m, n)
    rows = _rows(md, n, seed=n)
    monkeypatch.setattr(codec, "TILE_VALUES", 3 * m + 1)  # many tiles, a short last one
    for id_dtype in (np.int64, np.int32):
        got, want = codec.decode_rows(md, rows, id_dtype), _spec_decode(md, rows, id_dtype)
        for name, x, y in zip(codec.Batch._fields, got, want, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), (name, enc)


def test_ids_past_the_vocabulary_are_refused(decoder: str) -> None:
    md = _metadata(Encoding("topk", "u8", k=4), 4, 2)
    rows = StoredRows(
        np.zeros(2, np.uint16),
        np.array([[1, 2, 3, 4], [VOCAB - 2, 2, 0, 0]], np.uint16),  # 298, 300, padding
        np.full((2, 4), 9, np.uint8),
        np.zeros(2, np.float32),
    )
    with pytest.raises(logitstore.CorruptStoreError, match="outside the vocabulary"):
        codec.decode_rows(md, rows)


@pytest.mark.parametrize("codec_name", ["zstd", "blosc"])
def test_chunks_decode_in_place_or_are_refused(codec_name: str) -> None:
    import crc32c

    arr = np.arange(4096 * 8, dtype="<u2").reshape(4096, 8) % 300
    body = (
        Zstd(level=3).encode(arr)
        if codec_name == "zstd"
        else blosc.compress(arr, b"zstd", 3, blosc.SHUFFLE)
    )
    data = bytes(body) + crc32c.crc32c(body).to_bytes(4, "little")
    out = np.empty_like(arr)
    decode_chunk_into(data, codec_name, out)
    assert out.tobytes() == arr.tobytes()
    with pytest.raises(ProtocolError, match="CRC"):
        decode_chunk_into(data[:-1] + bytes([data[-1] ^ 1]), codec_name, out)
    wrong = np.empty((4095, 8), dtype="<u2")  # the frame declares another size
    with pytest.raises(ProtocolError, match="expected"):
        decode_chunk_into(data, codec_name, wrong)
    # a chunk that is not stored is the fill value
    decode_chunk_into(b"", codec_name, out)
    assert not out.any()
    assert decode_chunk(data, codec_name, arr.dtype, arr.shape).tobytes() == arr.tobytes()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast")
    rng = np.random.default_rng(5)
    seqs = logitstore.sequences_from_token_ids(
        [rng.integers(0, VOCAB, rng.integers(2, 200)) for _ in range(30)], 100
    )
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )
    out = {}
    for name, enc in (
        ("topk", Encoding("topk", "u8", k=16)),
        ("full", Encoding("full", "bf16")),
        ("sampled", Encoding("sampled", "count", samples=24)),
        ("tokens", Encoding("none", "none")),
    ):
        out[name] = logitstore.capture(
            teacher,
            seqs,
            root / name,
            enc,
            progress=False,
            chunk_positions=128,
            shard_positions=1024,
        )
    return out


@pytest.mark.parametrize("name", ["topk", "full", "sampled", "tokens"])
def test_decoding_from_the_shards_is_decoding_what_zarr_reads(
    stores: dict[str, Path], name: str
) -> None:
    store = logitstore.open(stores[name])
    md = store.metadata
    layout = chunk_layout(stores[name], md)
    assert layout is not None
    n = len(store)
    for a, b in [(0, n), (127, 129), (1023, 1025), (n - 1, n), (9, 9), (5, 128 * 9 + 3)]:
        want = codec.decode_rows(md, zarr_rows(stores[name], a, b), np.int32)
        for got in (
            read_decoded(stores[name], md, layout, a, b, np.int32),
            codec.decode_rows(md, read_chunked(stores[name], md, layout, a, b), np.int32),
            store.read(a, b, id_dtype=np.int32),
        ):
            for x, y in zip(got, want, strict=True):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, a, b)


def test_a_damaged_chunk_decoded_directly_is_a_corrupt_store(
    tmp_path: Path, stores: dict[str, Path]
) -> None:
    import shutil

    path = tmp_path / "topk"
    shutil.copytree(stores["topk"], path)
    shard = path / "ids" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[50] ^= 0xFF
    shard.write_bytes(bytes(data))
    md = logitstore.open(path).metadata
    layout = chunk_layout(path, md)
    assert layout is not None
    with pytest.raises(logitstore.CorruptStoreError, match="ids"):
        read_decoded(path, md, layout, 0, 10)
    # LogitStore.read, which decodes this way, names the store, shard and positions
    where = re.escape(str(path / "ids")) + r": shard 0, the chunk from position 0: chunk CRC"
    with pytest.raises(logitstore.CorruptStoreError, match=where):
        logitstore.open(path).read(0, 10)


def _kept(pool: BufferPool, a: np.ndarray) -> int:
    """Which of the pool's buffers ``a`` is memory of (0: none)."""
    return next((i for i, b in enumerate(pool._buffers) if i and a.base is b), 0)


def test_the_buffer_pool_reuses_memory_only_once_nothing_refers_to_it() -> None:
    # Which pool buffer an array is memory of, not its address: malloc hands back the
    # address just freed, so addresses alone pass with no pool at all.
    pool = BufferPool(keep=2)
    a = pool.alloc((100, 8), np.float32)
    first = _kept(pool, a)
    assert first
    t = torch.from_numpy(a)[10:20]  # a tensor view of it, as a sample holds
    del a
    b = pool.alloc((100, 8), np.float32)
    assert _kept(pool, b) not in (0, first)  # the tensor still refers to the first buffer
    del b, t
    c = pool.alloc((100, 8), np.int32)
    assert _kept(pool, c) == first  # nothing does now
    row = c[5]  # a numpy view keeps it too
    del c
    assert _kept(pool, pool.alloc((100, 8), np.int32)) != first
    del row
    assert _kept(pool, pool.alloc((100, 8), np.int32)) == first
    old = pool._buffers[first]
    big = pool.alloc((1000, 8), np.int32)  # too large for either: new memory
    assert big.shape == (1000, 8) and big.base is not old and len(pool._buffers) == 1 + 2


def test_the_buffer_pool_is_right_under_a_tracer_that_reads_locals() -> None:
    """A debugger or tracer that reads a frame's locals (on 3.11/3.12 a dict that holds them)
    adds a reference to whatever a local name holds: the pool must neither hand out a
    buffer a caller holds nor stop reusing free ones."""
    import sys

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_locals  # noqa: B018  (what a debugger does on every line)
        return tracer

    pool = BufferPool(keep=2)
    held = pool.alloc((256,), np.float32)
    sys.settrace(tracer)
    try:
        other = pool.alloc((256,), np.float32)
        k = _kept(pool, other)
        del other
        again = pool.alloc((256,), np.float32)
    finally:
        sys.settrace(None)
    assert k and k != _kept(pool, held)  # held: never handed out again
    assert _kept(pool, again) == k  # free once more: reused, tracer or not
    assert not np.shares_memory(again, held)


def test_the_buffer_pool_follows_the_sizes_being_read() -> None:
    """Small reads first (a warm-up, a short sequence) do not keep the pool from reusing
    memory for the large reads after them, nor keep memory of sizes no longer read; it
    never keeps more than ``keep`` buffers."""
    pool = BufferPool(keep=2)
    pool.alloc((4,), np.float32), pool.alloc((4,), np.int32)  # both places taken, then free
    big = pool.alloc((1 << 16,), np.float32)
    k = _kept(pool, big)
    assert k  # kept in a small one's place
    del big
    held = pool.alloc((1 << 16,), np.float32)
    assert _kept(pool, held) == k  # reused
    more = [pool.alloc((1 << 16,), np.float32) for _ in range(3)]  # all held: new memory
    assert len(pool._buffers) == 1 + 2  # the sentinel and `keep` buffers, no more
    assert all(not np.shares_memory(m, held) for m in more)


def test_a_buffer_pool_shared_by_two_threads_never_hands_out_held_memory() -> None:
    """LogitDataset's reader and its read-ahead thread share a pool: each thread fills what
    it gets, holds it through a view a while, and finds it unchanged."""
    import sys
    import threading
    import time

    pool = BufferPool(keep=4)
    bad: list[str] = []
    stop = time.monotonic() + 1.0

    def work(me: int) -> None:
        while time.monotonic() < stop and not bad:
            a = pool.alloc((64,), np.int32)
            a.fill(me)
            view, head = a[8:], a[:8]  # held through two views, as a batch's fields are
            del a
            for _ in range(20):  # other threads allocate meanwhile
                pass
            if not ((view == me).all() and (head == me).all()):
                bad.append(f"thread {me} found its buffer overwritten")

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(before)
    assert not bad, bad[0]


def test_the_dataset_reads_the_same_samples_locally_and_remotely(stores: dict[str, Path]) -> None:
    from torch.utils.data import DataLoader

    from tests.test_server import Server

    srv = Server([stores["topk"]]).start()
    try:
        batches = []
        for source in (stores["topk"], srv.url("topk")):
            ds = logitstore.LogitDataset(source, 40, seed=3, block_positions=256)
            batches.append(list(DataLoader(ds, batch_size=4, collate_fn=logitstore.collate)))
    finally:
        srv.stop()
    assert len(batches[0]) == len(batches[1]) > 0
    for x, y in zip(*batches, strict=True):
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_read_decodes_into_the_memory_the_caller_gives(stores: dict[str, Path]) -> None:
    """``read(..., alloc=)``: the ids and probabilities are the caller's arrays, locally (the
    shards decoded as read) and remotely (stored rows, then the decoder), same bits."""
    from tests.test_server import Server

    srv = Server([stores["topk"]]).start()
    try:
        for source in (stores["topk"], srv.url("topk")):
            given: list[np.ndarray] = []

            def alloc(shape: tuple[int, ...], dtype: Any, given: list = given) -> np.ndarray:
                given.append(np.full(shape, 7, dtype=dtype))
                return given[-1]

            store = logitstore.open(source)
            got = store.read(5, 700, id_dtype=np.int32, alloc=alloc)
            want = store.read(5, 700, id_dtype=np.int32)
            store.close()
            assert len(given) == 2, source
            assert any(g is got.ids for g in given) and any(g is got.probs for g in given)
            for x, y in zip(got, want, strict=True):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), source
    finally:
        srv.stop()
