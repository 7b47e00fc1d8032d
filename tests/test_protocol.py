"""The stream format (docs/PROTOCOL.md), parsed from bytes: every cut and every lie is caught,
and a cut stream says how far it got."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.format.protocol import (
    MAGIC,
    ProtocolError,
    StreamMismatchError,
    StreamParser,
    encode_block,
    encode_end,
    encode_header,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> logitstore.LogitStore:
    table = torch.randn(50, 50, generator=torch.Generator().manual_seed(0)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=50, device=torch.device("cpu")
    )
    seqs = logitstore.sequences_from_token_ids([np.arange(300) % 50], 64)
    path = logitstore.capture(
        teacher,
        seqs,
        tmp_path_factory.mktemp("p") / "s",
        Encoding("topk", "u8", k=6),
        progress=False,
    )
    s = logitstore.open(path)
    assert isinstance(s, logitstore.LogitStore)
    return s


def _stream(store: logitstore.LogitStore, start: int, stop: int, step: int) -> bytes:
    parts = [encode_header(store.metadata, start, stop)]
    for a in range(start, stop, step):
        parts.append(encode_block(a, store.read_stored(a, min(a + step, stop))))
    parts.append(encode_end(stop, stop - start))
    return b"".join(parts)


def _reader(data: bytes):  # type: ignore[no-untyped-def]
    at = 0

    def read_exactly(n: int) -> bytes:
        nonlocal at
        if at + n > len(data):
            raise ProtocolError("stream cut short")
        out = bytearray(data[at : at + n])
        at += n
        return out  # type: ignore[return-value]

    return read_exactly


def _parse(store: logitstore.LogitStore, data: bytes, start: int, stop: int):  # type: ignore[no-untyped-def]
    parser = StreamParser(_reader(data), store.metadata, start, stop)
    blocks = list(parser.blocks())
    return parser, blocks


def test_a_whole_stream_parses_to_the_stored_rows(store: logitstore.LogitStore) -> None:
    data = _stream(store, 10, 250, 64)
    parser, blocks = _parse(store, data, 10, 250)
    assert [b[0] for b in blocks] == [10, 74, 138, 202] and parser.position == 250
    want = store.read_stored(10, 250)
    for i, w in enumerate(want):
        if w is None:
            assert all(b[1][i] is None for b in blocks)
        else:
            assert np.array_equal(np.concatenate([b[1][i] for b in blocks]), w)


def test_every_cut_is_caught_and_keeps_the_verified_blocks(store: logitstore.LogitStore) -> None:
    data = _stream(store, 0, 200, 50)
    header = len(encode_header(store.metadata, 0, 200))
    block = (len(data) - header - 20) // 4
    for cut in (
        3,
        header - 1,
        header + 10,
        header + block,
        header + block + 7,
        len(data) - 20,
        len(data) - 5,
    ):
        parser = StreamParser(_reader(data[:cut]), store.metadata, 0, 200) if cut > header else None
        if parser is None:
            with pytest.raises(ProtocolError):
                StreamParser(_reader(data[:cut]), store.metadata, 0, 200)
            continue
        got = []
        with pytest.raises(ProtocolError):
            for start, rows in parser.blocks():
                got.append((start, len(rows.input_ids)))
        assert sum(n for _, n in got) == min((cut - header) // block, 4) * 50
        # what a client resumes from: the end of the last verified block
        assert (got[-1][0] + got[-1][1] if got else 0) == min((cut - header) // block, 4) * 50


def test_damage_and_lies_are_refused(store: logitstore.LogitStore) -> None:
    good = _stream(store, 0, 100, 50)
    header = len(encode_header(store.metadata, 0, 100))
    flipped = bytearray(good)
    flipped[header + 40] ^= 0xFF  # inside the first block's payload
    with pytest.raises(ProtocolError, match="CRC"):
        _parse(store, bytes(flipped), 0, 100)
    with pytest.raises(StreamMismatchError):  # another range than asked for
        _parse(store, good, 0, 99)
    info = json.loads(good[12:header])
    for lie in ({"has_residual": False}, {"has_gaps": False}, {"identity": "sha256:other"}):
        body = json.dumps({**info, **lie}).encode()
        forged = b"LGSTRM01" + struct.pack("<I", len(body)) + body + good[header:]
        with pytest.raises(StreamMismatchError):
            _parse(store, forged, 0, 100)
    for bad in (b"{not json", b"[1, 2]"):
        forged = b"LGSTRM01" + struct.pack("<I", len(bad)) + bad + good[header:]
        with pytest.raises(ProtocolError):
            _parse(store, forged, 0, 100)
    empty = struct.pack("<4sQII", b"BLK0", 0, 0, 0) + struct.pack("<I", 0)
    with pytest.raises(ProtocolError, match="does not follow"):
        _parse(store, good[:header] + empty * 3 + good[header:], 0, 100)


def test_a_header_without_has_loss_mask_is_a_server_before_format_1_1(
    store: logitstore.LogitStore,
) -> None:
    # What a 0.1 server sends: no has_loss_mask key. Fine for a store without a mask ...
    data = _stream(store, 0, 50, 64)
    size = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + size])
    assert header.pop("has_loss_mask") is False
    body = json.dumps(header, separators=(",", ":")).encode()
    old = MAGIC + len(body).to_bytes(4, "little") + body + data[12 + size :]
    parser, blocks = _parse(store, old, 0, 50)
    assert parser.position == 50 and sum(len(b[1].input_ids) for b in blocks) == 50
    # ... and a mismatch for one with a mask, which such a server cannot send.
    masked = dataclasses.replace(store.metadata, extensions=("loss_mask",))
    with pytest.raises(StreamMismatchError, match="has_loss_mask"):
        StreamParser(_reader(old), masked, 0, 50)
