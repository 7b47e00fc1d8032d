"""Many trainers, one server, over a real socket: 64 clients at once get exactly the bits a
local read gives, with no error and no retry; and 64 streams whose clients stop reading hold a
bounded amount of the server's memory, not their ranges (docs/PROTOCOL.md §2, §2.1)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.format.chunks import CHUNKS_MEDIA_TYPE
from tests.test_workers import Serving, metric

VOCAB = 512
POSITIONS = 1 << 17
CLIENTS = 64
_STREAMED = "logitstore_response_bytes_total"
_ROUTE = "/v1/stores/{name}/positions"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128k positions of top-64 u8 rows from a teacher with fresh random logits at every
    position, so that the rows compress little: a whole range is far more than the socket
    buffers hold (the row stream ~26 MB, the compressed one ~12 MB)."""
    rng = np.random.default_rng(7)
    seqs = logitstore.sequences_from_token_ids([rng.integers(0, VOCAB, POSITIONS)], 4096)
    gen = torch.Generator().manual_seed(8)
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: torch.randn(*ids.shape, VOCAB, generator=gen) * 2,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
    )
    path = tmp_path_factory.mktemp("many") / "m.zarr"
    enc = Encoding("topk", "u8", k=64)
    return logitstore.capture(
        teacher, seqs, path, enc, progress=False, chunk_positions=1024, shard_positions=16384
    )


def _same(a: logitstore.Batch, b: logitstore.Batch) -> bool:
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )


def test_64_clients_at_once_get_local_bits_without_an_error(store: Path) -> None:
    local = logitstore.open(store)
    n = len(local)
    # Each client its own range (cutting chunks anywhere), a quarter of them on the row stream.
    ranges = [((i * 1999) % (n - 4000), (i * 1999) % (n - 4000) + 1500 + 37 * i) for i in range(64)]
    server = Serving([store], "--workers", "2")
    results: list[logitstore.Batch | BaseException | None] = [None] * CLIENTS
    retried = [0] * CLIENTS
    kinds = [i % 4 != 0 for i in range(CLIENTS)]  # compressed?
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        try:
            with logitstore.RemoteStore(server.url("m.zarr"), compressed=kinds[i]) as remote:
                start.wait(60)  # all 64 streams at once
                results[i] = remote.read(*ranges[i])
                retried[i] = remote.retried
        except BaseException as e:
            results[i] = e

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        deadline = time.monotonic() + 10  # the other worker publishes its counts within 0.5 s
        while True:
            text = server.metrics()
            counted = metric(text, "logitstore_requests_total", route=_ROUTE, status="200")
            if counted >= CLIENTS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.stop()
    errors = {i: r for i, r in enumerate(results) if not isinstance(r, logitstore.Batch)}
    assert not errors, errors
    assert retried == [0] * CLIENTS, "a client had to retry: an error hidden by the retries"
    for i, (a, b) in enumerate(ranges):
        got = results[i]
        assert isinstance(got, logitstore.Batch) and _same(got, local.read(a, b)), f"client {i}"
    assert counted == CLIENTS, text
    assert 'status="5' not in text and 'status="4' not in text, text


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stalled(port: int, n: int, accept: str) -> socket.socket:
    """A stream of the whole store whose client reads its first bytes, then nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a slow trainer's small window
    s.connect(("127.0.0.1", port))
    request = f"GET /v1/stores/m.zarr/positions?start=0&stop={n} HTTP/1.1\r\nHost: t\r\n"
    request += "Connection: close\r\n"
    s.sendall(f"{request}Accept: {accept}\r\n\r\n".encode())
    got = s.recv(1 << 16)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    while len(got) < 1 << 16:  # the stream is under way, then its client stops reading
        more = s.recv(1 << 16)
        assert more, "the stream ended"
        got += more
    return s


def test_streams_whose_clients_stop_reading_hold_bounded_memory(store: Path) -> None:
    n = len(logitstore.open(store))
    server = Serving([store], "--block-positions", "1024")  # one process: its RSS is the server's
    try:
        url = server.url("m.zarr")
        wire = {}
        for compressed in (True, False):  # each range's size; warms the server's caches
            s = _stalled(server.port, n, CHUNKS_MEDIA_TYPE if compressed else "*/*")
            with s, s.makefile("rb") as body:
                wire[compressed] = len(body.read())  # to the end: the server closes it
        sent0, rss0 = metric(server.metrics(), _STREAMED, route=_ROUTE), _rss(server.proc.pid)
        half = CLIENTS // 2
        socks = [_stalled(server.port, n, CHUNKS_MEDIA_TYPE) for _ in range(half)]
        socks += [_stalled(server.port, n, "*/*") for _ in range(CLIENTS - half)]
        # Wait until the server stops producing: every stream waits for its client.
        sent, still = sent0, 0
        while still < 3:  # the same for 3 s: every stream waits for its client
            time.sleep(1.0)
            last, sent = sent, metric(server.metrics(), _STREAMED, route=_ROUTE)
            still = still + 1 if sent == last else 0
        grown = _rss(server.proc.pid) - rss0
        ranges = half * wire[True] + (CLIENTS - half) * wire[False]
        # What left the disk is what the socket buffers took (~4 MB each) plus a step or two:
        # a small part of the 64 ranges, and the server's memory grew by a small part of that.
        assert sent - sent0 < 0.5 * ranges, (sent - sent0, ranges)
        assert grown < CLIENTS * (1 << 20), f"{grown / 2**20:.0f} MiB for {CLIENTS} streams"
        for s in socks:
            s.close()
        with logitstore.RemoteStore(url) as remote:  # and the server serves on
            assert _same(remote.read(100, 5000), logitstore.open(store).read(100, 5000))
    finally:
        server.stop()
