"""The compressed stream (PROTOCOL.md §2.1) over a real socket: negotiated, bit-identical to
local reads for ranges that cut chunks, resumable after a dropped connection, and old clients
keep the row stream."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.format.chunks import CHUNKS_MAGIC, CHUNKS_MEDIA_TYPE
from logitstore.format.protocol import MAGIC
from tests.conftest import zarr_rows
from tests.test_server import Server

VOCAB = 300


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chunked")
    rng = np.random.default_rng(3)
    seqs = logitstore.sequences_from_token_ids(
        [rng.integers(0, VOCAB, rng.integers(2, 300)) for _ in range(60)], 128
    )
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )
    mask = rng.integers(0, 2, len(seqs.input_ids)).astype(np.uint8)
    out = {}
    for name, enc in (
        ("topk", Encoding("topk", "u8", k=16)),
        ("full", Encoding("full", "fp16")),
        ("sampled", Encoding("sampled", "count", samples=32)),
        ("tokens", Encoding("none", "none")),
    ):
        out[name] = logitstore.capture(
            teacher,
            seqs,
            root / name,
            enc,
            progress=False,
            chunk_positions=256,
            shard_positions=2048,
            loss_mask=mask if name == "tokens" else None,
        )
    return out


@pytest.fixture(scope="module")
def server(stores: dict[str, Path]) -> Iterator[Server]:
    srv = Server(list(stores.values())).start()
    yield srv
    srv.stop()


def _same(a: logitstore.Batch, b: logitstore.Batch) -> bool:
    # Bits, not values: NaN == NaN and -0.0 != 0.0 here.
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )


def test_the_stream_is_negotiated_and_old_clients_keep_rows(server: Server) -> None:
    path = "/v1/stores/topk/positions?start=10&stop=300"
    status, headers, body = server.get(path, {"Accept": CHUNKS_MEDIA_TYPE}, token=None)
    assert status == 200 and headers["content-type"] == CHUNKS_MEDIA_TYPE
    assert body.startswith(CHUNKS_MAGIC)
    status, headers, body = server.get(path, {"Accept": "*/*"}, token=None)
    assert status == 200 and headers["content-type"].startswith("application/x-logitstore-stream")
    assert body.startswith(MAGIC)
    status, _, body = server.get(path, token=None)  # no Accept at all: rows
    assert status == 200 and body.startswith(MAGIC)
    for name in ("full", "sampled", "tokens"):  # every encoding's arrays travel as chunks
        status, headers, _ = server.get(
            f"/v1/stores/{name}/positions?start=0&stop=5", {"Accept": CHUNKS_MEDIA_TYPE}
        )
        assert headers["content-type"] == CHUNKS_MEDIA_TYPE, name


def test_a_complete_store_with_an_uncommitted_shard_is_not_streamed_as_chunks(
    tmp_path: Path, stores
) -> None:
    import shutil

    import zarr

    path = tmp_path / "topk"
    shutil.copytree(stores["topk"], path)
    records = zarr.open_array(str(path / "commits"), mode="r+")
    assert records.shape[0] > 1
    records[records.shape[0] - 1] = 0  # damage: the store says complete, a record says no
    srv = Server([path]).start()
    try:
        remote = logitstore.RemoteStore(srv.url("topk"), retries=1, backoff=0.01)
        with pytest.raises(logitstore.CorruptStoreError, match="commit record"):
            remote.read(0, len(remote))
    finally:
        srv.stop()


@pytest.mark.parametrize("name", ["topk", "full", "sampled", "tokens"])
def test_compressed_reads_are_bit_identical_to_local_and_to_rows(
    server: Server, stores: dict[str, Path], name: str
) -> None:
    local = logitstore.open(stores[name])
    chunked = logitstore.RemoteStore(server.url(name))
    rows = logitstore.RemoteStore(server.url(name), compressed=False)
    n = len(local)
    rng = np.random.default_rng(4)
    # Ranges that cut inner chunks (256) and shards (2048), single positions, the end, empty.
    spans = [(0, n), (255, 257), (2047, 2049), (n - 1, n), (300, 300), (1, 2048 * 2 + 3)]
    spans += [tuple(sorted(int(x) for x in rng.integers(0, n + 1, 2))) for _ in range(8)]
    spans += [(10, 1010), (1010, 2010), (2010, 3010)]  # alike: memory the client reuses
    kept = []
    for a, b in spans:
        want = local.read(a, b)
        got = chunked.read(a, b)
        assert _same(got, want), (name, a, b)
        assert _same(rows.read(a, b), want), (name, a, b)
        kept.append((got, want))
    assert _same(chunked.sequence(3), local.sequence(3))
    # every batch still holds its own rows: the client reuses memory only once nothing refers
    # to it (the stored rows it decodes from; a batch's residual is one of them)
    for (got, want), (a, b) in zip(kept, spans, strict=True):
        assert _same(got, want), ("kept", name, a, b)


def test_only_reads_up_to_a_block_keep_memory_for_the_next(
    server: Server, stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read's stored rows are decoded from memory its thread keeps for the next read only
    up to POOLED_POSITIONS positions: one large read must not pin its size for the store's
    life."""
    import logitstore.read.remote as remote

    monkeypatch.setattr(remote, "POOLED_POSITIONS", 100)
    store = logitstore.RemoteStore(server.url("topk"))
    local = logitstore.open(stores["topk"])
    assert _same(store.read(0, 500), local.read(0, 500))
    assert getattr(store._local, "rows_pool", None) is None
    assert _same(store.read(7, 90), local.read(7, 90))
    assert getattr(store._local, "rows_pool", None) is not None
    store.close()


def _compare(local: logitstore.LogitStore, body: bytes, a: int, b: int) -> None:
    """``body``, a compressed stream of ``[a, b)``, decodes to exactly the stored rows."""
    import io

    from logitstore.format.chunks import ChunkParser

    parser = ChunkParser(io.BytesIO(body).read, local.metadata, a, b)
    got = list(parser.rows())
    assert parser.position == b, (a, b)
    rows = local.read_stored(a, b)
    at = a
    for start, part in got:
        assert start == at
        for x, y in zip(part, rows, strict=True):
            assert (x is None) == (y is None), (a, b)
            if x is not None:
                assert x.tobytes() == y[at - a : at - a + len(x)].tobytes(), (a, b)
        at += len(part.input_ids)
    assert at == b, (a, b)  # every position compared


@pytest.mark.parametrize("reading", ["cached", "no-nowait", "switch", "large"])
@pytest.mark.parametrize("held", [2, 1000])
def test_many_steps_through_reused_buffers_stay_bit_identical(
    stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch, held: int, reading: str
) -> None:
    """The server streams views of step buffers it reuses (server/chunks.py), and the
    transport keeps views of what the socket has not taken (server/cycle.py). Here each step
    is many pieces and the consumer keeps the last ``held`` pieces as views, copying a piece
    only when it leaves that window (1000: nearly the whole answer, as a client that stopped
    reading): a buffer refilled while viewed shows as a chunk failing its checksum or a
    wrong row. Every way of reading steps (server/steps.py): from the page cache when their
    turn comes; in a thread each while the one before is sent (a system without RWF_NOWAIT,
    or steps larger than the loop reads); and a filesystem found mid-stream to refuse
    RWF_NOWAIT, which moves the stream from the first way to the second."""
    import asyncio
    from collections import deque

    from logitstore_server import send, steps
    from logitstore_server.chunks import _body, chunk_stream_layout
    from logitstore_server.deps import Span
    from logitstore_server.metrics import Metrics

    monkeypatch.setattr(send, "PIECE_BYTES", 4096)
    monkeypatch.setattr(steps, "_no_nowait", set())  # what this test learns stays here
    calls, refused = [0], [0]
    if reading == "no-nowait":
        monkeypatch.setattr(steps, "_NOWAIT", None)
    elif reading == "large":
        monkeypatch.setattr(steps, "LOOP_READ_BYTES", 512)
    elif reading == "switch":
        import errno
        import os

        real = os.preadv
        if not _reads_without_waiting(stores["topk"]):
            pytest.skip("this filesystem cannot read without waiting: nothing to switch from")

        def preadv(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
            if flags:  # a read from the event loop: every 3rd is refused
                calls[0] += 1
                if calls[0] % 3 == 0:
                    refused[0] += 1
                    raise OSError(errno.EOPNOTSUPP, "not supported")
            return real(fd, buffers, offset, flags)

        monkeypatch.setattr(steps.os, "preadv", preadv)
    for name in ("topk", "full", "sampled", "tokens"):
        local = logitstore.open(stores[name])
        n = len(local)
        layout = chunk_stream_layout(local)
        assert layout is not None

        async def consume(local: logitstore.LogitStore, layout: list, a: int, b: int) -> bytes:
            out: list[bytes] = []
            window: deque[bytes | memoryview] = deque()
            async for piece in _body(Span(local, a, b), layout, Metrics(), 300):
                window.append(piece)
                if len(window) > held:
                    out.append(bytes(window.popleft()))
                await asyncio.sleep(0)  # as the transport does between pieces
            out += [bytes(p) for p in window]
            return b"".join(out)

        for a, b in [(0, n), (255, n - 300), (1000, 1700)]:
            steps._no_nowait.clear()  # each range starts on the loop ("switch": is moved)
            before = refused[0]
            _compare(local, asyncio.run(consume(local, layout, a, b)), a, b)
            if refused[0] > before:  # the refusal is remembered: the rest went to threads
                assert steps._no_nowait, (name, a, b)
    assert reading != "switch" or refused[0] >= 4  # streams were moved mid-way


def test_a_client_reading_slowly_gets_every_byte_exactly(tmp_path: Path) -> None:
    """Through the real server: a 14 MB answer in steps of ~0.7 MB, to a client that waits
    before reading. Once the kernel's socket buffers are full the transport holds a view of
    the piece the socket has not taken while the stream reads its next step: a buffer
    refilled under such a view sends other bytes than it checked (server/cycle.py,
    server/chunks.py)."""
    vocab = 2048
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=vocab, device=torch.device("cpu")
    )
    rng = np.random.default_rng(8)
    seqs = logitstore.sequences_from_token_ids([rng.integers(0, vocab, 5000)], 250)
    path = logitstore.capture(
        teacher,
        seqs,
        tmp_path / "big",
        Encoding("full", "fp16"),
        progress=False,
        chunk_positions=256,
        shard_positions=4096,
    )
    local = logitstore.open(path)
    n = len(local)
    slow = Server([path], "--block-positions", "256").start()
    try:
        raw = _read_slowly(slow.port, "big", n)
    finally:
        slow.stop()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    body, at = bytearray(), 0
    while True:  # undo the chunked framing
        line_end = chunked.index(b"\r\n", at)
        size = int(chunked[at:line_end], 16)
        if size == 0:
            break
        body += chunked[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2
    assert len(body) > 12 << 20  # more than the kernel's socket buffers hold
    _compare(local, bytes(body), 7, n)


def _reads_without_waiting(root: Path) -> bool:
    """Whether the filesystem of ``root`` takes reads with RWF_NOWAIT (Linux; not tmpfs)."""
    import os

    if not hasattr(os, "RWF_NOWAIT"):
        return False
    fd = os.open(root / "zarr.json", os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        pass  # not cached: it can tell
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _evict(root: Path) -> None:
    """Ask the kernel to drop the store's files from the page cache."""
    import os

    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_steps_not_in_the_page_cache_are_read_in_a_thread_and_arrive_exactly(
    stores: dict[str, Path], server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop reads a step only from the page cache (RWF_NOWAIT); a step on disk
    alone goes to a thread, and the answer is the same."""
    import os

    from logitstore_server import chunks, steps

    from logitstore.format.chunks import chunk_plan

    monkeypatch.setattr(steps, "_no_nowait", set())  # what this test learns stays here
    root = stores["full"]
    device = os.stat(root).st_dev
    local = logitstore.open(root)
    n = len(local)
    layout = chunks.chunk_stream_layout(local)
    assert layout is not None
    if not _reads_without_waiting(root):
        pytest.skip("this filesystem cannot read without waiting (no RWF_NOWAIT)")
    items = chunk_plan(layout, 0, 600)
    steps.read_step(root, layout, items, bytearray())  # the step in the page cache now
    got = steps.read_step(root, layout, items, bytearray(), cached_on=device)
    assert got is not None  # cached: read on the loop
    _evict(root)
    shard = max((f for f in root.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        pytest.skip("this filesystem kept the store cached after POSIX_FADV_DONTNEED")
    except BlockingIOError:
        pass  # evicted
    finally:
        os.close(fd)
    assert steps.read_step(root, layout, items, bytearray(), cached_on=device) is None
    assert steps.can_read_cached(device)  # not cached is not "cannot"
    from_disk = steps.read_step(root, layout, items, bytearray())  # as the thread reads it
    assert from_disk is not None and from_disk[1] == got[1]
    assert from_disk[0][: got[1]] == got[0][: got[1]]
    remote = logitstore.RemoteStore(server.url("full"))
    for a, b in [(0, n), (255, 1900)]:
        _evict(root)
        assert _same(remote.read(a, b), local.read(a, b)), (a, b)


def _read_slowly(port: int, name: str, n: int) -> bytes:
    import time

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            f"GET /v1/stores/{name}/positions?start=7&stop={n} HTTP/1.1\r\nHost: x\r\n"
            f"Accept: {CHUNKS_MEDIA_TYPE}\r\nConnection: close\r\n\r\n".encode()
        )
        time.sleep(0.5)  # the server fills the socket's buffers and its transport's
        raw = bytearray()
        while piece := s.recv(1 << 16):
            raw += piece
    return bytes(raw)


class CuttingProxy:
    """A TCP proxy that cuts the first position stream after ``cut`` bytes of its answer.
    On the connections numbered in ``rows_on`` (0: the first) it asks for the row stream
    whatever the client accepts, as a server without the compressed stream would answer."""

    def __init__(self, port: int, cut: int, rows_on: frozenset[int] = frozenset()) -> None:
        self.target, self.cut, self.cuts = port, cut, 0
        self.rows_on, self.connections = rows_on, 0
        self.requests: list[tuple[int, str]] = []  # (start, "rows" or "chunks") of each stream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            state = {"streaming": False, "rows": self.connections in self.rows_on}
            self.connections += 1
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        try:
            while data := src.recv(65536):
                if b"/positions" in data:
                    state["streaming"] = True
                    start = int(data.split(b"start=", 1)[1].split(b"&", 1)[0])
                    chunks = CHUNKS_MEDIA_TYPE.encode() in data and not state["rows"]
                    self.requests.append((start, "chunks" if chunks else "rows"))
                if state["rows"]:
                    data = data.replace(CHUNKS_MEDIA_TYPE.encode(), b"*/*")
                dst.sendall(data)
        except OSError:
            pass

    def _down(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if state["streaming"] and self.cuts == 0:
                    sent += len(data)
                    if sent > self.cut:
                        self.cuts += 1
                        dst.sendall(data[: len(data) - (sent - self.cut)])
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            # shutdown first: close() alone sends no FIN while the other direction's thread is
            # blocked in recv on the same socket, and the client then waits out its timeout.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_a_dropped_connection_resumes_from_the_last_verified_rows(
    server: Server, stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs of 100 rows: the retry starts after rows already decoded into the result, which
    # it must keep.
    monkeypatch.setattr("logitstore.format.chunks._YIELD_ROWS", 100)
    local = logitstore.open(stores["full"])  # the largest: chunks of 256 x 300 fp16
    n = len(local)
    proxy = CuttingProxy(server.port, cut=400_000)
    try:
        url = f"http://127.0.0.1:{proxy.port}/v1/stores/full"
        remote = logitstore.RemoteStore(url, backoff=0.01)
        got = remote.read(0, n)
        assert proxy.cuts == 1 and remote.retried == 1  # it was cut, and resumed
        (a, kind_a), (b, kind_b) = proxy.requests
        assert kind_a == kind_b == "chunks" and a == 0 < b < n, proxy.requests
        assert _same(got, local.read(0, n))
    finally:
        proxy.close()


@pytest.mark.parametrize("rows_on", [frozenset({0}), frozenset(range(1, 64))])
def test_a_read_resumed_in_the_other_stream_is_whole(
    stores: dict[str, Path], rows_on: frozenset[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read cut in a row stream and resumed in the compressed one, or the other way round
    (a retry another server answers): the rows already verified and the rest are one result,
    bit-identical to the local read."""
    monkeypatch.setattr("logitstore.format.chunks._YIELD_ROWS", 100)  # resumes mid-chunk
    local = logitstore.open(stores["topk"])
    n = len(local)
    srv = Server([stores["topk"]], "--block-positions", "256").start()  # rows verified early
    proxy = CuttingProxy(srv.port, cut=60_000, rows_on=rows_on)
    try:
        url = f"http://127.0.0.1:{proxy.port}/v1/stores/topk"
        remote = logitstore.RemoteStore(url, backoff=0.01)
        got = remote.read(3, n - 5)
        assert proxy.cuts == 1 and remote.retried == 1
        (a, kind_a), (b, kind_b) = proxy.requests
        assert a == 3 < b and {kind_a, kind_b} == {"rows", "chunks"}, proxy.requests
        assert kind_a == ("rows" if 0 in rows_on else "chunks")
        assert _same(got, local.read(3, n - 5))
        assert _same(remote.read(0, n), local.read(0, n))  # and uncut, in the later stream
    finally:
        proxy.close()
        srv.stop()


def test_a_damaged_chunk_is_caught_by_its_checksum(tmp_path: Path, stores) -> None:
    import shutil

    path = tmp_path / "topk"
    shutil.copytree(stores["topk"], path)
    shard = path / "values" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # inside the first inner chunk: the shard index stays intact
    shard.write_bytes(bytes(data))
    srv = Server([path]).start()
    try:
        remote = logitstore.RemoteStore(srv.url("topk"), retries=1, backoff=0.01)
        with pytest.raises(logitstore.LogitStoreError, match="CRC-32C"):
            remote.read(0, 10)
    finally:
        srv.stop()


@pytest.mark.parametrize("name", ["topk", "full", "sampled", "tokens"])
def test_reading_the_shards_directly_gives_zarrs_bytes(stores: dict[str, Path], name: str) -> None:
    """The local fast path every local read takes (format/shards.py) against zarr's reader."""
    from logitstore.format.chunks import chunk_layout, read_chunked

    store = logitstore.open(stores[name])
    layout = chunk_layout(stores[name], store.metadata)
    assert layout is not None
    n = len(store)
    for a, b in [(0, n), (255, 257), (2047, 2049), (n - 1, n), (7, 7), (100, 2048 * 2 + 9)]:
        want = zarr_rows(stores[name], a, b)
        got = read_chunked(stores[name], store.metadata, layout, a, b)
        for x, y in zip(got, want, strict=True):
            assert (x is None) == (y is None), (name, a, b)
            if x is not None:
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, a, b)
        for x, y in zip(store.read_stored(a, b), want, strict=True):
            assert (x is None) == (y is None), (name, a, b)
            if x is not None:
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, a, b)


def test_a_damaged_chunk_read_directly_is_a_corrupt_store(tmp_path: Path, stores) -> None:
    import shutil

    from logitstore.format.chunks import chunk_layout, read_chunked

    path = tmp_path / "topk"
    shutil.copytree(stores["topk"], path)
    shard = path / "values" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    md = logitstore.open(path).metadata
    layout = chunk_layout(path, md)
    assert layout is not None
    with pytest.raises(logitstore.CorruptStoreError, match="values"):
        read_chunked(path, md, layout, 0, 10)
